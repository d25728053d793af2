"""`dsee`: a LoRA update plus a sparse update on a fixed support of N entries per matrix."""
