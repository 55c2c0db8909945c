"""`python -m relaydiff.cli ...`, the same as the `relaydiff` command."""

from relaydiff.cli import main

main()
