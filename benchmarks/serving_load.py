"""Concurrency sweep of the served /classify and /dehaze with wrk (benchmarks/wrk.py): p50/p90/p99
latency, throughput, answers by status, the CPU cores of wrk and of the server, and the onnxruntime
batch sizes the service observed, per level, in fixed time windows.

    .venv/bin/python -m benchmarks.serving_load                       # starts bentoml serve on a free port
    .venv/bin/python -m benchmarks.serving_load --url http://127.0.0.1:3000 --routes /classify \\
        --concurrency 1 8 32 --window 10                              # an already running server

Results go to benchmarks/results/serving_load-<time>.json. ``benchmarks.run_all`` runs this sweep
as part of the P1-P5 measurement.
"""
from __future__ import annotations

import argparse
import io

from PIL import Image

from .common import (MODELS, command_line, data_root, machine, save_result, service_settings, utc_now,
                     vehicle_images)
from .load import Upload
from .server import SERVICE, bentoml_serve
from .wrk import measure

DEHAZE_SIZE = (550, 413)  # the course dehazing photos' size


def classify_uploads(count: int = 64) -> list[Upload]:
    return [Upload("image", path.name, path.read_bytes()) for path in vehicle_images(count)]


def dehaze_uploads(count: int = 16, size: tuple[int, int] = DEHAZE_SIZE) -> tuple[list[Upload], float, str]:
    """Hazy photos of one ``size`` (default: the course's 550x413, one camera's frames), the
    megapixels of each and where they came from. Photos of other sizes (the in-repo sample is a
    quarter size) are resized to it."""
    paths = sorted((data_root("dehaze") / "hazy").glob("*.jpg"))
    paths = paths[:: max(1, len(paths) // count)][:count]
    uploads = []
    for path in paths:
        image = Image.open(path)
        if image.size == size:
            data = path.read_bytes()
        else:
            buffer = io.BytesIO()
            image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
            data = buffer.getvalue()
        uploads.append(Upload("image", path.name, data))
    resized = sum(Image.open(path).size != size for path in paths)
    source = f"{paths[0].parent}" + (f" ({resized} of {len(paths)} resized to {size[0]}x{size[1]})" if resized else "")
    return uploads, size[0] * size[1] / 1e6, source


def sweep(url: str, route: str, uploads: list[Upload], concurrencies: list[int], warmup_s: float, window_s: float,
          server_pid: int | None = None, megapixels_per_request: float = 0.0) -> list[dict]:
    """One measured window per concurrency level, each printed as it finishes."""
    model = "dehazer" if route == "/dehaze" else "classifier"
    rows = []
    for concurrency in concurrencies:
        row = measure(url, route, uploads, concurrency, warmup_s, window_s, server_pid, megapixels_per_request, model)
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    batches = row.get("batch_sizes")
    middle = "p90" if "p90_ms" in row else "p95"  # wrk's percentiles, or the aiohttp client's
    text = (f"{row['route']:<10} c={row['concurrency']:<3} {row['throughput_rps']:8.2f} req/s  "
            f"p50 {row['p50_ms']} {middle} {row[middle + '_ms']} p99 {row['p99_ms']} ms  errors {row['errors'] or 0}  "
            f"cpu server/client {row['server_cpu_cores']}/{row['client_cpu_cores']}")
    if "other_cpu_cores" in row:
        text += f"/other {row['other_cpu_cores']}"
    if "megapixels_per_s" in row:
        text += f"  {row['megapixels_per_s']} MP/s"
    if batches and batches["runs"]:
        text += f"  batch mean {batches['mean']} max {batches['max']}"
    return text


def serving_sweeps(url: str, server_pid: int | None, routes: list[str], concurrency: list[int],
                   dehaze_concurrency: list[int], warmup_s: float, window_s: float) -> dict:
    """The sweep of each route, keyed by route."""
    results = {}
    if "/classify" in routes:
        results["/classify"] = sweep(url, "/classify", classify_uploads(), concurrency, warmup_s, window_s, server_pid)
    if "/dehaze" in routes:
        uploads, megapixels, source = dehaze_uploads()
        results["/dehaze"] = sweep(url, "/dehaze", uploads, dehaze_concurrency, warmup_s, window_s, server_pid,
                                   megapixels)
        results["dehaze_images"] = source
    return results


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, default=15, help="measured seconds per level (default 15)")
    parser.add_argument("--warmup", type=float, default=5, help="unmeasured seconds before each window (default 5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64],
                        help="/classify concurrency levels (default 1 8 32 64)")
    parser.add_argument("--dehaze-concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="/dehaze concurrency levels (default 1 4 16)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 s windows after 1 s warm-ups, levels 1 and 32 (/dehaze: 1 and 4)")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.window, args.warmup, args.concurrency, args.dehaze_concurrency = 2.0, 1.0, [1, 32], [1, 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start bentoml serve on a free port)")
    parser.add_argument("--service", default=SERVICE,
                        help=f"what bentoml serve starts (default {SERVICE}; batching off: set ROADSIGHT_MAX_BATCH_SIZE=1)")
    parser.add_argument("--routes", nargs="+", default=["/classify", "/dehaze"], choices=["/classify", "/dehaze"])
    add_load_arguments(parser)
    args = parser.parse_args()
    apply_quick(args)
    result = {"date": utc_now(), "command": command_line("benchmarks.serving_load"), "machine": machine(),
              "server": args.url or args.service, "models_dir": str(MODELS), "service_settings": service_settings()}
    if args.url:
        result["sweeps"] = serving_sweeps(args.url, None, args.routes, args.concurrency, args.dehaze_concurrency,
                                          args.warmup, args.window)
    else:
        with bentoml_serve(args.service) as server:
            result["server_start_s"] = round(server.started_in_s, 1)
            result["sweeps"] = serving_sweeps(server.url, server.pid, args.routes, args.concurrency,
                                              args.dehaze_concurrency, args.warmup, args.window)
    print("saved", save_result("serving_load", result, args.quick))


if __name__ == "__main__":
    main()
