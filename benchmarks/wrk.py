"""wrk (the C load generator, Debian package ``wrk``) on the served routes: a fixed number of
connections post real images in turn (``wrk_multipart.lua``) for a warm-up and then a measured
window. wrk costs a fraction of a Python client's CPU per request, which matters on a machine whose
few cores the server needs; its own CPU share is recorded beside every result all the same.

``ensure_wrk`` installs the package when it is missing (``apt-get install -y wrk``, as root).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from .common import batch_summary, machine_busy_cpu_seconds, observed_batches, process_tree_cpu_seconds
from .load import Upload

SCRIPT = Path(__file__).with_name("wrk_multipart.lua")


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package first when it is not on PATH."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed: run `sudo apt-get install -y wrk` (Debian/Ubuntu) first")
    print("wrk is not installed: apt-get install -y wrk ...", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
    if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, **quiet)  # no package lists yet
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, **quiet)
    return shutil.which("wrk") or "/usr/bin/wrk"


def run_wrk(url: str, uploads: list[Upload], connections: int, duration_s: float, timeout_s: float = 60) -> dict:
    """One wrk run; its figures (wrk_multipart.lua's JSON) plus the wall time and the CPU seconds
    wrk used (``client_cpu_s``)."""
    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="roadsight-wrk-") as folder:
        files = []
        for index, upload in enumerate(uploads):
            files.append(Path(folder) / f"{index}-{upload.filename}")
            files[-1].write_bytes(upload.data)
        command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={round(timeout_s)}s",
                   "--latency", "-s", str(SCRIPT), url, "--", uploads[0].field, *map(str, files)]
        cpu_before, started = _children_cpu_s(), time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_before
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}")
    return {**json.loads(line[len("WRK_JSON "):]), "wall_s": wall, "client_cpu_s": cpu}


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished (waited-for) children: wrk's, once it has exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _info(base_url: str) -> dict | None:
    try:
        response = httpx.get(base_url + "/info", timeout=30)
        return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


def measure(base_url: str, route: str, uploads: list[Upload], connections: int, warmup_s: float, window_s: float,
            server_pid: int | None = None, megapixels_per_request: float = 0.0, model: str = "classifier") -> dict:
    """``connections`` wrk connections on ``route``: an unmeasured warm-up, then the figures of a
    ``window_s`` window: throughput of 200s, latency percentiles (wrk's, over every answer), answers
    by status, the CPU cores wrk and the server used, and (services with /info) the onnxruntime
    batch sizes of ``model`` during the window."""
    url = base_url + route
    if warmup_s > 0:
        run_wrk(url, uploads, connections, warmup_s)
    before = _info(base_url)
    server_cpu, busy = process_tree_cpu_seconds(server_pid), machine_busy_cpu_seconds()
    run = run_wrk(url, uploads, connections, window_s)
    server_cpu = process_tree_cpu_seconds(server_pid) - server_cpu
    busy = machine_busy_cpu_seconds() - busy
    after = _info(base_url)
    seconds = run["duration_us"] / 1e6
    statuses = {str(status): count for status, count in sorted(run["statuses"].items())}
    ok = statuses.get("200", 0)
    errors = {status: count for status, count in statuses.items() if status != "200"}
    errors.update({name: count for name, count in run["socket_errors"].items() if count})
    latency = run["latency_us"]
    result = {"route": route, "concurrency": connections, "client": "wrk", "window_s": round(seconds, 2),
              "warmup_s": warmup_s, "requests_ok": ok, "errors": errors, "throughput_rps": round(ok / seconds, 2),
              "p50_ms": round(latency["p50"] / 1000, 1), "p90_ms": round(latency["p90"] / 1000, 1),
              "p99_ms": round(latency["p99"] / 1000, 1), "max_ms": round(latency["max"] / 1000, 1),
              "client_cpu_cores": round(run["client_cpu_s"] / run["wall_s"], 3),
              "server_cpu_cores": round(server_cpu / run["wall_s"], 2) if server_pid else None}
    if result["server_cpu_cores"]:
        result["client_cpu_share"] = round(run["client_cpu_s"] / (run["client_cpu_s"] + server_cpu), 3)
        # whatever else ran on the machine meanwhile (other jobs: the window was not measured on an idle machine)
        result["other_cpu_cores"] = round(max(0.0, busy - server_cpu - run["client_cpu_s"]) / run["wall_s"], 2)
    if megapixels_per_request:
        result["megapixels_per_s"] = round(ok * megapixels_per_request / seconds, 3)
    if before is not None and after is not None:
        result["batch_sizes"] = batch_summary(observed_batches(after, model) - observed_batches(before, model))
    return result
