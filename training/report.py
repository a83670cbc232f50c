"""Build the lab report from the MLflow store alone: per study the question, settings, a table of
final metrics and times, overlaid curves, the generated conclusion, and (for dehazing) the
hazy | output | clear grids. Output: ``index.html`` and ``README.md`` with small PNGs."""
from __future__ import annotations

import html
import json
from pathlib import Path

import mlflow
from PIL import Image

from . import tracking
from .experiments import STUDIES, STUDY_EXPERIMENT, Study

TABLE_METRICS = ("test_accuracy", "test_macro_f1", "test_accuracy_dark", "test_accuracy_bright", "train_accuracy",
                 "test_psnr", "test_ssim", "test_megapixels_per_second", "total_seconds")
GRID_WIDTH = 720  # px: comparison grids are photos, kept small as JPEG in the committed report


def latest_study_runs(client: mlflow.MlflowClient, experiment_id: str) -> dict[str, object]:
    """The newest finished parent run of each study, full runs preferred over ``--quick`` ones."""
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED' and tags.study != ''",
                              order_by=["attributes.start_time DESC"])
    chosen: dict[str, object] = {}
    for run in runs:
        name = run.data.tags["study"]
        current = chosen.get(name)
        if current is None or (current.data.tags.get("quick") == "True" and run.data.tags.get("quick") == "False"):
            chosen[name] = run
    return chosen


def _curves(client: mlflow.MlflowClient, study: Study, rows: list[dict], out: Path) -> str:
    histories = []
    for row in rows:
        points = {}
        for key in study.curves:
            for m in client.get_metric_history(row["run_id"], key):
                points.setdefault(m.step, {"epoch": m.step})[key] = m.value
        histories.append((row["setting"], [points[s] for s in sorted(points)]))
    fig = tracking.overlay_figure(histories, study.curves)
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


def _number(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if metric == "total_seconds" else f"{value:.2f}" if metric == "test_psnr" else f"{value:.3f}"


def build_report(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(STUDY_EXPERIMENT)
    if experiment is None:
        raise ValueError(f"no MLflow experiment {STUDY_EXPERIMENT!r} at {mlflow.get_tracking_uri()}: "
                         "run `roadsight experiment <name>` first")
    studies = latest_study_runs(client, experiment.experiment_id)
    md = ["# roadsight lab report", "", f"Generated from the MLflow store `{mlflow.get_tracking_uri()}`.", ""]
    body = ["<h1>roadsight lab report</h1>"]
    for name, study in STUDIES.items():
        run = studies.get(name)
        md += [f"## {name}", "", f"*{study.question}*", ""]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p><em>{html.escape(study.question)}</em></p>"]
        if run is None:
            md += ["Not run yet.", ""]
            body.append("<p>Not run yet.</p>")
            continue
        payload = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/study/rows.json"))
        rows, notes = payload["rows"], study.notes
        conclusion = study.conclude(rows)  # today's wording of the run's numbers (its conclusion.md: the first)
        params = {k: v for k, v in run.data.params.items() if k not in ("question", "study")}
        settings = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        metrics = [m for m in TABLE_METRICS if any(m in r for r in rows)]
        header = ["setting", *metrics, "note"]
        table = [[r["setting"], *(_number(r.get(m), m) for m in metrics),
                  next((v for k, v in notes.items() if r["setting"].startswith(k)), "")] for r in rows]
        image = _curves(client, study, rows, out)
        grids = _comparison_grids(client, rows, out, name)
        extra = {k: v for k, v in run.data.metrics.items()}
        md += [f"Settings: {settings} (MLflow run `{run.info.run_id}`)", "",
               "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
               *("| " + " | ".join(r) + " |" for r in table), "", f"![{name} curves]({image})", "",
               *(f"![{name}: hazy | output | clear]({g})" for g in grids), "",
               "**Conclusion.** " + conclusion, ""]
        if extra:
            md += ["Measurements: " + ", ".join(f"{k} = {v:.3g}" for k, v in sorted(extra.items())), ""]
        body += [f"<p>Settings: {html.escape(settings)} (MLflow run <code>{run.info.run_id}</code>)</p>",
                 "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
                 *("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table), "</table>",
                 f'<p><img src="{image}" alt="{html.escape(name)} curves"></p>',
                 *(f'<p><img src="{g}" alt="{html.escape(name)}: hazy | output | clear"></p>' for g in grids),
                 f"<p><strong>Conclusion.</strong> {html.escape(conclusion)}</p>"]
        if extra:
            body.append("<p>Measurements: " + html.escape(", ".join(f"{k} = {v:.3g}" for k, v in sorted(extra.items()))) + "</p>")
    (out / "README.md").write_text("\n".join(md) + "\n")
    (out / "index.html").write_text("<!doctype html><meta charset=utf-8><title>roadsight lab report</title>"
                                    "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
                                    + "\n".join(body) + "</body>\n")
    return out / "index.html"
