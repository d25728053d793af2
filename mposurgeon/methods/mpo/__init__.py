"""The MPO family: `record.py` (the record of a module held as cores), `config.py`,
`state.py` (factorize, read back, live MPO layers) and `method.py` (merge, load, training)."""
