"""Seeded subsets of a sample list: which classes, how many images per class, a held-out split.

Every random choice uses its own ``random.Random`` seeded from (seed, purpose[, class name]), so it is
the same on every machine and Python version, and the images picked for one class do not depend on
which other classes were picked. Picked images keep their list order.
"""
from __future__ import annotations

import random

import numpy as np

from nas.data.errors import DataError
from nas.data.samples import SampleList

CLASS_SAMPLING = ("first", "random")


def _rng(seed, *parts) -> random.Random:
    return random.Random("/".join(map(str, (seed,) + parts)))


def select_classes(available: list[str], classes: list[str] | None = None, num_classes: int | None = None,
                   sampling: str = "first", seed=0, where: str = "the data", list_name: str = "") -> list[str]:
    """Names of the chosen classes, in the order of ``available``.

    classes: keep only these (all must be in ``available``).
    num_classes: then keep n of them: the first n (``sampling="first"``) or n drawn at random with
        ``seed`` (``sampling="random"``).
    """
    chosen = list(available)
    if classes is not None:
        present = set(available)
        absent = [c for c in classes if c not in present]
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise DataError(f"class list {list_name or 'data.classes'} names {len(absent)} class(es) absent "
                            f"from {where}: {shown}")
        wanted = set(classes)
        chosen = [c for c in available if c in wanted]
    if num_classes is not None:
        if num_classes > len(chosen):
            raise DataError(f"data.num_classes={num_classes} but {where} has only {len(chosen)} classes"
                            + (" in the class list" if classes is not None else ""))
        if sampling == "first":
            chosen = chosen[:num_classes]
        elif sampling == "random":
            picked = set(_rng(seed, "classes").sample(chosen, num_classes))
            chosen = [c for c in chosen if c in picked]
        else:
            raise DataError(f"data.class_sampling: expected one of {', '.join(CLASS_SAMPLING)}, got {sampling!r}")
    return chosen


def limit_per_class(samples: SampleList, images_per_class: int | None = None, fraction: float | None = None,
                    seed=0, where: str = "the data") -> SampleList:
    """Keep ``images_per_class`` images of every class, or ``fraction`` of each (at least 1), at random."""
    if images_per_class is None and fraction is None:
        return samples
    if images_per_class is not None and fraction is not None:
        raise DataError("data.images_per_class and data.fraction both set; use one of them")
    keep = []
    for label, name in enumerate(samples.class_names):
        members = samples.indices_of_class(label).tolist()
        if images_per_class is not None:
            if images_per_class > len(members):
                raise DataError(f"data.images_per_class={images_per_class} but class {name!r} in {where} has "
                                f"only {len(members)} images")
            k = images_per_class
        else:
            k = max(1, int(round(fraction * len(members))))
        keep.extend(_rng(seed, "subset", name).sample(members, k))
    return samples.take(np.sort(np.asarray(keep, dtype=np.int64)))


def split_heldout(samples: SampleList, fraction: float, seed=0, purpose: str = "heldout",
                  where: str = "the training data") -> tuple[SampleList, SampleList]:
    """Class-balanced split: (rest, held_out), with round(fraction * n_c) of each class's n_c images held out.

    Every class keeps at least one image on each side, so each needs at least 2.
    """
    if not 0 < fraction < 1:
        raise DataError(f"data.heldout_fraction: expected a value in (0, 1), got {fraction!r}")
    held = []
    for label, name in enumerate(samples.class_names):
        members = samples.indices_of_class(label).tolist()
        if len(members) < 2:
            raise DataError(f"class {name!r} in {where} has {len(members)} image(s); a held-out split needs "
                            f"at least 2 per class")
        k = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        held.extend(_rng(seed, purpose, name).sample(members, k))
    is_held = np.zeros(len(samples), dtype=bool)
    is_held[held] = True
    return samples.take(np.flatnonzero(~is_held)), samples.take(np.flatnonzero(is_held))
