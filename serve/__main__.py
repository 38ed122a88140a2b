import sys

from util.signals import exit_at_once

exit_at_once("python -m serve")  # a signal while the imports below run: one line, nothing started

from serve.cli import main  # noqa: E402

sys.exit(main())
