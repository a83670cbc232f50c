"""Build the lab report from the MLflow store alone: per study the question, settings, a table of
mean ± sd [95% CI] over seeds on both test splits, curves as mean and band over seeds, the
conclusion generated from the numbers, and (for dehazing) the hazy | output | clear grids.
Output: ``index.html`` and ``README.md`` with small PNGs; the header says when, on what hardware
and at which commit the runs were made, and how long they took. No path of the machine appears.
"""
from __future__ import annotations

import datetime
import html
import json
import statistics
from pathlib import Path

import mlflow
from PIL import Image

from . import tracking
from .experiments import MEASURES, SPLITS, STUDIES, STUDY_EXPERIMENT, Study, by_seed
from .stats import IDENTICAL, NO_DIFFERENCE, is_claim, t_interval

# (split, metric) columns of a classifier study's table
CLASSIFY_COLUMNS = (("random", "test_accuracy"), ("random", "test_macro_f1"), ("tail", "test_accuracy"),
                    ("tail", "test_macro_f1"), ("tail", "test_accuracy_dark"), ("tail", "test_accuracy_bright"),
                    ("tail", "train_accuracy"))
CURVE_TITLES = {("tail", "train_loss"): "training loss (tail split's training part)",
                ("random", "test_accuracy"): "in-distribution test accuracy",
                ("tail", "test_accuracy"): "tail-split test accuracy",
                ("tail", "eval_psnr"): "PSNR on the evaluated test pairs (dB)"}
PROVENANCE_TAGS = ("commit", "cpu", "cores")
CAPTIONS = {"classify": "Cells: mean ± sd [95% t-interval] over seeds; curves: mean over seeds with a ± 1 sd band.",
            "select": "Each recipe fitted once on the tail split's training part (a frozen backbone and an L-BFGS head: no "
                      "seeds to repeat): blocked 5-fold CV on that part (mean ± sd over folds, worst fold) and accuracy on "
                      "photos from other sources; the test split is never scored. Comparisons pair the recipes image by "
                      "image (exact McNemar).",
            "dehaze": "PSNR per whole test image at full resolution, 8-bit output: mean, spread and range over the "
                      "test pairs; curves: mean over seeds with a ± 1 sd band."}
GRID_WIDTH = 720  # px: comparison grids are photos, kept small as JPEG in the committed report


def latest_study_runs(client: mlflow.MlflowClient, experiment_id: str) -> dict[str, object]:
    """The newest finished parent run of each study made by this version's runner (it records its
    commit), full runs preferred over ``--quick`` ones."""
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED' and tags.study != ''",
                              order_by=["attributes.start_time DESC"])
    chosen: dict[str, object] = {}
    for run in runs:
        if "commit" not in run.data.tags:
            continue
        name = run.data.tags["study"]
        current = chosen.get(name)
        if current is None or (current.data.tags.get("quick") == "True" and run.data.tags.get("quick") == "False"):
            chosen[name] = run
    return chosen


def _curves(client: mlflow.MlflowClient, study: Study, rows: list[dict], out: Path) -> str:
    """One panel per (split, metric) of ``study.curves``: per setting the mean over seeds and a
    band of ± one standard deviation."""
    panels = []
    for split, metric in study.curves:
        lines = []
        for setting in dict.fromkeys(r["setting"] for r in rows):
            runs = {r["run_id"] for r in rows if r["setting"] == setting and r["split"] == split}
            per_seed = [{m.step: m.value for m in client.get_metric_history(run_id, metric) if m.step >= 1}
                        for run_id in runs]
            epochs = sorted(set.intersection(*(set(h) for h in per_seed))) if per_seed else []
            if epochs:
                values = [[h[e] for h in per_seed] for e in epochs]
                lines.append((setting, epochs, [statistics.fmean(v) for v in values],
                              [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]))
        panels.append((CURVE_TITLES.get((split, metric), f"{metric} ({split})"), lines))
    fig = tracking.band_figure(panels)
    fig.savefig(out / f"{study.name}.png", dpi=80)
    tracking.close(fig)
    return f"{study.name}.png"


def _comparison_grids(client: mlflow.MlflowClient, rows: list[dict], out: Path, stem: str) -> list[str]:
    """Each child run's ``plots/comparison.png`` (hazy | output | clear), downscaled to a JPEG."""
    grids, seen = [], set()
    for row in rows:
        run_id = row["run_id"]
        if run_id in seen or "plots/comparison.png" not in {a.path for a in client.list_artifacts(run_id, "plots")}:
            continue
        seen.add(run_id)
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/comparison.png")
        image = Image.open(local).convert("RGB")
        image.thumbnail((GRID_WIDTH, GRID_WIDTH * 4), Image.Resampling.LANCZOS)
        name = f"{stem}-{len(grids) + 1}.jpg"
        image.save(out / name, quality=80)
        grids.append(name)
    return grids


def _seconds(rows: list[dict], setting: str) -> str:
    """Mean seconds per run, and in brackets its process CPU seconds (what pauses and a shared
    machine do not inflate)."""
    mine = [r for r in rows if r["setting"] == setting]
    wall = [r["total_seconds"] for r in mine if "total_seconds" in r]
    cpu = [r["cpu_seconds"] for r in mine if "cpu_seconds" in r]
    return (f"{statistics.fmean(wall):.0f}" if wall else "-") + (f" ({statistics.fmean(cpu):.0f})" if cpu else "")


def classify_table(rows: list[dict], notes: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Per setting, each measure as mean ± sd [95% CI] over seeds, and the mean seconds per run."""
    header = ["setting", *(MEASURES[c] for c in CLASSIFY_COLUMNS), "s per run (CPU s)", "note"]
    table = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        cells = []
        for column in CLASSIFY_COLUMNS:
            values = list(by_seed(rows, setting, *column).values())
            cells.append(t_interval(values).text() if values else "-")
        table.append([setting, *cells, _seconds(rows, setting), _note(notes, setting)])
    return header, table


def select_table(rows: list[dict], notes: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Per recipe, the selection protocol's figures."""
    header = ["recipe", "blocked CV (worst fold)", "other sources", "web / crop", "the lower of the two",
              "s per run (CPU s)", "note"]
    table = [[r["setting"], f"{r['cv_accuracy']:.3f} ± {r['cv_accuracy_std']:.3f} ({r['cv_accuracy_min']:.3f})",
              f"{r['other_accuracy']:.3f}", f"{r['other_web_accuracy']:.3f} / {r['other_crop_accuracy']:.3f}",
              f"{min(r['cv_accuracy'], r['other_accuracy']):.3f}", _seconds(rows, r["setting"]), _note(notes, r["setting"])]
             for r in rows]
    return header, table


def dehaze_table(rows: list[dict], notes: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Per method, the PSNR spread over test images (averaged over seeds) and the mean SSIM."""
    header = ["method", "PSNR mean (dB)", "sd per image", "median", "range", "SSIM", "s (CPU s)", "note"]
    table = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        values = sorted(statistics.fmean(r["per_image_psnr"][p] for r in mine) for p in mine[0]["per_image_psnr"])
        table.append([setting, f"{statistics.fmean(values):.2f}", f"{statistics.stdev(values):.2f}",
                      f"{statistics.median(values):.2f}", f"{values[0]:.2f}-{values[-1]:.2f}",
                      f"{statistics.fmean(r['test_ssim'] for r in mine):.3f}", _seconds(rows, setting),
                      _note(notes, setting)])
    return header, table


def _note(notes: dict[str, str], setting: str) -> str:
    return next((v for k, v in notes.items() if setting.startswith(k)), "")


def _utc(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_time(client: mlflow.MlflowClient, run_ids: set[str]) -> str:
    """The honest cost of the runs behind the report: their summed seconds (each run's own wall
    clock, on a machine possibly shared), their process CPU seconds, and the wall-clock span from
    the first start to the last end (which includes any pause between interrupted sessions)."""
    runs = [client.get_run(run_id) for run_id in run_ids]
    seconds = sum(r.data.metrics.get("total_seconds", r.data.metrics.get("dcp_seconds", 0.0)) for r in runs)
    cpu = sum(r.data.metrics.get("cpu_seconds", 0.0) for r in runs)
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 3.6e6
    return (f"{len(runs)} child runs; summed run time {seconds / 3600:.2f} h (each run's own wall clock), "
            f"{cpu / 3600:.2f} h of process CPU time; from the first start ({_utc(min(r.info.start_time for r in runs))}) "
            f"to the last end: {span:.2f} h")


def survivors(conclusion: str) -> tuple[list[str], list[str]]:
    """The verdicts of a conclusion that beat the noise (in full) and those that did not (named)."""
    verdicts = [line.removeprefix("- ") for line in conclusion.splitlines()]
    within = [v.split(" at n = ")[0].removeprefix(NO_DIFFERENCE + " between ") for v in verdicts
              if v.startswith(NO_DIFFERENCE)] + [v.rsplit(" (", 1)[0] for v in verdicts if f" {IDENTICAL} " in v]
    return [v for v in verdicts if is_claim(v)], within


def build_report(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(STUDY_EXPERIMENT)
    if experiment is None:
        raise ValueError(f"no MLflow experiment {STUDY_EXPERIMENT!r} at {mlflow.get_tracking_uri()}: "
                         "run `roadsight experiment <name>` first")
    studies = latest_study_runs(client, experiment.experiment_id)
    md, body, run_ids, provenance, conclusions = [], [], set(), set(), {}
    for name, study in STUDIES.items():
        run = studies.get(name)
        md += [f"## {name}", "", f"*{study.question}*", ""]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p><em>{html.escape(study.question)}</em></p>"]
        if run is None:
            md += ["Not run yet.", ""]
            body.append("<p>Not run yet.</p>")
            continue
        rows = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/study/rows.json"))["rows"]
        run_ids |= {r["run_id"] for r in rows}
        provenance.add(tuple(run.data.tags.get(k, "?") for k in PROVENANCE_TAGS))
        conclusion = study.conclude(rows)  # today's wording of the run's numbers (its conclusion.md: the first)
        conclusions[name] = conclusion
        params = {k: v for k, v in run.data.params.items() if k not in ("question", "study")}
        settings = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        splits = "; ".join(f"{s}: {SPLITS[s]}" for s in study.splits)
        header, table = {"dehaze": dehaze_table, "select": select_table}.get(study.task, classify_table)(rows, study.notes)
        image = _curves(client, study, rows, out) if study.curves else None
        grids = _comparison_grids(client, rows, out, name)
        reused = sum(r["reused"] for r in rows)
        meta = (f"Settings: {settings}. Splits ({splits}). Parent run `{run.info.run_id}` (quick: "
                f"{run.data.tags.get('quick')}), finished {_utc(run.info.end_time)}, commit {run.data.tags.get('commit')}; "
                f"{len(rows)} rows, {reused} of them reused from earlier finished runs with the same options.")
        extra = dict(run.data.metrics)
        md += [meta, "", CAPTIONS[study.task], "",
               "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
               *("| " + " | ".join(r) + " |" for r in table), "", *([f"![{name} curves]({image})", ""] if image else []),
               *(f"![{name}: hazy | output | clear]({g})" for g in grids), "",
               "**Conclusions.**", "", conclusion, ""]
        if extra:
            md += ["Measurements: " + ", ".join(f"{k} = {v:.3g}" for k, v in sorted(extra.items())), ""]
        body += [f"<p>{html.escape(meta)}</p>", f"<p>{html.escape(CAPTIONS[study.task])}</p>",
                 "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
                 *("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table), "</table>",
                 *([f'<p><img src="{image}" alt="{html.escape(name)} curves"></p>'] if image else []),
                 *(f'<p><img src="{g}" alt="{html.escape(name)}: hazy | output | clear"></p>' for g in grids),
                 "<p><strong>Conclusions.</strong></p><ul>"
                 + "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in conclusion.splitlines())
                 + "</ul>"]
        if extra:
            body.append("<p>Measurements: " + html.escape(", ".join(f"{k} = {v:.3g}" for k, v in sorted(extra.items()))) + "</p>")
    machines = "; ".join(f"{cpu} ({cores} cores), code at commit {commit}" for commit, cpu, cores in sorted(provenance))
    intro = [f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by `roadsight report` "
             f"from the MLflow experiment `{STUDY_EXPERIMENT}`. Runs made on {machines or '-'}."]
    if run_ids:
        intro.append(f"Cost: {run_time(client, run_ids)}.")
    intro.append("Every classifier setting is trained once per seed on each of two splits of the course images: "
                 "*in-distribution*, a seeded random split with the lab's per-class test proportions (20% of each "
                 "class; the seed also fixes initialisation and data order), and the lab's *tail split* (the last 20% "
                 "of each class by file name: night cars and another camera), scored on night and day images too. "
                 "A setting beats another only when the paired (by seed) difference's 95% t-interval excludes zero; "
                 "otherwise the conclusion says there is no measurable difference at that n.")
    summary_md, summary_html = [], []
    for name, conclusion in conclusions.items():
        claims, within = survivors(conclusion)
        head = (f"{len(claims)} of {len(claims) + len(within)} comparisons beyond the noise" if claims or within
                else "one setting, no comparison (see its conclusions)")
        rest = [*claims, *([f"no measurable difference: {'; '.join(within)}."] if within else [])]
        summary_md.append(f"- **{name}**: {head}" + "".join(f"\n  - {line}" for line in rest))
        summary_html.append(f"<li><strong>{html.escape(name)}</strong>: {head}<ul>"
                            + "".join(f"<li>{html.escape(line)}</li>" for line in rest) + "</ul></li>")
    md = ["# roadsight lab report", "", *(line for p in intro for line in (p, "")),
          "## What survived the statistics", "", *summary_md, "", *md]
    body = ["<h1>roadsight lab report</h1>", *(f"<p>{html.escape(p)}</p>" for p in intro),
            "<h2>What survived the statistics</h2><ul>", *summary_html, "</ul>", *body]
    (out / "README.md").write_text("\n".join(md) + "\n")
    (out / "index.html").write_text("<!doctype html><meta charset=utf-8><title>roadsight lab report</title>"
                                    "<body style='font-family:sans-serif;max-width:1400px;margin:auto'>"
                                    + "\n".join(body) + "</body>\n")
    return out / "index.html"
