"""`python -m isosweep` is the same as the `isosweep` command."""

import sys

from isosweep.cli import main

sys.exit(main())
