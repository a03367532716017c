"""python -m ahiq score / download / zoo / launch (ahiq.cli)."""
import sys

from ahiq.cli import main

if __name__ == "__main__":
    sys.exit(main())
