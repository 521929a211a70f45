"""Runtime: the compile cache, loading generated packages, building native code."""
