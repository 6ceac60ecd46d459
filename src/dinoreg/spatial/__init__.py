"""dinoreg."""
