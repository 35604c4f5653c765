"""Pure-Python core (no torch): question model, scoring and reward aggregation."""
