"""Two classifier runs judged image by image on the selection protocol's data (``roadsight compare``).

Two recipes' accuracies differ by a few images out of hundreds; whether that is more than chance
shows in the images only one of them gets right (exact McNemar test), which the runs log as
``predictions/*.csv`` with ``--cv`` (out of fold) and ``--validate-on`` (other sources).
"""
from __future__ import annotations

import os

from .stats import images_verdict, paired_images
from .tracking import PREDICTION_SETS, load_predictions, resolve_run_id


def compare_runs(run_a: str, run_b: str, names: tuple[str, str] = ("A", "B")) -> list[dict]:
    """One entry per prediction set both runs logged: the images paired (those both scored, with the
    same label), each run's accuracy on them, the discordant counts, McNemar's p and the verdict
    (the runs called ``names``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files a run: no bars
    ids = resolve_run_id(run_a), resolve_run_id(run_b)
    rows, missing = [], []
    for name, (what, _) in PREDICTION_SETS.items():
        try:
            a, b = (load_predictions(run_id, name) for run_id in ids)
        except ValueError as exc:
            missing.append(str(exc))
            continue
        shared = sorted(image for image in set(a) & set(b) if a[image][0] == b[image][0])
        if not shared:
            raise ValueError(f"runs {run_a} and {run_b} share no image of {what} to pair on")
        paired = paired_images([a[i][0] == a[i][1] for i in shared], [b[i][0] == b[i][1] for i in shared])
        rows.append({"set": name, "images": len(shared), "only_in_a": len(a) - len(shared),
                     "only_in_b": len(b) - len(shared), "accuracy_a": paired.accuracy_a,
                     "accuracy_b": paired.accuracy_b, "right_only_by_a": paired.only_a,
                     "right_only_by_b": paired.only_b, "mcnemar_p": paired.p,
                     "verdict": images_verdict(*names, paired, what)})
    if not rows:
        raise ValueError(f"runs {run_a} and {run_b} have no set of per-image predictions in common; "
                         + "; ".join(missing))
    return rows
