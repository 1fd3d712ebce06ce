"""`python -m cli` runs the command-line interface."""

from cli.main import main

main()
