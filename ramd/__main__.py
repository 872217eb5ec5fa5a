"""``python -m ramd``."""

import sys

from ramd.cli import main

sys.exit(main())
