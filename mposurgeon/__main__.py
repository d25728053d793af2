"""`python -m mposurgeon`: the command-line interface."""

from mposurgeon.cli.app import main

main()
