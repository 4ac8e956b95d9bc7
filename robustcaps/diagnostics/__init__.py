"""Gradient diagnostics and masking indicators."""
