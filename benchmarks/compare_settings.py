"""Service settings against each other, interleaved: one server per variant (its own ROADSIGHT_* or
BentoML environment), all started before the first window, then rounds in which every variant gets
one wrk window on the same route, the order rotating each round. This machine's speed drifts by 20%
within minutes, so a difference counts only where it holds round after round: each variant's rate
is reported per round and as a median, with its ratio to the first variant's rate in the same round
(median and range), and the worker's CPU per request. ``--commit REV`` adds the service of an
earlier commit with the default settings (a detached worktree, this checkout's environment and
models/), so that a change is measured against what came before it in the same interleaved way.

    .venv/bin/python -m benchmarks.compare_settings --variant one-run ROADSIGHT_PARALLEL_RUNS=1
    .venv/bin/python -m benchmarks.compare_settings --route /dehaze --connections 4 \\
        --variant one-run ROADSIGHT_PARALLEL_RUNS=1
    .venv/bin/python -m benchmarks.compare_settings --commit b13b2b0 --rounds 6

The first variant is the service's defaults (``default``, no extra setting) unless ``--no-default``.
Results go to benchmarks/results/compare_settings-<time>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

from .common import MODELS, REPO, checkout, command_line, machine, save_result, utc_now
from .server import bentoml_serve
from .serving_load import classify_uploads, dehaze_uploads, format_row
from .wrk import ensure_wrk, measure


def parse_variant(words: list[str]) -> tuple[str, dict[str, str]]:
    name, *settings = words
    if any("=" not in setting for setting in settings):
        raise SystemExit(f"--variant {' '.join(words)}: settings are NAME=VALUE")
    return name, dict(setting.split("=", 1) for setting in settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "SETTING"),
                        help="a name and its NAME=VALUE environment settings (repeatable)")
    parser.add_argument("--commit", action="append", default=[], metavar="REV",
                        help="also the service of this earlier commit, default settings (repeatable)")
    parser.add_argument("--no-default", action="store_true", help="no `default` variant first")
    parser.add_argument("--route", default="/classify", choices=["/classify", "/dehaze"])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--window", type=float, default=8, help="seconds of each window (default 8)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds per server before round 1")
    args = parser.parse_args()
    variants = dict([("default", {})] * (not args.no_default) + [parse_variant(words) for words in args.variant])
    if len(variants) + len(args.commit) < 2:
        raise SystemExit("give at least two variants to compare")
    ensure_wrk()
    if args.route == "/dehaze":
        uploads, megapixels, _ = dehaze_uploads()
    else:
        uploads, megapixels = classify_uploads(), 0.0
    model = "dehazer" if args.route == "/dehaze" else "classifier"
    key = "megapixels_per_s" if megapixels else "throughput_rps"
    result = {"date": utc_now(), "command": command_line("benchmarks.compare_settings"), "machine": machine(),
              "route": args.route, "connections": args.connections, "variants": variants,
              "commits": args.commit, "rounds": []}
    with contextlib.ExitStack() as stack:
        trees = {**{name: REPO for name in variants},
                 **{f"commit-{rev}": stack.enter_context(checkout(rev)) for rev in args.commit}}
        env_of = {**variants, **{name: {"ROADSIGHT_MODELS_DIR": str(MODELS)} for name in trees if name not in variants}}
        names = list(trees)
        servers = {name: stack.enter_context(bentoml_serve(env=env_of[name], cwd=trees[name])) for name in names}
        for name in names:
            measure(servers[name].url, args.route, uploads, args.connections, 0, args.warmup, servers[name].pid)
        for index in range(args.rounds):
            rows = {}
            for name in names[index % len(names):] + names[:index % len(names)]:
                server = servers[name]
                rows[name] = measure(server.url, args.route, uploads, args.connections, 0, args.window, server.pid,
                                     megapixels, model)
                requests = rows[name]["requests_ok"] or 1
                rows[name]["server_cpu_ms_per_request"] = round(
                    rows[name]["server_cpu_cores"] * rows[name]["window_s"] * 1000 / requests, 2)
                print(f"round {index + 1} {name:<12} {format_row(rows[name])}  "
                      f"{rows[name]['server_cpu_ms_per_request']} ms CPU/request", flush=True)
            result["rounds"].append(rows)
    first = names[0]
    summary = {}
    for name in names:
        rates = [rows[name][key] for rows in result["rounds"]]
        relative = [rows[name][key] / rows[first][key] for rows in result["rounds"] if rows[first][key]]
        summary[name] = {key: round(statistics.median(rates), 3), "rounds": rates,
                         f"over_{first}": {"median": round(statistics.median(relative), 3),
                                           "min": round(min(relative), 3), "max": round(max(relative), 3)},
                         "server_cpu_ms_per_request": statistics.median(
                             rows[name]["server_cpu_ms_per_request"] for rows in result["rounds"])}
        print(f"{name:<12} median {summary[name][key]} {key}; / {first} per round: median "
              f"{summary[name][f'over_{first}']['median']} (range {summary[name][f'over_{first}']['min']}-"
              f"{summary[name][f'over_{first}']['max']}); {summary[name]['server_cpu_ms_per_request']} ms CPU/request")
    result["summary"] = summary
    result["machine_after"] = machine()
    print("saved", save_result("compare_settings", result))


if __name__ == "__main__":
    main()
