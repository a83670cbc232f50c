"""The BentoML service, end to end: a real `bentoml serve` on 127.0.0.1, real images from tests/data.

The server (the session's, from tests/conftest.py, shared with tests/test_reliability.py) serves
models/ (the shipped models; all four files required, so a missing one fails here loudly), or the
directory in ROADSIGHT_TEST_MODELS_DIR.
Only while models/ holds no shipped model at all does it serve stand-ins generated for the session
(tests/standin_models.py), with a warning. Expected outputs are computed independently from each
model's JSON contract with onnxruntime, so the same tests hold for either.
"""
from __future__ import annotations

import concurrent.futures
import io
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import DEHAZE_LIMIT, SAMPLE, assert_same_pixels, expected_dehazed, expected_probabilities
from serving import runtime
from serving.images import open_rgb


pytestmark = pytest.mark.slow

VEHICLES = sorted((SAMPLE / "vehicles").glob("*/*.jpg"))
HAZY = sorted((SAMPLE / "dehaze" / "hazy").glob("*.jpg"))


def upload(path: Path, field: str = "image", **data) -> dict:
    return {"files": {field: (path.name, path.read_bytes(), "image/jpeg")}, "data": data}


def test_info_describes_models_provider_and_sizes(server, direct):
    info = server.info()
    classifier, dehazer = info["models"]["classifier"], info["models"]["dehazer"]
    contract = direct["classify"][0]
    assert classifier["version"] == contract["sha256"] and classifier["labels"] == contract["labels"]
    assert dehazer["version"] == direct["dehaze"][0]["sha256"]
    assert info["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    assert info["input_sizes"]["classifier"] == {"height": contract["input"]["height"], "width": contract["input"]["width"]}
    assert info["batching"]["max_batch_size"] == 32 and info["batching"]["classifier"]["max_queue_images"] == 256
    assert info["batching"]["dehazer"]["max_batch_pixels"] == DEHAZE_LIMIT
    layout = runtime.cpu_layout(info["runtime"]["cores"])
    if info["provider"] == "CPUExecutionProvider":  # the rule of serving.runtime.cpu_layout
        assert (info["runtime"]["parallel_runs"]["classify"], info["runtime"]["intra_op_threads"]) == layout
        lone = info["runtime"]["lone_run_threads"]  # a lone request's image runs on every core of the worker
        assert lone == dict.fromkeys(("classify", "dehaze"),
                                     info["runtime"]["cores"] if info["runtime"]["cores"] > layout[1] else None)
    assert info["runtime"]["parallel_runs"]["dehaze"] >= 1
    assert httpx.get(server.url + "/livez").status_code == 200
    assert "bentoml" in httpx.get(server.url + "/metrics").text


def test_classify_matches_onnxruntime_on_the_contract(server, direct):
    """Contract parity: the service's probabilities equal a direct onnxruntime call on the same
    image prepared per the JSON (open_rgb + stretch), within 1e-5."""
    labels = direct["classify"][0]["labels"]
    paths = VEHICLES[::4]
    expected = expected_probabilities(direct, [open_rgb(p) for p in paths])
    for path, row in zip(paths, expected):
        response = server.post("/classify", **upload(path))
        assert response.status_code == 200, response.text
        result = response.json()
        assert set(result) == {"label", "confidence", "probabilities"}
        assert list(result["probabilities"]) == labels
        np.testing.assert_allclose([result["probabilities"][name] for name in labels], row, atol=1e-5, rtol=0)
        assert result["label"] == labels[int(row.argmax())] and result["confidence"] == pytest.approx(row.max(), abs=1e-5)


def test_the_python_client_in_the_readme(server, direct):
    """bentoml.SyncHTTPClient, as README "Serving" shows it: classify gives the JSON, dehaze a PIL image."""
    import bentoml

    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.classify(image=VEHICLES[0])
        batch = client.classify_batch(images=VEHICLES[:2])
        clear = client.dehaze(image=HAZY[0], format="jpeg", quality=85)
    labels = direct["classify"][0]["labels"]
    expected = expected_probabilities(direct, [open_rgb(p) for p in VEHICLES[:2]])
    np.testing.assert_allclose([result["probabilities"][name] for name in labels], expected[0], atol=1e-5, rtol=0)
    assert [item["label"] for item in batch] == [labels[int(row.argmax())] for row in expected]
    assert clear.format == "JPEG" and clear.size == Image.open(HAZY[0]).size


def test_in_process_calls_answer_as_the_served_routes_do(server, direct, monkeypatch, tmp_path):
    """The service used from Python without HTTP (``Roadsight.inner()``, its API methods called with
    paths) gives the answers the routes give; a bad file is the same JSON 400."""
    import asyncio

    from serving.service import Roadsight

    monkeypatch.setenv("ROADSIGHT_MODELS_DIR", str(server.models_dir))
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    service = Roadsight.inner()

    async def calls():
        return (await service.classify(image=VEHICLES[0]), await service.classify_batch(images=VEHICLES[:3]),
                await service.dehaze(image=HAZY[0], format="jpeg", quality=85),
                await service.classify(image=not_an_image))
    try:
        one, many, dehazed, refused = asyncio.run(calls())
    finally:
        service._stop_batchers()
    assert one.model_dump() == server.post("/classify", **upload(VEHICLES[0])).json()
    served = server.post("/classify_batch", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in VEHICLES[:3]])
    assert [item.model_dump() for item in many] == served.json()
    assert Image.open(io.BytesIO(dehazed.body)).size == Image.open(HAZY[0]).size
    assert dehazed.headers["content-type"] == "image/jpeg"
    assert refused.status_code == 400 and b"not an image" in refused.body


def test_classify_batch_answers_in_order(server, direct):
    paths = VEHICLES[:7]
    response = server.post("/classify_batch", files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])
    assert response.status_code == 200, response.text
    results = response.json()
    expected = expected_probabilities(direct, [open_rgb(p) for p in paths])
    labels = direct["classify"][0]["labels"]
    assert len(results) == len(paths)
    for result, row in zip(results, expected):
        np.testing.assert_allclose([result["probabilities"][name] for name in labels], row, atol=1e-5, rtol=0)


def test_a_concurrent_burst_is_batched(server, direct):
    before = server.info()["batching"]["classifier"]["observed"]
    paths = (VEHICLES * 2)[:32]
    with httpx.Client(timeout=120) as client:
        def one(path):
            return client.post(server.url + "/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(one, paths))
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    expected = expected_probabilities(direct, [open_rgb(p) for p in paths])
    labels = direct["classify"][0]["labels"]
    for response, row in zip(responses, expected):
        np.testing.assert_allclose([response.json()["probabilities"][n] for n in labels], row, atol=1e-5, rtol=0)
    after = server.info()["batching"]["classifier"]["observed"]
    burst = {int(size): count - before["histogram"].get(size, 0) for size, count in after["histogram"].items()}
    assert after["images"] - before["images"] == 32
    assert max(size for size, count in burst.items() if count > 0) > 1, f"no batch > 1 in the burst: {burst}"
    print(f"onnxruntime batch sizes during the burst of 32 (size: runs): { {k: v for k, v in burst.items() if v} }")


def test_sustained_concurrency_never_drops_requests(server):
    """120 requests from 16 clients at once: every one answered 200 (none shed, none cut off)."""
    data = VEHICLES[0].read_bytes()
    with httpx.Client(timeout=120) as client:
        def one(_):
            return client.post(server.url + "/classify", files={"image": ("car.jpg", data, "image/jpeg")}).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(120)))
    assert statuses == [200] * 120, sorted(set(statuses))


@pytest.mark.parametrize("path", HAZY[:3] + HAZY[-3:], ids=lambda p: p.stem)
def test_dehaze_returns_the_same_size_png(server, direct, path):
    response = server.post("/dehaze", **upload(path))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == Image.open(path).size
    assert_same_pixels(np.asarray(image), expected_dehazed(direct, open_rgb(path)))


def test_dehaze_jpeg_on_request(server):
    response = server.post("/dehaze", **upload(HAZY[0], format="jpeg", quality="80"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.size == Image.open(HAZY[0]).size


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_concurrent_dehazing_shares_runs_by_size_and_answers_each_its_own(server, direct):
    """Two frame sizes, six different photos each, all at once: every answer is its own photo
    dehazed (rows never mixed up, sizes never mixed), and same-size frames shared a run. Two of
    the larger size fit the test server's pixel budget per run, five of the smaller."""
    sizes = [(120, 90), (80, 56)]
    pictures = [open_rgb(path).resize(size) for size in sizes for path in HAZY[:6]]
    bodies = [png_of(picture) for picture in pictures]
    for attempt in range(3):  # a same-size pair must overlap a run in progress; on a loaded box, retry
        before = server.info()["batching"]["dehazer"]["observed"]["histogram"]
        with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: client.post(
                server.url + "/dehaze", files={"image": ("frame.png", body, "image/png")}), bodies))
        for response, picture in zip(responses, pictures):
            assert response.status_code == 200, response.text
            assert_same_pixels(np.asarray(Image.open(io.BytesIO(response.content))), expected_dehazed(direct, picture))
        after = server.info()["batching"]["dehazer"]["observed"]["histogram"]
        shared = {size: count - before.get(size, 0) for size, count in after.items() if int(size) > 1}
        if any(shared.values()):
            break
    assert any(shared.values()), f"no dehazer run took more than one image in {attempt + 1} bursts: {after}"
    assert max(int(size) for size in after) <= 5


def test_dehaze_honours_exif_orientation(server, direct):
    landscape = open_rgb(HAZY[0])  # 137 x 103
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise to view
    buffer = io.BytesIO()
    landscape.save(buffer, "PNG", exif=exif.tobytes())
    response = server.post("/dehaze", files={"image": ("rotated.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (landscape.height, landscape.width)
    upright = open_rgb(buffer.getvalue())
    assert_same_pixels(np.asarray(image), expected_dehazed(direct, upright))


def big_image() -> bytes:
    buffer = io.BytesIO()
    open_rgb(HAZY[0]).resize((200, 150)).save(buffer, "PNG")  # 30,000 px > DEHAZE_LIMIT
    return buffer.getvalue()


def test_dehaze_refuses_oversized_images_or_downscales_on_request(server):
    refused = server.post("/dehaze", files={"image": ("big.png", big_image(), "image/png")})
    assert refused.status_code == 413 and "downscale=true" in refused.json()["error"]
    shrunk = server.post("/dehaze", files={"image": ("big.png", big_image(), "image/png")}, data={"downscale": "true"})
    assert shrunk.status_code == 200, shrunk.text
    image = Image.open(io.BytesIO(shrunk.content))
    assert image.width * image.height <= DEHAZE_LIMIT and shrunk.headers["x-downscaled-from"] == "200x150"


def odd_upload(name: str) -> bytes:
    buffer = io.BytesIO()
    source = open_rgb(VEHICLES[0])
    if name == "rgba":
        source.convert("RGBA").save(buffer, "PNG")
    elif name == "cmyk":
        source.convert("CMYK").save(buffer, "JPEG")
    elif name == "palette":
        source.convert("P").save(buffer, "GIF")
    elif name == "gray16":
        Image.fromarray((np.asarray(source.convert("L"), np.uint16) * 257)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["rgba", "cmyk", "palette", "gray16"])
def test_odd_image_modes_are_classified(server, direct, kind):
    response = server.post("/classify", files={"image": (f"odd.{kind}", odd_upload(kind), "application/octet-stream")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] in direct["classify"][0]["labels"]


def multipart(*parts: tuple[str, bytes, str | None]) -> dict:
    """A hand-made multipart body: (field, value, filename or None for a plain text field)."""
    chunks = []
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--bound\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return {"content": b"".join(chunks) + b"--bound--\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=bound"}}


TRUNCATED = VEHICLES[0].read_bytes()[: len(VEHICLES[0].read_bytes()) // 2]
BAD_REQUESTS = {
    "not-an-image": ("/classify", {"files": {"image": ("notes.txt", b"hello, no pixels here", "text/plain")}}, 400),
    "empty-file": ("/classify", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400),
    "truncated-jpeg": ("/classify", {"files": {"image": ("cut.jpg", TRUNCATED, "image/jpeg")}}, 400),
    "wrong-field": ("/classify", {"files": {"picture": ("car.jpg", VEHICLES[0].read_bytes(), "image/jpeg")}}, 400),
    "text-in-file-field": ("/classify", multipart(("image", b"http://example.com/car.jpg", None)), 400),
    "file-in-text-field": ("/dehaze", multipart(("image", HAZY[0].read_bytes(), "a.jpg"),
                                                ("format", VEHICLES[0].read_bytes(), "b.jpg")), 400),
    "urlencoded-form": ("/classify", {"data": {"image": "car.jpg"}}, 415),
    "no-body": ("/classify", {}, 400),
    "json-body": ("/classify", {"json": {"image": "car.jpg"}}, 400),
    "raw-jpeg-body": ("/classify", {"content": VEHICLES[0].read_bytes(), "headers": {"content-type": "image/jpeg"}}, 415),
    "broken-multipart": ("/classify", {"content": b"--xyz\r\ngarbage",
                                       "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400),
    "multipart-without-boundary": ("/dehaze", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400),
    "dehaze-bad-format": ("/dehaze", {"files": {"image": ("a.jpg", HAZY[0].read_bytes(), "image/jpeg")},
                                      "data": {"format": "gif"}}, 400),
    "dehaze-bad-quality": ("/dehaze", {"files": {"image": ("a.jpg", HAZY[0].read_bytes(), "image/jpeg")},
                                       "data": {"quality": "500"}}, 400),
    "dehaze-truncated": ("/dehaze", {"files": {"image": ("cut.jpg", TRUNCATED, "image/jpeg")}}, 400),
    "batch-one-bad": ("/classify_batch", {"files": [("images", ("a.jpg", VEHICLES[0].read_bytes(), "image/jpeg")),
                                                    ("images", ("b.jpg", b"nope", "image/jpeg"))]}, 400),
    "batch-too-many": ("/classify_batch", {"files": [("images", ("a.jpg", b"x", "image/jpeg"))] * 65}, 400),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_a_json_4xx(server, name):
    route, kwargs, status = BAD_REQUESTS[name]
    response = server.post(route, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"], body


def test_bad_error_messages_say_what_was_wrong(server):
    assert "empty" in server.post("/classify", **BAD_REQUESTS["empty-file"][1]).json()["error"]
    assert "truncated" in server.post("/classify", **BAD_REQUESTS["truncated-jpeg"][1]).json()["error"]
    assert "'picture'" in server.post("/classify", **BAD_REQUESTS["wrong-field"][1]).json()["error"]
    assert server.post("/classify_batch", **BAD_REQUESTS["batch-one-bad"][1]).json()["index"] == 1
    assert "at most 64 items" in server.post("/classify_batch", **BAD_REQUESTS["batch-too-many"][1]).json()["error"]
    assert httpx.get(server.url + "/classify").status_code == 405


def test_guarded_answers_carry_bentomls_response_headers(server):
    """The request guard answers the form routes in BentoML's place, with the headers its handler gives:
    ``Server`` and a request ID (the request's span, as the access log writes it), one per request."""
    answers = [server.post("/classify", **upload(VEHICLES[0])), server.post("/classify", **upload(VEHICLES[0])),
               server.post("/classify", **BAD_REQUESTS["not-an-image"][1]), httpx.get(server.url + "/classify")]
    assert [a.status_code for a in answers] == [200, 200, 400, 405]
    assert {a.headers["server"] for a in answers} == {"BentoML Service/roadsight"}
    ids = [a.headers["x-bentoml-request-id"] for a in answers]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids), ids
    deadline = time.monotonic() + 10  # the access log line is written as the answer goes out
    while f"span={ids[2]}" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(rf"path=/classify,.*status=400.*span={ids[2]}", server.log.read_text())


def test_still_healthy_after_all_that(server):
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert server.post("/classify", **upload(VEHICLES[-1])).status_code == 200
    # the form routes are answered inside BentoML's metrics middleware: /metrics counts them
    counted = re.search(r'bentoml_service_request_total\{endpoint="/classify",http_response_code="200"[^}]*\} (\S+)',
                        httpx.get(server.url + "/metrics").text)
    assert counted and float(counted.group(1)) >= 1
    log = server.log.read_text()
    assert "status=500" not in log and "status=503" not in log
