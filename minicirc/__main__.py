"""`python -m minicirc COMMAND ...`: the same command line as the `minicirc` script (minicirc/cli.py), for
environments without the script on PATH and for torchrun:
`torchrun --nproc-per-node 2 -m minicirc circuit ... --distributed`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
