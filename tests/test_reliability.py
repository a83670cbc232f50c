"""Reliability and security of the service, end to end on the shared test server (tests/conftest.py).

A corpus of awkward and hostile requests, built here with Pillow or byte by byte: each one is
answered with the right result (the same probabilities as onnxruntime on the picture the upload
encodes) or a JSON 4xx saying what is wrong, never a 5xx, and the server is still healthy, on the
same worker, afterwards. Also: size limits, a stalled upload, start-up refusing a missing or corrupt
model, `make serve` binding to localhost, and no pickle loaded anywhere in serving.
"""
from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import gc
import http.client
import io
import json
import re
import shutil
import struct
import subprocess
import time
import weakref
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import REPO, SAMPLE, UPLOAD_TIMEOUT_S, assert_same_pixels, expected_dehazed, expected_probabilities
from bentoml._internal.server.http import traffic
from live_server import ServerFailed, running_server
from serving import bentoml_timeout, service  # noqa: F401  (importing the service installs its request timeout)
from serving.images import open_rgb
from serving.runtime import sha256_of
from standin_models import write_standin_models

pytestmark = pytest.mark.slow

CAR_JPEG = (SAMPLE / "vehicles" / "car" / "car001.jpg").read_bytes()
CAR = open_rgb(CAR_JPEG)
MiB = 2**20


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, scanlines: bytes) -> bytes:
    """A PNG written byte by byte, for what Pillow will not write: 16-bit RGB, lying sizes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def rgb48_png(image: Image.Image) -> bytes:
    """``image`` as a 16-bit-per-channel RGB PNG (each 8-bit value v stored as v * 257)."""
    rows = np.asarray(image, np.uint16) * 257
    return handmade_png(image.width, image.height, 16, 2, b"".join(b"\0" + row.astype(">u2").tobytes() for row in rows))


def half_transparent(image: Image.Image) -> tuple[bytes, Image.Image]:
    """RGBA with the left half fully transparent: it must come out white there, the picture elsewhere."""
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, image.width // 2, image.height))
    rgba = image.convert("RGBA")
    rgba.putalpha(alpha)
    expected = image.copy()
    expected.paste((255, 255, 255), (0, 0, image.width // 2, image.height))
    return encoded(rgba, "PNG"), expected


def animated_gif(first: Image.Image) -> tuple[bytes, Image.Image]:
    palette_first = first.quantize(200)  # a GIF frame is palette-coded: quantise first so it is exact
    second = Image.new("RGB", first.size, (0, 255, 0)).quantize(200)
    return encoded(palette_first, "GIF", save_all=True, append_images=[second], duration=100, loop=0), \
        palette_first.convert("RGB")


def exif_rotated_jpeg(image: Image.Image) -> tuple[bytes, Image.Image]:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view", as phones write portrait shots
    data = encoded(image, "JPEG", quality=95, exif=exif.tobytes())
    return data, Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)


def phone_mpo(image: Image.Image) -> tuple[bytes, Image.Image]:
    """A multi-picture JPEG (MPO), as some phones save: the first picture is the one classified."""
    data = encoded(image, "MPO", save_all=True, append_images=[image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    return data, Image.open(io.BytesIO(data)).convert("RGB")


GRAY = CAR.convert("L")

# name -> () -> (upload bytes, the RGB picture they encode, built independently of the service)
DECODED_AS: dict[str, Callable[[], tuple[bytes, Image.Image]]] = {
    "1x1-png": lambda: (encoded(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"), Image.new("RGB", (1, 1), (200, 30, 90))),
    "grayscale-png": lambda: (encoded(GRAY, "PNG"), GRAY.convert("RGB")),
    "grayscale-alpha-png": lambda: (encoded(GRAY.convert("LA"), "PNG"), GRAY.convert("RGB")),
    "rgba-half-transparent-png": lambda: half_transparent(CAR),
    "palette-png": lambda: (encoded(CAR.quantize(64), "PNG"), CAR.quantize(64).convert("RGB")),
    "16-bit-grayscale-png": lambda: (encoded(Image.fromarray(np.asarray(GRAY, np.uint16) * 257), "PNG"), GRAY.convert("RGB")),
    "48-bit-rgb-png": lambda: (rgb48_png(CAR), CAR),
    "cmyk-tiff": lambda: (encoded(CAR.convert("CMYK"), "TIFF"), CAR),
    "animated-gif": lambda: animated_gif(CAR),
    "animated-png": lambda: (encoded(CAR, "PNG", save_all=True, append_images=[Image.new("RGB", CAR.size, "green")]), CAR),
    "exif-rotated-jpeg": lambda: exif_rotated_jpeg(CAR),
    "phone-mpo-jpeg": lambda: phone_mpo(CAR),
    "lossless-webp": lambda: (encoded(CAR, "WEBP", lossless=True), CAR),
    "bmp": lambda: (encoded(CAR, "BMP"), CAR),
    "lzw-tiff": lambda: (encoded(CAR, "TIFF", compression="tiff_lzw"), CAR),
}


@pytest.mark.parametrize("name", DECODED_AS)
def test_awkward_images_are_classified_as_the_picture_they_encode(server, direct, name):
    """Sent as application/octet-stream with no useful file name: the service goes by the bytes."""
    data, picture = DECODED_AS[name]()
    response = server.post("/classify", files={"image": ("upload", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    labels = direct["classify"][0]["labels"]
    served = [response.json()["probabilities"][label] for label in labels]
    np.testing.assert_allclose(served, expected_probabilities(direct, [picture])[0], atol=1e-5, rtol=0)


def test_a_jpeg_labelled_as_text_is_still_classified(server, direct):
    response = server.post("/classify", files={"image": ("notes.txt", CAR_JPEG, "text/plain")})
    assert response.status_code == 200, response.text
    labels = direct["classify"][0]["labels"]
    assert response.json()["label"] == labels[int(expected_probabilities(direct, [CAR])[0].argmax())]


def test_a_1x1_image_is_dehazed_to_1x1(server, direct):
    pixel = Image.new("RGB", (1, 1), (120, 130, 140))
    response = server.post("/dehaze", files={"image": ("dot.png", encoded(pixel, "PNG"), "image/png")})
    assert response.status_code == 200, response.text
    served = Image.open(io.BytesIO(response.content))
    assert served.size == (1, 1)
    assert_same_pixels(np.asarray(served), expected_dehazed(direct, pixel))


def test_a_side_over_4096_is_refused_by_dehaze_or_shrunk_on_request(server):
    """5000 x 1 is few pixels but over the exported graph's 4096 a side."""
    strip = encoded(Image.new("RGB", (5000, 1), (90, 90, 90)), "PNG")
    refused = server.post("/dehaze", files={"image": ("strip.png", strip, "image/png")})
    assert refused.status_code == 413 and "4096 pixels a side" in refused.json()["error"]
    shrunk = server.post("/dehaze", files={"image": ("strip.png", strip, "image/png")}, data={"downscale": "true"})
    assert shrunk.status_code == 200, shrunk.text
    assert Image.open(io.BytesIO(shrunk.content)).size == (4096, 1)
    assert shrunk.headers["x-downscaled-from"] == "5000x1"


def bomb_png() -> bytes:
    """48 megapixels of zeros: 47 KB on the wire, 48 MB (144 MB as RGB) once decoded."""
    return encoded(Image.new("L", (8000, 6000)), "PNG")


def ztxt_bomb_png() -> bytes:
    """A small PNG whose compressed text chunk inflates to 50 MB."""
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "a" * 50_000_000, zip=True)
    return encoded(CAR, "PNG", pnginfo=text)


def gif_with_huge_screen() -> bytes:
    """A 26-byte GIF whose header claims 65535 x 65535 pixels."""
    return b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\0\0\0" + b",\0\0\0\0\xff\xff\xff\xff\0\x02\x02D\x01\0;"


def one_file(data: bytes, name: str = "upload", field: str = "image") -> dict:
    return {"files": {field: (name, data, "application/octet-stream")}}


def chunked_upload(total_bytes: int):
    """A multipart body streamed without Content-Length, so only counting can stop it."""
    yield b'--bound\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
    for _ in range(total_bytes // MiB):
        yield b"\0" * MiB
    yield b"\r\n--bound--\r\n"


TRUNCATED_PNG = encoded(CAR, "PNG")[:300]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"

# name -> (route, () -> request arguments, status, what the error must say)
REFUSED: dict[str, tuple[str, Callable[[], dict], int, str]] = {
    "postscript": ("/classify", lambda: one_file(EPS, "x.eps"), 400, "not an image in an accepted format"),
    "pdf": ("/classify", lambda: one_file(encoded(CAR, "PDF"), "x.pdf"), 400, "not an image in an accepted format"),
    "targa-image": ("/classify", lambda: one_file(encoded(CAR, "TGA")), 400, "send a JPEG, PNG, WebP, BMP, GIF or TIFF"),
    "svg": ("/classify", lambda: one_file(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'), 400,
            "not an image"),
    "truncated-png": ("/classify", lambda: one_file(TRUNCATED_PNG), 400, "(?i)truncated"),
    "zero-width-png": ("/classify", lambda: one_file(handmade_png(0, 10, 8, 0, b"\0" * 10)), 400, "not an image"),
    "decompression-bomb": ("/classify", lambda: one_file(bomb_png()), 413, "decompression bomb"),
    "decompression-bomb-with-downscale": ("/dehaze", lambda: {**one_file(bomb_png()), "data": {"downscale": "true"}},
                                          413, "decompression bomb"),
    "10-gigapixel-header": ("/classify", lambda: one_file(handmade_png(100_000, 100_000, 8, 0, b"\0" * 64)), 413,
                            "decompression bomb"),
    "gif-huge-screen": ("/classify", lambda: one_file(gif_with_huge_screen()), 413, "decompression bomb"),
    "text-chunk-bomb": ("/dehaze", lambda: one_file(ztxt_bomb_png()), 400, "cannot read the image header"),
    "batch-with-a-bomb": ("/classify_batch", lambda: {"files": [("images", ("car.jpg", CAR_JPEG, "image/jpeg"))] * 2
                                                      + [("images", ("bomb.png", bomb_png(), "image/png"))]},
                          413, "file 2: .*decompression bomb"),
    "two-images-for-one": ("/classify", lambda: {"files": [("image", ("a.jpg", CAR_JPEG, "image/jpeg"))] * 2}, 400,
                           "'image' was sent 2 times"),
    "two-formats": ("/dehaze", lambda: {**one_file(CAR_JPEG), "data": {"format": ["png", "jpeg"]}}, 400,
                    "'format' was sent 2 times"),
    "downscale-not-a-bool": ("/dehaze", lambda: {**one_file(CAR_JPEG), "data": {"downscale": "maybe"}}, 400,
                             "downscale"),
    "file-over-32-MiB": ("/classify", lambda: one_file(CAR_JPEG + b"\0" * (33 * MiB)), 413, "33.0 MiB, over the 32 MiB"),
    "body-over-64-MiB": ("/classify", lambda: one_file(CAR_JPEG + b"\0" * (65 * MiB)), 413, "over the 64 MiB limit"),
    "chunked-body-over-64-MiB": ("/classify", lambda: {"content": chunked_upload(70 * MiB), "headers": {
        "content-type": "multipart/form-data; boundary=bound"}}, 413, "over the 64 MiB limit"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_and_broken_requests_get_a_json_4xx(server, name):
    route, request, status, message = REFUSED[name]
    response = server.post(route, **request())
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str) and re.search(message, response.text), response.text


def test_a_stalled_upload_gets_408_and_holds_up_no_one(server):
    """A client that stops sending mid-upload is answered 408 after the upload timeout (the test
    server's is short), not left hanging to the whole-request timeout's 504; others are served meanwhile."""
    address = urlsplit(server.url)
    with contextlib.closing(http.client.HTTPConnection(address.hostname, address.port, timeout=60)) as stalled:
        stalled.putrequest("POST", "/classify")
        stalled.putheader("Content-Type", "multipart/form-data; boundary=bound")
        stalled.putheader("Content-Length", str(MiB))
        stalled.endheaders(b'--bound\r\nContent-Disposition: form-data; name="image"; filename="car.jpg"\r\n\r\n'
                           + CAR_JPEG[:1000])
        started = time.monotonic()
        meanwhile = server.post("/classify", **one_file(CAR_JPEG))
        assert meanwhile.status_code == 200 and time.monotonic() - started < UPLOAD_TIMEOUT_S
        response = stalled.getresponse()
        waited = time.monotonic() - started
        assert response.status == 408
        assert f"did not arrive within {UPLOAD_TIMEOUT_S} s" in json.loads(response.read())["error"]
    assert UPLOAD_TIMEOUT_S - 1 < waited < UPLOAD_TIMEOUT_S + 30


class RequestMarker:
    """Something only a request's context refers to."""


REQUEST_MARKER: contextvars.ContextVar[RequestMarker] = contextvars.ContextVar("request_marker")


async def answer_ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def answer_late(scope, receive, send):
    await asyncio.sleep(30)


async def through_the_timeout(app, timeout_s: float) -> tuple[list[dict], weakref.ref]:
    """One request through the request timeout the service installs; what was sent, and a weak
    reference to the marker its context held."""
    marker = RequestMarker()
    REQUEST_MARKER.set(marker)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    await traffic.TimeoutMiddleware(app, timeout=timeout_s)({"type": "http"}, receive, send)
    return sent, weakref.ref(marker)


def test_the_request_timeout_lets_go_of_finished_requests():
    """BentoML's own timeout kept each finished request's context alive for the whole timeout
    (serving/bentoml_timeout.py): memory grew by request rate x 120 s under load."""
    assert traffic.TimeoutMiddleware is bentoml_timeout.TimeoutMiddleware  # installed by serving.service

    async def scenario():
        sent, marker = await asyncio.create_task(through_the_timeout(answer_ok, 120))  # a context of its own
        await asyncio.sleep(0)  # one turn of the loop drops cancelled timers
        gc.collect()
        assert sent[0]["status"] == 200 and marker() is None
        late, _ = await through_the_timeout(answer_late, 0.2)
        assert late[0]["status"] == 504 and b"0.2 seconds" in late[1]["body"]

    asyncio.run(scenario())


def test_make_serve_binds_to_localhost_unless_told_otherwise():
    def serve_line(*arguments: str) -> str:
        plan = subprocess.run(["make", "-n", "serve", *arguments], cwd=REPO, capture_output=True, text=True, check=True)
        return next(line for line in plan.stdout.splitlines() if "bentoml serve" in line)

    assert "--host 127.0.0.1 " in serve_line()
    assert "--host 0.0.0.0 " in serve_line("HOST=0.0.0.0")


UNPICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "torch", "torchvision"}


def test_serving_code_imports_nothing_that_unpickles():
    """torch.load, joblib and friends unpickle, which runs code from the file: serving reads models
    only as ONNX + JSON. np.load(allow_pickle=True) is the other way in."""
    for path in sorted((REPO / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                modules = []
            assert not {m.split(".")[0] for m in modules} & UNPICKLERS, f"{path.name}:{node.lineno} imports {modules}"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path.name} allows pickles"


def corrupt_truncated(models):
    onnx_path = models / "vehicle_classifier.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:100])
    return f"model file {onnx_path} does not match vehicle_classifier.json: sha256"


def corrupt_garbage_with_matching_sha(models):
    """Its JSON vouches for it, so only onnxruntime, loading this very file, can catch it."""
    onnx_path = models / "dehazer.onnx"
    onnx_path.write_bytes(b"\x08\x07garbage, not an ONNX graph" * 50)
    contract = json.loads((models / "dehazer.json").read_text())
    (models / "dehazer.json").write_text(json.dumps({**contract, "sha256": sha256_of(onnx_path)}))
    return f"model file {onnx_path} cannot be loaded by onnxruntime"


def missing_json(models):
    (models / "vehicle_classifier.json").unlink()
    return f"{models / 'vehicle_classifier.json'} is missing"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return write_standin_models(tmp_path_factory.mktemp("standin-models"))


@pytest.mark.parametrize("damage", [missing_json, corrupt_truncated, corrupt_garbage_with_matching_sha])
def test_a_missing_or_corrupt_model_stops_start_up_naming_the_file(standins, tmp_path, damage):
    models = tmp_path / "models"
    shutil.copytree(standins, models)
    message = damage(models)
    with pytest.raises(ServerFailed, match=f"(?s)exited with .* while starting.*{re.escape(message)}"):
        with running_server(models, tmp_path / "home"):
            pass


def test_the_server_unpickled_nothing_and_read_only_its_model_files(server, direct, audit_log):
    """Every process of the test server ran with tests/pickle_audit/sitecustomize.py; by now it
    has served everything above."""
    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [e["detail"] for e in events if e["event"] == "pickle.find_class"] == []
    opened = {e["detail"].rsplit("/", 1)[-1] for e in events if e["event"] == "open"}
    assert opened == {"vehicle_classifier.json", direct["classify"][0]["file"], "dehazer.json", direct["dehaze"][0]["file"]}


@pytest.fixture(scope="module", autouse=True)
def worker_pid_before(server) -> int:
    return server.info()["runtime"]["worker_pid"]


def test_the_server_is_still_healthy_and_never_answered_5xx(server, direct, worker_pid_before):
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    assert server.info()["runtime"]["worker_pid"] == worker_pid_before, "the worker died and was restarted"
    labels = direct["classify"][0]["labels"]
    response = server.post("/classify", **one_file(CAR_JPEG))
    assert response.status_code == 200
    assert response.json()["label"] == labels[int(expected_probabilities(direct, [CAR])[0].argmax())]
    statuses = re.findall(r"\(status=(\d{3}),", server.log.read_text())
    assert "408" in statuses and "413" in statuses, "the access log no longer shows statuses"
    assert [status for status in statuses if status.startswith("5")] == []
