"""``python -m affinity``: the same command as the ``affinity`` script."""

from __future__ import annotations

import sys

from affinity.cli import main

sys.exit(main())
