"""What every benchmark shares: where the data and models are, the machine it ran on, timing, results."""
from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ROADSIGHT_MODELS_DIR") or REPO / "models")  # what the started services serve
RESULTS = Path(__file__).resolve().parent / "results"
FULL_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "tests" / "data"


def data_root(kind: str) -> Path:
    """The full course data when this machine has it, else the in-repo sample (``kind``: vehicles, dehaze)."""
    return FULL_DATA / kind if (FULL_DATA / kind).is_dir() else SAMPLE_DATA / kind


def vehicle_images(count: int) -> list[Path]:
    """``count`` real vehicle photos spread evenly over the classes and file names."""
    paths = sorted(data_root("vehicles").glob("*/*.jpg"))
    step = max(1, len(paths) // count)
    return paths[::step][:count]


@contextlib.contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """A detached git worktree of ``commit`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="roadsight-before-") as folder:
        tree = Path(folder) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)


def machine() -> dict:
    """Enough to tell two runs' machines apart, and how busy this one was when it started."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "platform": platform.platform()}


def service_settings() -> dict[str, str]:
    """The ROADSIGHT_* environment every server started here inherits."""
    return {name: value for name, value in os.environ.items() if name.startswith("ROADSIGHT_")}


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each call over ``repeats`` rounds, after ``warmup`` untimed rounds.

    The calls take turns within each round, so a background job that speeds up or slows down the
    machine mid-run weighs on every contender alike; the median shrugs off the odd slow call.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def process_tree_cpu_seconds(pid: int | None) -> float:
    """CPU time used so far by process ``pid`` and its children (0 when not given or gone)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def machine_busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def observed_batches(info: dict, model: str = "classifier") -> collections.Counter:
    """Sizes of the service's onnxruntime runs so far (``/info``), as {batch size: runs}."""
    histogram = info.get("batching", {}).get(model, {}).get("observed", {}).get("histogram", {})
    return collections.Counter({int(size): count for size, count in histogram.items()})


def batch_summary(histogram: collections.Counter) -> dict:
    runs = sum(histogram.values())
    images = sum(size * count for size, count in histogram.items())
    return {"runs": runs, "mean": round(images / runs, 2) if runs else 0.0, "max": max(histogram, default=0),
            "histogram": {str(size): histogram[size] for size in sorted(histogram)}}


def command_line(module: str) -> str:
    """How this run was started, to print beside its figures."""
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def save_result(kind: str, result: dict, quick: bool = False) -> Path:
    """Write ``result`` to benchmarks/results/<kind>-<UTC time>[-quick].json and return the path."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{kind}-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
