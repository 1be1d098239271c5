"""Building blocks: the attention layer, feed-forward, positions, norms and Transformer blocks."""
