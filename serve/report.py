"""``python -m serve.report OUT_DIR``: the summary tables of a serving run as markdown."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from serve.core.results import report
from util.errors import UserError, exits_on_user_error


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.report", description=__doc__)
    ap.add_argument("out_dir", help="the serving config's out_dir")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    if not out.is_dir() or not any(out.glob("*/setting.json")):
        raise UserError(f"'{out}' holds no serving results (no */setting.json). Fix: pass the 'out_dir' of a "
                        f"finished python -m serve run.")
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
