"""The `lightweight` method: config.py (options, torch-free), method.py (implementation)."""
