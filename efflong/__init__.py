"""efflong: efficient long-sequence Transformers in JAX/Flax NNX."""
