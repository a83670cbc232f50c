"""Every benchmark of the serving and training performance goals, side by side in one run on one
machine. First the goals: the burst test on a fresh server, then P1, P2 and P5 measured in rounds
that alternate short in-process windows (the ceiling) with short served windows (the service, the
same service with batching off, /dehaze), A-B-A-B, so that each served window is held against the
ceiling measured just before and just after it: this machine's own speed drifts by 20% within
minutes, so one ceiling minutes away from the served figure decides nothing. Each goal is the median
of its rounds' ratios, given with their range. Then the rest: the in-process table and request
costs, the served concurrency sweeps (wrk), the naive per-request server, onnxruntime vs torch eager
and the training step of P4. One JSON goes to benchmarks/results/run_all-<time>.json and the goals
table is printed at the end.

    .venv/bin/python -m benchmarks.run_all              # the full measurement (about 12 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run_all --quick      # smoke test (3-4 minutes)
    .venv/bin/python -m benchmarks.run_all --rounds 7 --round-window 10 --window 30 --concurrency 1 8 32 64

Run it on an otherwise idle machine (here: through /work/coord/quiet.sh): every figure shares the
same cores with whatever else runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from . import ceiling, inference, training_step
from .common import command_line, machine, save_result, service_settings, utc_now
from .serving_load import add_load_arguments, apply_quick, classify_uploads, dehaze_uploads, format_row, serving_sweeps
from .server import SERVICE, bentoml_serve, running
from .wrk import ensure_wrk, measure

P1_CONCURRENCY = 32
P5_CONCURRENCY = 4  # four cameras posting frames of one size
BURST_S = 20  # the burst the single client comes after
AFTER_BURST_S = 5  # ... and the window right after it
BATCHING_OFF = {"ROADSIGHT_MAX_BATCH_SIZE": "1"}
NAIVE_SERVER = ["-m", "uvicorn", "benchmarks.naive_server:app", "--log-level", "warning"]
CEILING_WINDOW_S = 4  # each in-process window of a round


def spread(values: list[float]) -> dict:
    """Median and range of the rounds' ratios."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": [round(v, 3) for v in values]}


def round_ratios(rounds: list[dict], ceilings: list[dict]) -> dict:
    """Each round's served figure over the mean of the ceilings measured just before and just after it."""
    def around(index: int, key: str) -> float:
        return (ceilings[index][key] + ceilings[index + 1][key]) / 2

    p1 = [r["p1"]["throughput_rps"] / around(i, "classifier_batch32") for i, r in enumerate(rounds)]
    p2 = [r["p1"]["throughput_rps"] / r["batching_off"]["throughput_rps"] / around(i, "batch32_over_batch1")
          for i, r in enumerate(rounds)]
    p5 = [r["p5"]["megapixels_per_s"] / around(i, "dehazer_batch1") for i, r in enumerate(rounds)]
    return {"p1": spread(p1), "p2": spread(p2), "p5": spread(p5)}


def ceiling_window(models: ceiling.Models, seconds: float) -> dict:
    """P1's, P2's and P5's in-process figures in one short window: the faster way (one run or side by
    side, as ceiling.py explains) of each."""
    rates = models.rates(models.names("classifier-32") + models.names("classifier-1"), seconds)
    rates.update(models.rates(models.names("dehazer-1"), seconds / 2))

    def best(prefix: str) -> float:
        return max(rates[name] for name in models.names(prefix))

    return {"rates": rates, "classifier_batch32": best("classifier-32"), "dehazer_batch1": best("dehazer-1"),
            "batch32_over_batch1": round(best("classifier-32") / best("classifier-1"), 3)}


def alternate(models: ceiling.Models, server, unbatched, rounds: int, window_s: float, warmup_s: float,
              ceiling_s: float) -> dict:
    """``rounds`` rounds of: in-process window, /classify at c=32, the same with batching off, /dehaze
    at c=4 (550x413); and a last in-process window. Every served window is preceded by a warm-up in
    the first round only."""
    uploads = classify_uploads()
    hazy, megapixels, source = dehaze_uploads()
    ceilings, served = [], []
    for index in range(rounds):
        warmup = warmup_s if index == 0 else 0
        ceilings.append(ceiling_window(models, ceiling_s))
        row = {"p1": measure(server.url, "/classify", uploads, P1_CONCURRENCY, warmup, window_s, server.pid),
               "batching_off": measure(unbatched.url, "/classify", uploads, P1_CONCURRENCY, warmup, window_s,
                                       unbatched.pid),
               "p5": measure(server.url, "/dehaze", hazy, P5_CONCURRENCY, warmup, window_s, server.pid, megapixels,
                             "dehazer")}
        served.append(row)
        print(f"round {index + 1}/{rounds}: in process {ceilings[-1]['classifier_batch32']} img/s (batch 32), "
              f"{ceilings[-1]['dehazer_batch1']} MP/s; served {row['p1']['throughput_rps']} req/s, batching off "
              f"{row['batching_off']['throughput_rps']} req/s, /dehaze {row['p5']['megapixels_per_s']} MP/s", flush=True)
    ceilings.append(ceiling_window(models, ceiling_s))
    return {"ceilings": ceilings, "served": served, "dehaze_images": source, "window_s": window_s,
            "ceiling_window_s": ceiling_s, "ratios": round_ratios(served, ceilings)}


def ratios(result: dict) -> list[dict]:
    """The goals from the measured figures: value (the median of the rounds), goal, whether it is met
    and what it was computed from."""
    alternation, naive, burst = result["alternation"], result["naive_server"], result["burst"]
    goals = alternation["ratios"]
    served = [r["p1"] for r in alternation["served"]]
    unbatched = [r["batching_off"] for r in alternation["served"]]
    dehaze = [r["p5"] for r in alternation["served"]]
    ceilings = alternation["ceilings"]
    steps = result["training_step"]

    def median(rows: list[dict], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 2)

    def errors(rows: list[dict]) -> str:
        failed = sum(sum(row["errors"].values()) for row in rows if row["errors"])
        return f"{failed}, other jobs' CPU up to {max(row.get('other_cpu_cores') or 0 for row in rows)} cores"

    def interval(goal: dict) -> str:
        return f"range {goal['min']}-{goal['max']} over {len(goal['rounds'])} rounds"

    fresh, after = burst["fresh"]["p50_ms"], burst["after_burst"]["p50_ms"]
    naive_ratio = round(median(served, "throughput_rps") / naive["throughput_rps"], 2) if naive["throughput_rps"] else None
    return [
        {"id": "P1", "what": f"served /classify at c={P1_CONCURRENCY} / in-process onnxruntime, batch 32",
         "value": goals["p1"]["median"], "goal": ">= 0.75", "met": goals["p1"]["median"] >= 0.75,
         "detail": f"{interval(goals['p1'])}; served {median(served, 'throughput_rps')} req/s (p50 "
                   f"{median(served, 'p50_ms')}, p99 {median(served, 'p99_ms')} ms, errors {errors(served)}) vs "
                   f"{median(ceilings, 'classifier_batch32')} img/s in process (medians of the rounds)"},
        {"id": "P2", "what": f"batching on / off at c={P1_CONCURRENCY}, over the in-process batch 32 / batch 1 gain",
         "value": goals["p2"]["median"], "goal": ">= 0.9", "met": goals["p2"]["median"] >= 0.9,
         "detail": f"{interval(goals['p2'])}; {median(served, 'throughput_rps')} vs "
                   f"{median(unbatched, 'throughput_rps')} req/s (errors {errors(unbatched)}) vs in-process gain "
                   f"{median(ceilings, 'batch32_over_batch1')}"},
        {"id": "P3", "what": f"service / naive FastAPI + torch eager server, /classify at c={P1_CONCURRENCY}",
         "value": naive_ratio, "goal": ">= 4", "met": naive_ratio is not None and naive_ratio >= 4,
         "detail": f"{median(served, 'throughput_rps')} (median of the rounds) vs {naive['throughput_rps']} req/s "
                   f"(p99 {median(served, 'p99_ms')} / {naive['p99_ms']} ms)"},
        {"id": "P4", "what": f"training step hand_cnn / cnn, batch {steps['batch_size']} at {steps['image_size']} px",
         "value": steps["hand_over_conv2d"], "goal": "<= 2", "met": steps["hand_over_conv2d"] <= 2,
         "detail": f"{steps['step_ms']['hand_cnn']} vs {steps['step_ms']['cnn']} ms per step"},
        {"id": "P5", "what": f"served /dehaze MP/s at c={P5_CONCURRENCY} (550x413) / in-process onnxruntime, batch 1",
         "value": goals["p5"]["median"], "goal": ">= 0.8", "met": goals["p5"]["median"] >= 0.8,
         "detail": f"{interval(goals['p5'])}; served {median(dehaze, 'megapixels_per_s')} MP/s "
                   f"({median(dehaze, 'throughput_rps')} img/s, p99 {median(dehaze, 'p99_ms')} ms, errors "
                   f"{errors(dehaze)}) vs {median(ceilings, 'dehazer_batch1')} MP/s in process"},
        {"id": "B", "what": f"/classify p50 at c=1: fresh server / within {AFTER_BURST_S} s after a {BURST_S} s "
                            f"burst at c={P1_CONCURRENCY}",
         "value": max(fresh, after), "goal": "<= 20 ms both", "met": max(fresh, after) <= 20,
         "detail": f"{fresh} / {after} ms (p99 {burst['fresh']['p99_ms']} / {burst['after_burst']['p99_ms']} ms)"},
    ]


def burst_test(server, window_s: float, quick: bool) -> dict:
    """A single client on a fresh server, then a burst at c=32, then the single client again at once."""
    uploads = classify_uploads()
    fresh = measure(server.url, "/classify", uploads, 1, 0, window_s, server.pid)
    burst = measure(server.url, "/classify", uploads, P1_CONCURRENCY, 0, 2 if quick else BURST_S, server.pid)
    after = measure(server.url, "/classify", uploads, 1, 0, 2 if quick else AFTER_BURST_S, server.pid)
    for row in (fresh, burst, after):
        print(format_row(row), flush=True)
    return {"fresh": fresh, "burst": burst, "after_burst": after}


def report(result: dict) -> str:
    before, after = result["machine"], result["machine_after"]
    lines = [f"roadsight benchmarks, {result['date']}{' (QUICK: smoke test, not a measurement)' if result['quick'] else ''}",
             f"machine: {before['cpu_model']}, {before['cpu_count']} CPUs ({before['usable_cores']} usable); load average "
             f"(1/5/15 min) {before['load_average_1_5_15']} at start, {after['load_average_1_5_15']} at end",
             f"command: {result['command']}",
             f"servers: bentoml serve {SERVICE} (settings {result['service_settings'] or 'default'}; batching off: "
             "ROADSIGHT_MAX_BATCH_SIZE=1); "
             f"naive: python {' '.join(NAIVE_SERVER)}; load: wrk",
             "", f"{'':<4}{'value':>8}  {'goal':<16}{'met':<5}what: detail"]
    for row in result["ratios"]:
        lines.append(f"{row['id']:<4}{row['value'] if row['value'] is not None else '-':>8}  {row['goal']:<16}"
                     f"{'yes' if row['met'] else 'NO':<5}{row['what']}: {row['detail']}")
    lines += ["", "rounds (in process, then served):"]
    for index, row in enumerate(result["alternation"]["served"]):
        lines += [f"in process: {result['alternation']['ceilings'][index]['rates']}",
                  format_row(row["p1"]), format_row(row["batching_off"]) + "  [batching off]", format_row(row["p5"])]
    lines += [f"in process: {result['alternation']['ceilings'][-1]['rates']}",
              "", "in-process onnxruntime:", ceiling.format_table(result["ceiling"]),
              "", "onnxruntime vs torch eager (in process):", inference.format_table(result["inference"]),
              "", "burst test (fresh server):"]
    lines += [format_row(result["burst"][key]) for key in ("fresh", "burst", "after_burst")]
    lines += ["", "served sweeps:"]
    lines += [format_row(row) for route in ("/classify", "/dehaze") for row in result["service"][route]]
    lines += [format_row(result["naive_server"]) + "  [naive server]"]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The README tables of a run: the goals, the rounds, the in-process figures and the served sweeps."""
    def cell(value) -> str:
        return "-" if value is None else str(value)

    lines = ["| | value | goal | met | from |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {row['id']} | {cell(row['value'])} | {row['goal']} | {'yes' if row['met'] else 'no'} | "
              f"{row['what']}: {row['detail']} |" for row in result["ratios"]]
    alternation = result["alternation"]
    ceilings, served = alternation["ceilings"], alternation["served"]
    goals = alternation["ratios"]
    lines += ["", "| round | " + " | ".join(str(i + 1) for i in range(len(served))) + " |",
              "| --- |" + " --- |" * len(served),
              "| in process before: classifier batch 32 (img/s) | "
              + " | ".join(str(round(c["classifier_batch32"], 1)) for c in ceilings[:-1]) + " |",
              "| served `/classify`, c=32 (req/s) | " + " | ".join(str(r["p1"]["throughput_rps"]) for r in served) + " |",
              "| P1 (against the mean of the ceilings before and after) | " + " | ".join(map(str, goals["p1"]["rounds"])) + " |",
              "| batching off, c=32 (req/s) | " + " | ".join(str(r["batching_off"]["throughput_rps"]) for r in served) + " |",
              "| P2 | " + " | ".join(map(str, goals["p2"]["rounds"])) + " |",
              "| in process before: dehazer batch 1 (MP/s) | "
              + " | ".join(str(round(c["dehazer_batch1"], 2)) for c in ceilings[:-1]) + " |",
              "| served `/dehaze`, c=4 (MP/s) | " + " | ".join(str(r["p5"]["megapixels_per_s"]) for r in served) + " |",
              "| P5 | " + " | ".join(map(str, goals["p5"]["rounds"])) + " |",
              f"\n(in process after the last round: {round(ceilings[-1]['classifier_batch32'], 1)} img/s, "
              f"{round(ceilings[-1]['dehazer_batch1'], 2)} MP/s)"]
    table = result["ceiling"]
    lines += ["", "| in process | batch | runs at once x intra-op threads | ms per call | items/s |",
              "| --- | --- | --- | --- | --- |"]
    for model in ("classifier", "dehazer"):
        for row in table[model]:
            threads = table["threads"] if row.get("runs_at_once", 1) == 1 else table["threads_per_parallel_run"]
            unit = " (MP/s " + str(row["megapixels_per_s"]) + ")" if "megapixels_per_s" in row else ""
            lines.append(f"| {model} | {row['batch']} | {row.get('runs_at_once', 1)} x {threads} | "
                         f"{row['onnxruntime_ms']} | {row['onnxruntime_items_per_s']}{unit} |")
    for key, value in table["request_costs_ms"].items():
        lines.append(f"| per request: {key.replace('_ms', '').replace('_', ' ')} | | 1 thread | {value} | |")
    for route in ("/classify", "/dehaze"):
        rows = result["service"][route]
        lines += ["", f"| `{route}` connections | " + " | ".join(str(r["concurrency"]) for r in rows) + " |",
                  "| --- |" + " --- |" * len(rows),
                  "| req/s | " + " | ".join(str(r["throughput_rps"]) for r in rows) + " |",
                  "| p50 / p99 ms | " + " | ".join(f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}" for r in rows) + " |",
                  "| mean batch | " + " | ".join(str(r.get("batch_sizes", {}).get("mean", "-")) for r in rows) + " |",
                  "| CPU cores: server / wrk / others | " + " | ".join(
                      f"{r['server_cpu_cores']} / {r['client_cpu_cores']} / {r.get('other_cpu_cores', '-')}"
                      for r in rows) + " |"]
        if route == "/dehaze":
            lines.append("| MP/s | " + " | ".join(str(r["megapixels_per_s"]) for r in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for P1, P2 and P5 (default 5)")
    parser.add_argument("--round-window", type=float, default=8,
                        help="seconds of each served window in a round (default 8; in-process windows: 4)")
    parser.add_argument("--tables", type=Path, help="print the README tables of this run's JSON and stop")
    args = parser.parse_args()
    if args.tables:
        print(markdown(json.loads(args.tables.read_text())))
        return
    apply_quick(args)
    if args.quick:
        args.rounds, args.round_window = 2, 2.0
    ensure_wrk()
    result = {"date": utc_now(), "quick": args.quick, "command": command_line("benchmarks.run_all"),
              "machine": machine(), "window_s": args.window, "warmup_s": args.warmup,
              "service_settings": service_settings()}

    print("the goals: burst test on a fresh server, then rounds of in-process and served windows ...", flush=True)
    models = ceiling.Models(args.quick)
    with bentoml_serve() as server, bentoml_serve(env=BATCHING_OFF) as unbatched:
        result["burst"] = burst_test(server, args.window, args.quick)
        result["alternation"] = alternate(models, server, unbatched, args.rounds, args.round_window, args.warmup,
                                          1 if args.quick else CEILING_WINDOW_S)
    print("in-process onnxruntime and the work of a request outside the model ...", flush=True)
    result["ceiling"] = models.measure(3 if args.quick else 15)
    print(ceiling.format_table(result["ceiling"]), flush=True)

    print("served sweeps ...", flush=True)
    with bentoml_serve() as server:
        result["service"] = {"server_start_s": round(server.started_in_s, 1),
                             **serving_sweeps(server.url, server.pid, ["/classify", "/dehaze"], args.concurrency,
                                              args.dehaze_concurrency, args.warmup, args.window)}
    print("naive server ...", flush=True)
    with running(NAIVE_SERVER) as server:
        result["naive_server"] = measure(server.url, "/classify", classify_uploads(), P1_CONCURRENCY, args.warmup,
                                         args.window, server.pid)
        print(format_row(result["naive_server"]), flush=True)
    print("in-process onnxruntime vs torch eager ...", flush=True)
    result["inference"] = inference.measure(args.quick)
    print(inference.format_table(result["inference"]), flush=True)
    print("training step (hand_cnn vs cnn) ...", flush=True)
    result["training_step"] = training_step.measure(args.quick)
    print(result["training_step"], flush=True)

    result["ratios"] = ratios(result)
    result["machine_after"] = machine()
    path = save_result("run_all", result, args.quick)
    print("\n" + report(result))
    print("\n" + markdown(result))
    print("saved", path)


if __name__ == "__main__":
    main()
