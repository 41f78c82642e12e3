"""`python -m fastvq ...` runs the `fastvq` command."""

import sys

from fastvq.app.cli import main

sys.exit(main())
