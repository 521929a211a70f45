"""Helpers for the fuzzing and robustness tests (kept free of torch so that workers start fast)."""
