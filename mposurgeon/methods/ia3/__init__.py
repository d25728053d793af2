"""`ia3`: learned scaling vectors on keys, values and FFN inputs, through the `peft` library."""
