"""Fine-tuning methods: one folder per method (`config.py`, `method.py`) and one registry.

See `registry.py` for how a method is added, `base.py` for what a method implements.
"""
