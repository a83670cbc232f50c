"""Every benchmark of the serving and training performance goals, side by side in one run on one
machine. First the goals, within about three minutes so that the machine's state is the same for
all of them: the in-process onnxruntime ceiling, the burst test on a fresh server, P1 and P5 on
that server, the same service with batching off, and the ceiling again. Then the rest: the served
concurrency sweeps (wrk), the naive per-request server, onnxruntime vs torch eager and the training
step of P4. One JSON goes to benchmarks/results/run_all-<time>.json and the goals table is printed
at the end.

    .venv/bin/python -m benchmarks.run_all              # the full measurement (about 12 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run_all --quick      # smoke test (2-4 minutes)
    .venv/bin/python -m benchmarks.run_all --window 30 --concurrency 1 8 32 64 --dehaze-concurrency 1 4

Run it on an otherwise idle machine (here: through /work/coord/quiet.sh): every figure shares the
same cores with whatever else runs.
"""
from __future__ import annotations

import argparse
import json
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


def the_ceiling(result: dict) -> dict:
    """Of the two in-process measurements, the faster at batch 32 (the harder bar for P1)."""
    return max(result["ceiling_before"], result["ceiling_after"], key=lambda c: c["classifier_batch32_images_per_s"])


def ratios(result: dict) -> list[dict]:
    """The goals from the measured figures: value, goal, whether it is met and what it was computed from."""
    served, dehaze = result["p1"], result["p5"]
    unbatched, naive, burst = result["service_batching_off"], result["naive_server"], result["burst"]
    top = the_ceiling(result)
    ceiling32, in_process_gain = top["classifier_batch32_images_per_s"], top["classifier_batch32_over_batch1"]
    steps = result["training_step"]

    def ratio(numerator: float, denominator: float) -> float | None:
        return round(numerator / denominator, 2) if denominator else None

    p1 = ratio(served["throughput_rps"], ceiling32)
    on_off = ratio(served["throughput_rps"], unbatched["throughput_rps"])
    p2 = ratio(on_off, in_process_gain) if on_off else None
    p3 = ratio(served["throughput_rps"], naive["throughput_rps"])
    p4 = steps["hand_over_conv2d"]
    p5 = ratio(dehaze["megapixels_per_s"], top["dehazer_megapixels_per_s"])
    fresh, after = burst["fresh"]["p50_ms"], burst["after_burst"]["p50_ms"]

    def errors(row: dict) -> str:
        return f"{row['errors'] or 0}, other jobs' CPU {row.get('other_cpu_cores', '-')} cores"

    return [
        {"id": "P1", "what": f"served /classify at c={P1_CONCURRENCY} / in-process onnxruntime, batch 32",
         "value": p1, "goal": ">= 0.75", "met": p1 is not None and p1 >= 0.75,
         "detail": f"{served['throughput_rps']} req/s (p50 {served['p50_ms']}, p99 {served['p99_ms']} ms, "
                   f"errors {errors(served)}, mean batch {served.get('batch_sizes', {}).get('mean')}) "
                   f"vs {ceiling32} img/s"},
        {"id": "P2", "what": f"batching on / off at c={P1_CONCURRENCY}, over the in-process batch 32 / batch 1 gain",
         "value": p2, "goal": ">= 0.9", "met": p2 is not None and p2 >= 0.9,
         "detail": f"on/off {on_off} ({served['throughput_rps']} vs {unbatched['throughput_rps']} req/s, "
                   f"errors {errors(served)} / {errors(unbatched)}) vs in-process {in_process_gain}"},
        {"id": "P3", "what": f"service / naive FastAPI + torch eager server, /classify at c={P1_CONCURRENCY}",
         "value": p3, "goal": ">= 4", "met": p3 is not None and p3 >= 4,
         "detail": f"{served['throughput_rps']} vs {naive['throughput_rps']} req/s "
                   f"(p99 {served['p99_ms']} / {naive['p99_ms']} ms)"},
        {"id": "P4", "what": f"training step hand_cnn / cnn, batch {steps['batch_size']} at {steps['image_size']} px",
         "value": p4, "goal": "<= 2", "met": p4 <= 2,
         "detail": f"{steps['step_ms']['hand_cnn']} vs {steps['step_ms']['cnn']} ms per step"},
        {"id": "P5", "what": f"served /dehaze MP/s at c={P5_CONCURRENCY} (550x413) / in-process onnxruntime, batch 1",
         "value": p5, "goal": ">= 0.8", "met": p5 is not None and p5 >= 0.8,
         "detail": f"{dehaze['megapixels_per_s']} MP/s ({dehaze['throughput_rps']} img/s, p99 {dehaze['p99_ms']} ms, "
                   f"errors {errors(dehaze)}) vs {top['dehazer_megapixels_per_s']} MP/s"},
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
    lines += ["", "in-process onnxruntime, before the goals' served runs:", ceiling.format_table(result["ceiling_before"]),
              "... and after them:", ceiling.format_table(result["ceiling_after"]),
              "", "P1, P5 and batching off:", format_row(result["p1"]), format_row(result["p5"]),
              format_row(result["service_batching_off"]) + "  [batching off]",
              "", "onnxruntime vs torch eager (in process):", inference.format_table(result["inference"]),
              "", "burst test (fresh server):"]
    lines += [format_row(result["burst"][key]) for key in ("fresh", "burst", "after_burst")]
    lines += ["", "served sweeps:"]
    lines += [format_row(row) for route in ("/classify", "/dehaze") for row in result["service"][route]]
    lines += [format_row(result["naive_server"]) + "  [naive server]"]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The README tables of a run: the goals, the in-process ceiling and the served sweeps."""
    def cell(value) -> str:
        return "-" if value is None else str(value)

    lines = ["| | value | goal | met | from |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {row['id']} | {cell(row['value'])} | {row['goal']} | {'yes' if row['met'] else 'no'} | "
              f"{row['what']}: {row['detail']} |" for row in result["ratios"]]
    lines += ["", "| in process, 2 intra-op threads | before | after |", "| --- | --- | --- |"]
    before, after = result["ceiling_before"], result["ceiling_after"]
    for key, what in (("classifier_batch1_images_per_s", "classifier, batch 1 (img/s)"),
                      ("classifier_batch32_images_per_s", "classifier, batch 32 (img/s)"),
                      ("dehazer_megapixels_per_s", "dehazer 550x413, batch 1 (MP/s)")):
        lines.append(f"| {what} | {before[key]} | {after[key]} |")
    for key in before["request_costs_ms"]:
        lines.append(f"| per request: {key.replace('_ms', '').replace('_', ' ')} (ms) | "
                     f"{before['request_costs_ms'][key]} | {after['request_costs_ms'][key]} |")
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
    parser.add_argument("--tables", type=Path, help="print the README tables of this run's JSON and stop")
    args = parser.parse_args()
    if args.tables:
        print(markdown(json.loads(args.tables.read_text())))
        return
    apply_quick(args)
    ensure_wrk()
    result = {"date": utc_now(), "quick": args.quick, "command": command_line("benchmarks.run_all"),
              "machine": machine(), "window_s": args.window, "warmup_s": args.warmup,
              "service_settings": service_settings()}

    def load_classify(server) -> dict:
        row = measure(server.url, "/classify", classify_uploads(), P1_CONCURRENCY, args.warmup, args.window, server.pid)
        print(format_row(row), flush=True)
        return {**row, "server_start_s": round(server.started_in_s, 1)}

    print("the goals: in-process ceiling, fresh server (burst test, P1, P5), batching off, ceiling ...", flush=True)
    result["ceiling_before"] = ceiling.measure(args.quick)
    print(ceiling.format_table(result["ceiling_before"]), flush=True)
    with bentoml_serve() as server:
        result["burst"] = burst_test(server, args.window, args.quick)
        result["p1"] = load_classify(server)
        hazy, megapixels, source = dehaze_uploads()
        result["p5"] = {**measure(server.url, "/dehaze", hazy, P5_CONCURRENCY, args.warmup, args.window, server.pid,
                                  megapixels, "dehazer"), "images": source}
        print(format_row(result["p5"]), flush=True)
    with bentoml_serve(env=BATCHING_OFF) as server:
        result["service_batching_off"] = load_classify(server)
    result["ceiling_after"] = ceiling.measure(args.quick)
    print(ceiling.format_table(result["ceiling_after"]), flush=True)

    print("served sweeps ...", flush=True)
    with bentoml_serve() as server:
        result["service"] = {"server_start_s": round(server.started_in_s, 1),
                             **serving_sweeps(server.url, server.pid, ["/classify", "/dehaze"], args.concurrency,
                                              args.dehaze_concurrency, args.warmup, args.window)}
    print("naive server ...", flush=True)
    with running(NAIVE_SERVER) as server:
        result["naive_server"] = load_classify(server)
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
