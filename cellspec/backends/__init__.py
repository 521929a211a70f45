"""Back ends: one schedule rendered as NumPy, PyTorch and CUDA source through Jinja templates."""
