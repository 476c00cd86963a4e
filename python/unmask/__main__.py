"""python -m unmask (and torchrun -m unmask): the unmask command."""

import sys

from unmask.cli import main

sys.exit(main())
