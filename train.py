"""Train learned codes: ``python train.py conf/digits_learned.json``. See train/cli.py."""
import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
