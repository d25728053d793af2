"""`python -m mposurgeon`: the command-line interface."""

from mposurgeon.cli.entry import main

main()
