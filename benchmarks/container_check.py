"""Container check (opt-in, not part of `make test`: it needs a Docker engine and a built image).

    make container-check                       # = .venv/bin/python -m benchmarks.container_check --image roadsight:latest
    make container-check FLAVOR=cpu            # the CPU image, roadsight-cpu:latest
    .venv/bin/python -m benchmarks.container_check --image roadsight:latest --gpus all   # on a GPU host: CUDA required

Starts the image on a free loopback port and times it to its first 200 on /readyz; checks a real
/classify (the label and probabilities the shipped model gives in process), /dehaze (an image of
the input's size), a non-image upload (a JSON 4xx), that /info serves the repository's models on the
expected provider, that Docker's HEALTHCHECK turns healthy, and what the image holds (a non-root
user, no compilers or git, the right onnxruntime package). Then it stops the container with
`docker stop` while /classify and /dehaze requests are in flight: each of them must get its answer
or a clean 503, never a reset (SIGTERM drain). The container is removed in every case. Prints the
image size, the time to ready and every answer; exits 1 when a check fails; writes
benchmarks/results/container-<image>-<UTC time>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

from .common import REPO, data_root, machine, save_result, utc_now, vehicle_images
from .load import Upload, post
from .server import free_port

CONTAINER_PORT = 3000
DRAIN_CLASSIFY_CLIENTS = 8
DRAIN_DEHAZE_SIZE = (2000, 1500)  # 3 megapixels: seconds per dehazing on 2 cores, so some are in flight
STOP_AFTER_S = 1.5  # into the drain load, when `docker stop` is sent
# The grace Docker gives between SIGTERM and SIGKILL, as README's `docker run --stop-timeout`: above
# the service's request timeout (ROADSIGHT_TIMEOUT_S, 120 s), so no answer is ever cut. The server
# exits as soon as its requests in flight are answered; Docker's default (10 s) cuts longer ones.
STOP_TIMEOUT_S = 130
DOCKER_TIMEOUT_S = 300  # for any docker command, `docker stop` included


class CheckFailed(AssertionError):
    """A check's answer was wrong; the message says which and what came back."""


def docker(*arguments: str, check: bool = True, timeout: float = DOCKER_TIMEOUT_S) -> str:
    result = subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CheckFailed(f"docker {' '.join(arguments)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def in_process_classification(path: Path) -> dict:
    """What the shipped classifier answers for ``path`` in this process, fed per its JSON contract."""
    from serving import processing, runtime

    model = runtime.load_model(REPO / "models", "classify", threads=1, preference="cpu")
    tensor = processing.classifier_input(processing.decode_image(path.read_bytes()), model.contract["input"])
    (probabilities,) = model.session.run([model.output_name], {model.input_name: tensor[None]})
    return processing.classification(probabilities[0], list(model.contract["labels"]))


def wait_until_ready(name: str, url: str, timeout_s: float) -> float:
    """Seconds from now until /readyz answers 200; fails with the container's log if it exits first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if docker("inspect", "-f", "{{.State.Running}}", name) != "true":
            raise CheckFailed(f"the container exited while starting:\n{docker('logs', '--tail', '40', name, check=False)}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CheckFailed(f"/readyz did not answer 200 within {timeout_s:g} s:\n{docker('logs', '--tail', '40', name, check=False)}")


def check_answers(url: str, provider: str) -> dict:
    """The HTTP checks: /info, /classify, /dehaze and a non-image."""
    answers = {}
    info = httpx.get(url + "/info", timeout=10).json()
    shipped = {name: json.loads((REPO / "models" / name).read_text())["sha256"]
               for name in ("vehicle_classifier.json", "dehazer.json")}
    served = {"vehicle_classifier.json": info["models"]["classifier"]["sha256"],
              "dehazer.json": info["models"]["dehazer"]["sha256"]}
    expect(served == shipped, f"the image serves other models than models/ (rebuild it): {served} != {shipped}")
    answers["info"] = {"provider": info["provider"], "cores": info["runtime"]["cores"],
                       "intra_op_threads": info["runtime"]["intra_op_threads"]}
    expect(provider == "any" or info["provider"] == provider,
           f"/info says the models run on {info['provider']}, expected {provider}")

    photo = vehicle_images(3)[1]  # a real photo, the middle one of three spread over the classes
    response = httpx.post(url + "/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60)
    expect(response.status_code == 200, f"/classify of {photo.name}: {response.status_code} {response.text[:300]}")
    served_answer, expected = response.json(), in_process_classification(photo)
    difference = max(abs(served_answer["probabilities"][k] - expected["probabilities"][k]) for k in expected["probabilities"])
    expect(served_answer["label"] == expected["label"] and difference <= 1e-3,
           f"/classify of {photo.name}: {served_answer}, in process {expected}")
    answers["classify"] = {"file": f"{photo.parent.name}/{photo.name}", "status": response.status_code, **served_answer,
                           "max_probability_difference_to_in_process": float(f"{difference:.2g}")}

    hazy = sorted((data_root("dehaze") / "hazy").glob("*.jpg"))[0]
    size = Image.open(hazy).size
    response = httpx.post(url + "/dehaze", files={"image": (hazy.name, hazy.read_bytes(), "image/jpeg")}, timeout=120)
    expect(response.status_code == 200, f"/dehaze of {hazy.name}: {response.status_code} {response.text[:300]}")
    clear = Image.open(io.BytesIO(response.content))
    expect(clear.size == size and clear.format == "PNG", f"/dehaze of a {size} image gave a {clear.format} of {clear.size}")
    answers["dehaze"] = {"file": f"hazy/{hazy.name}", "status": response.status_code, "input_size": list(size),
                         "output_size": list(clear.size), "format": clear.format,
                         "mean_abs_change": round(float(np.abs(np.asarray(clear.convert("RGB"), np.float32)
                                                               - np.asarray(Image.open(hazy).convert("RGB"), np.float32)).mean()), 2)}

    response = httpx.post(url + "/classify", files={"image": ("notes.txt", b"not an image at all", "text/plain")}, timeout=30)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    expect(400 <= response.status_code < 500 and isinstance(body, dict) and "error" in body,
           f"a non-image upload got {response.status_code} {response.text[:300]}")
    answers["not_an_image"] = {"status": response.status_code, **body}
    return answers


def check_contents(name: str, flavor: str) -> dict:
    """What runs inside: the user, no build tools, the onnxruntime package of the flavour."""
    user = docker("exec", name, "id", "-un")
    uid = int(docker("exec", name, "id", "-u"))
    expect(uid != 0, f"the service runs as root ({user})")
    tools = docker("exec", name, "sh", "-c", "for t in gcc cc g++ make git; do command -v $t; done; true")
    expect(not tools, f"build tools in the runtime image: {tools.split()}")
    listing = docker("exec", name, "python", "-c", "import importlib.metadata as m; "
                     "print('\\n'.join(sorted({d.metadata['Name'].lower() for d in m.distributions()})))").split()
    runtimes = sorted(d for d in listing if d.startswith("onnxruntime"))
    cuda_wheels = sorted(d for d in listing if d.startswith("nvidia-") and d != "nvidia-ml-py")  # NVML bindings: BentoML's
    expect(len(runtimes) == 1, f"one onnxruntime package expected, found {runtimes}")
    if flavor == "cpu":
        expect(runtimes == ["onnxruntime"] and not cuda_wheels, f"CPU image holds {runtimes + cuda_wheels}")
    else:
        expect(runtimes == ["onnxruntime-gpu"] and cuda_wheels, f"GPU image holds {runtimes}, CUDA wheels {cuda_wheels}")
    return {"user": user, "uid": uid, "onnxruntime": runtimes[0], "cuda_wheels": len(cuda_wheels),
            "distributions": len(listing)}


def wait_until_healthy(name: str, timeout_s: float) -> float:
    """Seconds from now until Docker's HEALTHCHECK reports healthy."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}", name)
        expect(state != "none", "the image has no HEALTHCHECK")
        if state == "healthy":
            return time.monotonic() - started
        expect(state != "unhealthy", f"HEALTHCHECK says unhealthy: {docker('inspect', '-f', '{{json .State.Health}}', name)}")
        time.sleep(0.5)
    raise CheckFailed(f"HEALTHCHECK not healthy within {timeout_s:g} s")


async def _loop(session: aiohttp.ClientSession, url: str, upload: Upload, done: asyncio.Event,
                outcomes: list[tuple[str, float, float, str]], route: str) -> None:
    while not done.is_set():
        started = time.monotonic()
        status = await post(session, url + route, upload)
        outcomes.append((route, started, time.monotonic(), status))
        if status not in ("200", "503"):
            await asyncio.sleep(0.05)  # refused after the stop: do not spin


async def drain(name: str, url: str) -> dict:
    """`docker stop` under load: what the requests in flight at that moment, and those sent after, got."""
    photos = [Upload("image", p.name, p.read_bytes()) for p in vehicle_images(DRAIN_CLASSIFY_CLIENTS)]
    hazy = sorted((data_root("dehaze") / "hazy").glob("*.jpg"))[0]
    big = Upload("image", "big.jpg", jpeg(Image.open(hazy).resize(DRAIN_DEHAZE_SIZE, Image.Resampling.BICUBIC)))
    outcomes: list[tuple[str, float, float, str]] = []
    done = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        clients = [asyncio.create_task(_loop(session, url, photo, done, outcomes, "/classify")) for photo in photos]
        clients += [asyncio.create_task(_loop(session, url, big, done, outcomes, "/dehaze")) for _ in range(2)]
        await asyncio.sleep(STOP_AFTER_S)
        stop_sent = time.monotonic()
        await asyncio.to_thread(docker, "stop", name)
        stopped = time.monotonic()
        done.set()
        await asyncio.gather(*clients)
    in_flight = [o for o in outcomes if o[1] < stop_sent <= o[2]]
    after = [o for o in outcomes if o[1] >= stop_sent]

    def by_route(rows):
        counts = collections.defaultdict(collections.Counter)
        for route, _, _, status in rows:
            counts[route][status] += 1
        return {route: dict(sorted(counter.items())) for route, counter in sorted(counts.items())}

    longest = max((o[2] - stop_sent for o in in_flight), default=0.0)
    return {"stop_after_s": STOP_AFTER_S, "docker_stop_s": round(stopped - stop_sent, 2),
            "exit_code": int(docker("inspect", "-f", "{{.State.ExitCode}}", name)),
            "answered_before_stop": by_route([o for o in outcomes if o[2] < stop_sent]),
            "in_flight_at_stop": by_route(in_flight), "last_in_flight_answer_after_stop_s": round(longest, 2),
            "sent_after_stop": by_route(after)}


def run_check(image: str, flavor: str, gpus: str | None, ready_timeout_s: float, stop_timeout_s: int) -> dict:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image))
    print(f"image {image}: {size / 1e9:.2f} GB ({size} bytes)", flush=True)
    port, name = free_port(), f"roadsight-check-{os.getpid()}"
    run = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{CONTAINER_PORT}", "--stop-timeout", str(stop_timeout_s)]
    if gpus:
        run += ["--gpus", gpus]
    url = f"http://127.0.0.1:{port}"
    result = {"image": image, "flavor": flavor, "image_bytes": size, "gpus": gpus, "stop_timeout_s": stop_timeout_s,
              "when": utc_now(), "machine": machine()}
    try:
        docker(*run, image)
        result["ready_s"] = round(wait_until_ready(name, url, ready_timeout_s), 2)
        print(f"ready (/readyz 200) {result['ready_s']} s after docker run", flush=True)
        result["answers"] = check_answers(url, "CUDAExecutionProvider" if gpus else "any")
        for key, answer in result["answers"].items():
            print(f"  {key}: {json.dumps(answer)}", flush=True)
        result["contents"] = check_contents(name, flavor)
        print(f"  contents: {json.dumps(result['contents'])}", flush=True)
        result["healthy_after_ready_s"] = round(wait_until_healthy(name, 60), 2)
        print(f"  HEALTHCHECK healthy {result['healthy_after_ready_s']} s after ready", flush=True)
        result["drain"] = asyncio.run(drain(name, url))
        print(f"  docker stop under load: {json.dumps(result['drain'])}", flush=True)
        bad = {route: {s: n for s, n in counts.items() if s not in ("200", "503")}
               for route, counts in result["drain"]["in_flight_at_stop"].items()}
        expect(not any(bad.values()), f"requests in flight at `docker stop` got neither an answer nor a 503: {bad}")
        expect(result["drain"]["in_flight_at_stop"], "no request was in flight when `docker stop` was sent")
        expect(result["drain"]["exit_code"] == 0, f"the server exited with {result['drain']['exit_code']} after SIGTERM")
        result["passed"] = True
    except CheckFailed as failure:
        result["passed"], result["failure"] = False, str(failure)
        print(f"FAILED: {failure}", flush=True)
    finally:
        docker("rm", "-f", name, check=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="roadsight:latest", help="the image to check (default roadsight:latest)")
    parser.add_argument("--flavor", choices=("gpu", "cpu"), help="what the image should hold (default: from its name)")
    parser.add_argument("--gpus", help="passed to `docker run --gpus` (e.g. all); the models must then run on CUDA")
    parser.add_argument("--ready-timeout", type=float, default=180, help="seconds to wait for /readyz (default 180)")
    parser.add_argument("--stop-timeout", type=int, default=STOP_TIMEOUT_S,
                        help=f"docker run --stop-timeout: seconds from SIGTERM to SIGKILL (default {STOP_TIMEOUT_S}; Docker's own is 10)")
    args = parser.parse_args()
    if not shutil.which("docker"):
        sys.exit("no docker client on PATH")
    flavor = args.flavor or ("cpu" if args.image.split(":")[0].endswith("-cpu") else "gpu")
    result = run_check(args.image, flavor, args.gpus, args.ready_timeout, args.stop_timeout)
    print(f"{'passed' if result['passed'] else 'FAILED'}: {args.image}, {result['image_bytes'] / 1e9:.2f} GB, "
          f"ready in {result.get('ready_s', '-')} s; results in {save_result('container-' + args.image.split(':')[0], result)}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
