"""The `full` method: config.py (options, torch-free), method.py (implementation)."""
