"""Code shared by every stage: typed params, errors, atomic I/O, hashing, tracking."""
