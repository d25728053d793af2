"""`bitfit`: only the biases (and the task head) train."""
