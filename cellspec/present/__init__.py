"""Presenting a compiled cell to people: equations (``latex``) and data-flow diagrams (``diagram``).

Both are pure functions of a :class:`~cellspec.driver.CompiledCell` and deterministic (the same
spec gives the same bytes), so their output can be committed and compared.
"""
