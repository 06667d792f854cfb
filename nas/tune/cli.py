"""What ``search.py --tune N | --baseline KIND | --compare`` run (search.py parses, this dispatches)."""
from __future__ import annotations

from nas.derive.export import DeriveError
from nas.tune.space import TuneError


def dispatch(args, cfg: dict, out: str) -> None:
    from nas.tune.baselines import run_baseline
    from nas.tune.compare import run_compare
    from nas.tune.study import run_study

    try:
        if args.tune is not None:
            best = run_study(cfg, out, args.tune, args.storage, args.study)
            value = "none completed" if best["value"] is None else f"{best['value']:.2f}"
            print(f"study {best['study_name']!r}: {best['trials']['complete']} complete, {best['trials']['pruned']} "
                  f"pruned, {best['trials']['fail']} failed; best trial {best['best_trial']} ({value}) "
                  f"{best['params']}\nwrote {out}/best.yaml")
        elif args.baseline is not None:
            print(f"wrote {run_baseline(args.baseline, cfg, out, args.storage, args.study)}")
        else:
            print(f"wrote {run_compare(cfg, out)}")
    except DeriveError as exc:  # a search model without a derived model, an unreadable run
        raise TuneError(str(exc)) from None
