"""HCNR repair."""
