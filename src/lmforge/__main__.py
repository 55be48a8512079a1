"""`python -m lmforge ...` (and `torchrun -m lmforge train ...`) run the command line."""

import sys

from .cli import main

sys.exit(main())
