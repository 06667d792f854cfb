"""The search: strategies, alpha bookkeeping and the ``search.py`` run."""
