"""The daemon process: entry point and command line (``slim``, ``cli``), its lifetime
(``daemon``), systemd integration (``systemd``, ``fdstore``), start-up adoption of blocks
(``adoption``), default directories (``datadirs``, ``paths``), the fd budget and the heap."""
