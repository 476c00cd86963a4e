"""python -m unmask (and torchrun -m unmask): the unmask command."""

from unmask.cli import entry

entry()
