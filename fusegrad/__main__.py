"""`python -m fusegrad ...` (and `torchrun -m fusegrad ...`) is the `fusegrad` command."""
import sys

from fusegrad.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
