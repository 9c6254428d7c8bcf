"""``python -m bench`` (what ``just bench`` runs)."""

import sys

from .cli import main

sys.exit(main())
