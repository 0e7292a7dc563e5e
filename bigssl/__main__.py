"""`python -m bigssl` = `bigssl` (so `torchrun -m bigssl train ...` works)."""

import sys

from bigssl.cli import main

sys.exit(main())
