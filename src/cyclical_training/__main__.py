"""Run the command line as ``python -m cyclical_training`` (needed by ``torchrun -m``)."""

import sys

from .cli import main

sys.exit(main())
