"""Entry point of ``python -m launch``; see :mod:`launch._cli`."""

import sys

from launch._cli import main

sys.exit(main())
