"""The RAM block id rule, shared by the block list and the wire models (no other imports, so
the client library can use it without loading the memory layer)."""

#: A letter, then up to 63 of ``A-Za-z0-9._-``.
ID_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,63}$"
