"""The command lines of ``search.py`` and ``derive.py``: the top layer, above search, derive and tune.

Each parses its arguments, calls the library and turns a user's mistake into one line (``run_command``).
Nothing in ``nas/`` imports this package.
"""
