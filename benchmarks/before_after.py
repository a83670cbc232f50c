"""The service of an earlier commit against this checkout's, minutes apart with the same wrk load: the
burst test (one connection on the fresh server, 20 s at 32 connections, one connection in the 5 s
right after) and 32 connections after a warm-up. The earlier service runs from a detached git
worktree in a temporary folder, with this checkout's Python environment and models/.

    .venv/bin/python -m benchmarks.before_after [--commit c2a1461]

Results go to benchmarks/results/before_after-<time>.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import MODELS, REPO, checkout, command_line, machine, save_result, utc_now
from .server import bentoml_serve
from .serving_load import classify_uploads, format_row
from .wrk import ensure_wrk, measure


def windows(tree: Path) -> dict:
    """The burst test and 32 connections on the service of ``tree`` (run there, so that its ``serving``
    is the one imported)."""
    uploads = classify_uploads()
    with bentoml_serve(env={"ROADSIGHT_MODELS_DIR": str(MODELS)}, cwd=tree) as running:
        rows = {"fresh_c1": measure(running.url, "/classify", uploads, 1, 0, 10, running.pid),
                "burst_c32": measure(running.url, "/classify", uploads, 32, 0, 20, running.pid),
                "after_burst_c1": measure(running.url, "/classify", uploads, 1, 0, 5, running.pid),
                "c32": measure(running.url, "/classify", uploads, 32, 5, 15, running.pid)}
    for name, row in rows.items():
        print(f"{tree.name:<10} {name:<15} {format_row(row)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="c2a1461", help="the earlier commit (default c2a1461, BentoML's batching)")
    args = parser.parse_args()
    ensure_wrk()
    result = {"date": utc_now(), "command": command_line("benchmarks.before_after"), "machine": machine()}
    with checkout(args.commit) as tree:
        result[f"before {args.commit}"] = windows(tree)
    result["after"] = windows(REPO)
    result["machine_after"] = machine()
    print("saved", save_result("before_after", result))


if __name__ == "__main__":
    main()
