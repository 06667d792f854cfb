"""Errors and warnings raised by the data package."""


class DataError(ValueError):
    """Bad data or data settings, found while the datasets are built (before any training).

    The message is one line that names the offending path or value and says what was expected, so a CLI can
    print ``str(err)`` instead of a traceback.
    """


class SkippedImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by another sample (see ``ImageFileDataset``)."""
