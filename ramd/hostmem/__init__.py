"""Host memory: libc bindings and the backends of resizable allocations.

Knows nothing of RAM blocks. :mod:`.libc` holds the POSIX calls, :mod:`.linux` the
Linux-only ones, :mod:`.mmap_alloc` the reserve / populate / free steps of the layout,
:mod:`.backend` the backend interface and the anonymous backend, :mod:`.shared` the
``memfd`` and ``file`` backends.
"""
