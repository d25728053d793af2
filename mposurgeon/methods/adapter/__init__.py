"""`adapter`: Houlsby bottleneck adapters after the attention output and the FFN output."""
