"""fmkt."""
