"""POSIX host memory: libc bindings and resizable anonymous/fd-backed mappings.

Knows nothing of RAM blocks. :mod:`.libc` holds the POSIX calls, :mod:`.linux` the
Linux-only ones, :mod:`.mmap_alloc` the reserve / populate / resize / free logic.
"""
