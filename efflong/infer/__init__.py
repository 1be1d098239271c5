"""Inference on trained models: cached decoding and sampling (decode.py), the `generate` command
(generate.py)."""
