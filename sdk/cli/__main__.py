"""`python -m infopt.cli ...`, the same as `infopt-pack ...`."""

from infopt.cli import main

main()
