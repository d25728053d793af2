"""Training: data, model heads, importance scores, the loop."""
