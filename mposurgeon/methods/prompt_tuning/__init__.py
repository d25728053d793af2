"""`prompt-tuning`: trained virtual tokens prepended to every input, as PEFT's prompt tuning."""
