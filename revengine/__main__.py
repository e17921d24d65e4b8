"""`python -m revengine ...`: the same as the `revengine` command."""
import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
