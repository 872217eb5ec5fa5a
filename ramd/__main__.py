"""``python -m ramd``."""

import sys

from ramd.process.slim import main

sys.exit(main())
