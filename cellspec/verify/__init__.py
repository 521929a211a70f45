"""Verification: every backend against the others and against float64 finite differences."""
