"""Tuning the search with Optuna, and comparing it with baselines at equal budget.

    python search.py -c search_spaces/demo.yaml --tune 20 --out runs/demo_tune        # a study of searches
    python search.py -c search_spaces/demo.yaml --baseline tpe --out runs/demo_tune   # fixed|random|published|tpe
    python search.py -c search_spaces/demo.yaml --compare --out runs/demo_tune        # RUN/compare.md

Modules: ``space`` (the ``tune:`` section), ``storage`` (the study's database, old journal files, killed
workers' trials, ``load_study``), ``selection`` (the held-out images that score trials), ``study`` (``--tune``),
``baselines``, ``compare``, ``report`` (``best.yaml`` and figures), ``cli`` (what search.py calls).
"""
from nas.tune.storage import load_study
from nas.tune.space import TUNE_DEFAULTS, TuneError

__all__ = ["load_study", "TUNE_DEFAULTS", "TuneError"]
