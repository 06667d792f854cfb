"""The one error type for user mistakes.

Anything a user can fix (a bad setting, a missing or damaged file, a full disk) raises ``UserError``
or a subclass, with a one-line message that names the argument, file or value and what was expected.
The command line catches it in one place and prints that line (exit 2); every other exception is a
bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; printed as one line, exit code 2."""
