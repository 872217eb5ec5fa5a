"""The test guest: ``prepare.py`` builds it, ``init`` is its PID 1 (see tests/qemu_support.py)."""
