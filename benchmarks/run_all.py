"""Every benchmark of the serving and training performance goals, side by side in one run on one
machine: in-process onnxruntime vs torch eager, the training step of P4, the served concurrency
sweeps, the service with batching off and the naive per-request server. One JSON goes to
benchmarks/results/run_all-<time>.json and the P1-P5 table is printed at the end.

    .venv/bin/python -m benchmarks.run_all              # the full measurement (about 15 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run_all --quick      # smoke test (2-4 minutes)
    .venv/bin/python -m benchmarks.run_all --window 30 --concurrency 1 8 32 64 --dehaze-concurrency 1 4

Run it on an otherwise idle machine: every figure shares the same cores with whatever else runs.
"""
from __future__ import annotations

import argparse

from . import inference, training_step
from .common import command_line, machine, save_result, service_settings, utc_now
from .load import run_window
from .serving_load import add_load_arguments, apply_quick, classify_uploads, format_row, serving_sweeps
from .server import SERVICE, bentoml_serve, running

P1_CONCURRENCY = 32
P5_CONCURRENCY = 4  # keeps the worker's one dehazing slot busy while the next uploads are decoded
BATCHING_OFF = {"ROADSIGHT_MAX_BATCH_SIZE": "1"}
NAIVE_SERVER = ["-m", "uvicorn", "benchmarks.naive_server:app", "--log-level", "warning"]


def at_concurrency(rows: list[dict], concurrency: int) -> dict:
    return next(row for row in rows if row["concurrency"] == concurrency)


def ratios(result: dict) -> list[dict]:
    """P1-P5 from the measured figures: value, goal, whether it is met and what it was computed from."""
    served = at_concurrency(result["service"]["/classify"], P1_CONCURRENCY)
    unbatched, naive = result["service_batching_off"], result["naive_server"]
    ceiling = result["inference"]["ceiling_images_per_s"]
    dehaze = at_concurrency(result["service"]["/dehaze"], P5_CONCURRENCY)
    steps = result["training_step"]

    def ratio(numerator: float, denominator: float) -> float | None:
        return round(numerator / denominator, 2) if denominator else None

    p1 = ratio(served["throughput_rps"], ceiling)
    p2 = ratio(served["throughput_rps"], unbatched["throughput_rps"])
    p3 = ratio(served["throughput_rps"], naive["throughput_rps"])
    p4, p5 = steps["hand_over_conv2d"], dehaze["megapixels_per_s"]
    p99 = served["p99_ms"]
    return [
        {"id": "P1", "what": f"served /classify at c={P1_CONCURRENCY} / in-process onnxruntime, batch 32",
         "value": p1, "goal": ">= 0.8 with p99 <= 150 ms", "met": p1 is not None and p1 >= 0.8 and p99 is not None and p99 <= 150,
         "detail": f"{served['throughput_rps']} req/s (p99 {p99} ms, errors {served['errors'] or 0}) vs {ceiling} img/s"},
        {"id": "P2", "what": f"adaptive batching on / off (ROADSIGHT_MAX_BATCH_SIZE=1), /classify at c={P1_CONCURRENCY}",
         "value": p2, "goal": ">= 2.5", "met": p2 is not None and p2 >= 2.5,
         "detail": f"{served['throughput_rps']} vs {unbatched['throughput_rps']} req/s "
                   f"(errors {served['errors'] or 0} / {unbatched['errors'] or 0})"},
        {"id": "P3", "what": f"service / naive FastAPI + torch eager server, /classify at c={P1_CONCURRENCY}",
         "value": p3, "goal": ">= 4", "met": p3 is not None and p3 >= 4,
         "detail": f"{served['throughput_rps']} vs {naive['throughput_rps']} req/s "
                   f"(p99 {p99} / {naive['p99_ms']} ms)"},
        {"id": "P4", "what": f"training step hand_cnn / cnn, batch {steps['batch_size']} at {steps['image_size']} px",
         "value": p4, "goal": "<= 2", "met": p4 <= 2,
         "detail": f"{steps['step_ms']['hand_cnn']} vs {steps['step_ms']['cnn']} ms per step"},
        {"id": "P5", "what": f"served /dehaze megapixels per second at c={P5_CONCURRENCY}, 550x413 photos",
         "value": p5, "goal": ">= 2 MP/s", "met": p5 >= 2,
         "detail": f"{dehaze['throughput_rps']} img/s, p99 {dehaze['p99_ms']} ms, errors {dehaze['errors'] or 0}"},
    ]


def report(result: dict) -> str:
    before, after = result["machine"], result["machine_after"]
    lines = [f"roadsight benchmarks, {result['date']}{' (QUICK: smoke test, not a measurement)' if result['quick'] else ''}",
             f"machine: {before['cpu_model']}, {before['cpu_count']} CPUs ({before['usable_cores']} usable); load average "
             f"(1/5/15 min) {before['load_average_1_5_15']} at start, {after['load_average_1_5_15']} at end",
             f"command: {result['command']}",
             f"servers: bentoml serve {SERVICE} (settings {result['service_settings'] or 'default'}; batching off: "
             "ROADSIGHT_MAX_BATCH_SIZE=1); "
             f"naive: python {' '.join(NAIVE_SERVER)}",
             "", f"{'':<4}{'value':>8}  {'goal':<26}{'met':<5}what: detail"]
    for row in result["ratios"]:
        lines.append(f"{row['id']:<4}{row['value'] if row['value'] is not None else '-':>8}  {row['goal']:<26}"
                     f"{'yes' if row['met'] else 'NO':<5}{row['what']}: {row['detail']}")
    lines += ["", "onnxruntime vs torch eager (in process):", inference.format_table(result["inference"]),
              "", "served sweeps:"]
    lines += [format_row(row) for route in ("/classify", "/dehaze") for row in result["service"][route]]
    lines += [format_row(result["service_batching_off"]) + "  [batching off]",
              format_row(result["naive_server"]) + "  [naive server]"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    args = parser.parse_args()
    apply_quick(args)
    classify_levels = sorted(set(args.concurrency) | {P1_CONCURRENCY})
    dehaze_levels = sorted(set(args.dehaze_concurrency) | {P5_CONCURRENCY})
    result = {"date": utc_now(), "quick": args.quick, "command": command_line("benchmarks.run_all"),
              "machine": machine(), "window_s": args.window, "warmup_s": args.warmup,
              "service_settings": service_settings()}

    print("in-process inference (onnxruntime vs torch eager) ...", flush=True)
    result["inference"] = inference.measure(args.quick)
    print(inference.format_table(result["inference"]), flush=True)
    print("training step (hand_cnn vs cnn) ...", flush=True)
    result["training_step"] = training_step.measure(args.quick)
    print(result["training_step"], flush=True)

    def load_classify(server) -> dict:
        row = run_window(server.url, "/classify", classify_uploads(), P1_CONCURRENCY, args.warmup, args.window, server.pid)
        print(format_row(row), flush=True)
        return {**row, "server_start_s": round(server.started_in_s, 1)}

    print("service sweeps ...", flush=True)
    with bentoml_serve() as server:
        result["service"] = {"server_start_s": round(server.started_in_s, 1),
                             **serving_sweeps(server.url, server.pid, ["/classify", "/dehaze"], classify_levels,
                                              dehaze_levels, args.warmup, args.window)}
    print("service with batching off ...", flush=True)
    with bentoml_serve(env=BATCHING_OFF) as server:
        result["service_batching_off"] = load_classify(server)
    print("naive server ...", flush=True)
    with running(NAIVE_SERVER) as server:
        result["naive_server"] = load_classify(server)

    result["ratios"] = ratios(result)
    result["machine_after"] = machine()
    path = save_result("run_all", result, args.quick)
    print("\n" + report(result))
    print("saved", path)


if __name__ == "__main__":
    main()
