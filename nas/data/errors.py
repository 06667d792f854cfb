"""The data package's error: a user mistake in the data or its settings."""
from nas.errors import UserError


class DataError(UserError):
    """Bad data or data settings, found while the datasets are built (before any training).

    The message is one line that names the offending path or value and says what was expected, so a CLI can
    print ``str(err)`` instead of a traceback.
    """
