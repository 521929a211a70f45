"""Middle end: checked cell → SymPy cell model → schedule of stages → derived backward."""
