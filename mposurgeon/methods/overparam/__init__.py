"""The `overparam` method: config.py (options, torch-free), method.py (implementation)."""
