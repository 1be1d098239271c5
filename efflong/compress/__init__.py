"""Making a trained model cheaper: quantization (qwix), distillation, pruning and sparsity.

  quantize  post-training quantization (int8 weight-only, w8a8, int4, bf16, mixed per layer),
            per-layer sensitivity, quantization-aware training
  distill   the knowledge-distillation loss (the trainer's `distill` section)
  prune     magnitude / N:M masks held by the optimizer, the gradual schedule, L1, structured
            pruning of heads and feed-forward neurons
  cli       the `./launch.sh compress` command: a trained run in, a compressed run out
"""
