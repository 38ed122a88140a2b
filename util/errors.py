"""The one error type a user should ever see from lcc.

Anything the user can fix (a config typo, a missing data file, a checkpoint
that belongs to another run) is raised as :class:`UserError`; the command
line prints its message as one paragraph and exits with code 2 instead of a
traceback.
"""
import functools
import sys

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class UserError(Exception):
    """A problem with the user's input, with a message saying how to fix it."""


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or of an impossible value."""


class RunDiverged(UserError):
    """A run whose training loss stopped being finite; the sweep goes on with the next run."""


def exits_on_user_error(main):
    """Wrap a command's ``main`` so a UserError prints as one paragraph and
    returns EXIT_USER_ERROR instead of ending in a traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapped
