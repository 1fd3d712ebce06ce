"""`python -m recstream` runs the command-line interface."""

from recstream.cli import main

main()
