"""`prefix-tuning`: trained keys and values prepended in every attention layer."""
