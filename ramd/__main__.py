"""``python -m ramd``."""

import sys

from ramd.slim import main

sys.exit(main())
