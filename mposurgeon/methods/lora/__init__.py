"""`lora`: low-rank updates of the targeted matrices, through the `peft` library."""
