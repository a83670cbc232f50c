"""The roadsight BentoML service: vehicle classification and dehazing on the shipped ONNX models.

    bentoml serve serving.service:Roadsight --host 127.0.0.1 --port 3000      # or: make serve

Endpoints (multipart form uploads; errors are JSON ``{"error": ...}`` with a 4xx status):

- ``POST /classify``        field ``image``: ``{label, confidence, probabilities: {bus, car, truck}}``
- ``POST /classify_batch``  field ``images`` (repeated, up to 64): a list of the above, in order
- ``POST /dehaze``          field ``image`` (+ ``format`` png|jpeg, ``quality``, ``downscale``): the image
- ``POST /classify_tensors`` the batched inner method (JSON ``{"tensors": [base64 uint8 CHW, ...]}``)
- ``GET /info``             models, versions (sha256), provider, input sizes, limits, observed batch sizes
- ``GET /livez``, ``/readyz``, ``/metrics`` (BentoML's own), ``/`` (OpenAPI UI)

Single /classify requests are decoded and resized on their own, then handed to ``classify_tensors``
through BentoML's adaptive batching (``batchable=True``), so concurrent requests share one
onnxruntime run. Everything the models need (labels, input size, resize rule, padding) comes from
their JSON files (models/README.md). Settings come from ``ROADSIGHT_*`` environment variables, read
when the module is imported (see README "Serving").
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import logging
import os
import threading
import time
import typing as t
import warnings
from pathlib import Path

import anyio
import bentoml
import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import bentoml_timeout, processing
from serving.images import ENCODINGS, encode

log = logging.getLogger("bentoml.roadsight")
bentoml_timeout.install()  # BentoML's request timeout, minus its memory held for the whole timeout


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


WORKERS = _env_int("ROADSIGHT_WORKERS", 1)
MAX_BATCH_SIZE = _env_int("ROADSIGHT_MAX_BATCH_SIZE", 32)  # 1: adaptive batching off
# BentoML sheds (503) what it predicts will miss this target, so it must exceed one full batch's run:
# about 0.9 s for 32 images on 2 CPU cores. At 500 ms a third of a c=32 burst was shed while the
# cores idled (benchmarks/README.md); on a GPU a lower target can be set.
MAX_LATENCY_MS = _env_int("ROADSIGHT_MAX_LATENCY_MS", 2000)
BATCHING = ({"batchable": True, "max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS}
            if MAX_BATCH_SIZE > 1 else {})  # BentoML itself refuses max_batch_size=1
TIMEOUT_S = _env_int("ROADSIGHT_TIMEOUT_S", 120)
MAX_REQUEST_BYTES = _env_int("ROADSIGHT_MAX_REQUEST_BYTES", 64 * 2**20)
UPLOAD_TIMEOUT_S = _env_int("ROADSIGHT_UPLOAD_TIMEOUT_S", 60)
MAX_BATCH_IMAGES = 64


class Classification(BaseModel):
    label: str = Field(description="the most probable class")
    confidence: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability (labels from the model's JSON)")


class BatchStats:
    """Sizes of the onnxruntime runs of the batched classifier (per worker process)."""

    def __init__(self, keep: int = 256):
        self._lock = threading.Lock()
        self._keep = keep
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.histogram: collections.Counter[int] = collections.Counter()
            self.recent: collections.deque[int] = collections.deque(maxlen=self._keep)

    def record(self, size: int) -> None:
        with self._lock:
            self.histogram[size] += 1
            self.recent.append(size)

    def snapshot(self) -> dict:
        with self._lock:
            runs = sum(self.histogram.values())
            images = sum(size * count for size, count in self.histogram.items())
            return {"runs": runs, "images": images, "max": max(self.histogram, default=0),
                    "mean": images / runs if runs else 0.0,
                    "histogram": {str(size): self.histogram[size] for size in sorted(self.histogram)},
                    "recent": list(self.recent)}


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: t.Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _upload_bytes(path: Path, what: str = "image") -> bytes:
    """The uploaded file's bytes, refusing over-large uploads before reading them."""
    size = path.stat().st_size
    if size > processing.MAX_UPLOAD_BYTES:
        raise processing.TooLarge(f"the uploaded {what} is {size / 2**20:.1f} MiB, over the "
                                  f"{processing.MAX_UPLOAD_BYTES / 2**20:.0f} MiB limit")
    return path.read_bytes()


async def _info_endpoint(request: Request) -> Response:
    service = bentoml.get_current_service()
    if service is None:
        return _error(503, "the service is still starting")
    return JSONResponse(service.info())


class _RequestGuard:
    """ASGI middleware that answers, with a JSON error, what BentoML's own request parsing would turn
    into a 500 or silently guess at: bodies over ``max_bytes`` (413), uploads still incomplete after
    ``upload_timeout_s`` (408, before BentoML's whole-request timeout answers 504), malformed
    multipart bodies, unknown form fields, a single-value field sent twice, a file sent in a plain
    field or text in a file field (400), and non-POST calls of an API (405). Text in a file field is
    refused rather than fetched as a URL, so the service never makes outbound requests on a
    client's behalf."""

    def __init__(self, app, max_bytes: int, upload_timeout_s: float):
        self.app, self.max_bytes, self.upload_timeout_s = app, max_bytes, upload_timeout_s

    @staticmethod
    @functools.cache
    def _fields() -> dict[str, tuple[set[str], set[str], set[str]]]:
        """Route -> (accepted field names, file fields, fields that take a list), from the APIs' own
        input specs."""
        return {method.route: (set(method.input_spec.model_fields), set(method.input_spec.multipart_fields),
                               {name for name, field in method.input_spec.model_fields.items()
                                if t.get_origin(field.annotation) is list})
                for method in Roadsight.apis.values()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        fields = self._fields().get(scope["path"])
        if fields is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await _error(405, f"{scope['path']} takes POST requests")(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(int(length))(scope, receive, send)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        accepted, files, lists = fields
        if media_type != "multipart/form-data":
            if files and media_type not in ("", "application/json"):
                example = " ".join(f"-F {name}=@photo.jpg" for name in sorted(files))
                return await _error(415, f"{scope['path']} takes multipart/form-data uploads, not {media_type} "
                                         f"(e.g. curl {example} ...)")(scope, receive, send)
            return await self.app(scope, receive, send)
        body = await self._receive_body(receive)
        if body is None:  # the client went away
            return
        if isinstance(body, Response):
            return await body(scope, receive, send)
        problem = await self._check_form(headers, body, accepted, files, lists)
        if problem:
            return await _error(400, problem)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _receive_body(self, receive) -> bytes | JSONResponse | None:
        """The whole body, or the error for one over the size limit or too slow to arrive (a stalled
        upload would otherwise hold its connection until the whole-request timeout); None when the
        client disconnected."""
        chunks, total = [], 0
        with anyio.move_on_after(self.upload_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.max_bytes:
                    return self._too_large(total)
                if not message.get("more_body"):
                    return b"".join(chunks)
        return _error(408, f"the upload did not arrive within {self.upload_timeout_s:g} s "
                           f"({total / 2**20:.1f} MiB received)")

    def _too_large(self, size: int) -> JSONResponse:
        return _error(413, f"request body of {size / 2**20:.1f} MiB is over the {self.max_bytes / 2**20:.0f} MiB limit")

    @staticmethod
    async def _check_form(headers, body: bytes, accepted: set[str], files: set[str], lists: set[str]) -> str | None:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_part_size=processing.MAX_UPLOAD_BYTES).parse()
        except MultiPartException as exc:
            return f"malformed multipart/form-data body: {exc.message}"
        except Exception as exc:  # the multipart library raises several types on broken bodies
            return f"malformed multipart/form-data body: {exc or type(exc).__name__}"
        try:
            sent = collections.Counter(name for name, _ in form.multi_items())
            for name, value in form.multi_items():
                if name not in accepted:
                    return f"unexpected form field {name!r}; this endpoint takes {', '.join(sorted(accepted))}"
                if name in files and not isinstance(value, UploadFile):
                    return f"field {name!r} must be a file upload, not a text value"
                if name not in files and isinstance(value, UploadFile):
                    return f"field {name!r} takes a plain value, not a file"
                if sent[name] > 1 and name not in lists:
                    return f"field {name!r} was sent {sent[name]} times; it takes one value"
        finally:
            await form.close()
        return None


_info_app = Starlette(routes=[Route("/info", _info_endpoint, methods=["GET"])])


@bentoml.asgi_app(_info_app, path="/")
# runner_connection: BentoML 1.4.39 renews the client session of the service's own proxy every 100
# requests / 300 s and closes the old one with requests still in flight on it ("Server
# disconnected", seen as 500s under load); the proxy is in-process (an ASGI connector, no sockets),
# so it never needs renewing.
@bentoml.service(name="roadsight", workers=WORKERS, threads=2, traffic={"timeout": TIMEOUT_S},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9})
class Roadsight:
    """Vehicle classification (bus / car / truck) and image dehazing with the shipped ONNX models."""

    def __init__(self) -> None:
        from serving import runtime  # onnxruntime is imported here, in the worker, not at import time

        Image.MAX_IMAGE_PIXELS = _env_int("ROADSIGHT_MAX_DECODE_PIXELS", processing.MAX_DECODE_PIXELS)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is refused (413)
        self.max_dehaze_pixels = _env_int("ROADSIGHT_DEHAZE_MAX_PIXELS", processing.MAX_DEHAZE_PIXELS)
        self.models_dir = runtime.default_models_dir()
        self.cores = runtime.available_cores()
        self.threads = _env_int("ROADSIGHT_INTRA_OP_THREADS", max(1, self.cores // max(1, WORKERS)))
        preference = os.environ.get("ROADSIGHT_PROVIDER", "auto").strip().lower() or "auto"
        started = time.perf_counter()
        self.classifier = runtime.load_model(self.models_dir, "classify", self.threads, preference)
        self.dehazer = runtime.load_model(self.models_dir, "dehaze", self.threads, preference)
        spec = self.classifier.contract["input"]
        self.labels = list(self.classifier.contract["labels"])
        self.tensor_shape = (3, int(spec["height"]), int(spec["width"]))
        self.pad_multiple = int(self.dehazer.contract.get("pad_multiple", 1))
        self.batch_stats = BatchStats()
        self.dehaze_limiter = anyio.CapacityLimiter(_env_int("ROADSIGHT_DEHAZE_CONCURRENCY", 1))
        self._warm_up_sessions()
        self._batcher_ready = False
        self._batcher_warmup_calls = 0
        log.info("roadsight: models from %s; classifier %s on %s, dehazer %s on %s; %d intra-op threads "
                 "(%d cores / %d workers); ready in %.1f s", self.models_dir, self.classifier.sha256[:12],
                 self.classifier.provider, self.dehazer.sha256[:12], self.dehazer.provider, self.threads,
                 self.cores, WORKERS, time.perf_counter() - started)

    # -- start-up -------------------------------------------------------------------------------

    @bentoml.on_deployment
    def _check_models() -> None:
        """Runs once in the server's main process before any worker starts, so a missing or corrupt
        model stops ``bentoml serve`` with a message naming the file (a worker failing in
        ``__init__`` would only be restarted over and over)."""
        from serving import runtime

        models_dir = runtime.default_models_dir()
        checked = runtime.check_models(models_dir)
        log.info("roadsight: models in %s pass their contract checks (%s)", models_dir,
                 ", ".join(path.name for path in checked))

    def _warm_up_sessions(self) -> None:
        """One run per model (and a small batch for the classifier) so no request pays for it."""
        model = self.classifier
        for n in (1, min(4, MAX_BATCH_SIZE)):
            model.session.run([model.output_name], {model.input_name: np.zeros((n, *self.tensor_shape), np.uint8)})
        side = self.pad_multiple * max(1, -(-64 // self.pad_multiple))
        self.dehazer.session.run([self.dehazer.output_name],
                                 {self.dehazer.input_name: np.zeros((1, 3, side, side), np.float32)})

    @bentoml.on_startup
    async def _start_batcher_warm_up(self) -> None:
        self._warm_up_task = asyncio.get_running_loop().create_task(self._warm_up_batcher())

    async def _warm_up_batcher(self) -> None:
        """Train BentoML's adaptive batcher before /readyz says ready.

        Its dispatcher learns how run time grows with batch size from its first ~11 batches and
        works at batch size 1 until then; these in-process calls go through it (the service's own
        proxy, as client requests do), so a burst right after start-up is already batched.
        """
        try:
            for _ in range(600):  # the proxy is attached right after the start-up hooks
                if getattr(self, "__self_proxy__", None) is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the service's self-proxy never appeared")
            tensor = base64.b64encode(np.zeros(self.tensor_shape, np.uint8).tobytes()).decode("ascii")
            for group in [1] * 10 + [2, 3, 4, 4]:
                await asyncio.gather(*(self.to_async.classify_tensors([tensor]) for _ in range(group)))
                self._batcher_warmup_calls += group
        except Exception:
            log.exception("warming up the adaptive batcher failed; serving anyway")
        self.batch_stats.reset()
        self._batcher_ready = True
        log.info("roadsight: adaptive batcher warmed up with %d calls", self._batcher_warmup_calls)

    def __is_ready__(self) -> bool:
        return self._batcher_ready

    # -- classification -------------------------------------------------------------------------

    def _prepare(self, path: Path) -> np.ndarray:
        image = processing.decode_image(_upload_bytes(path))
        return processing.classifier_input(image, self.classifier.contract["input"])

    def _tensor_text(self, chw: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(chw, dtype=np.uint8).tobytes()).decode("ascii")

    async def _classify_prepared(self, tensors: list[str]) -> list[dict] | JSONResponse:
        from bentoml.exceptions import BentoMLException

        for attempt in (1, 2):
            try:
                results = await self.to_async.classify_tensors(tensors)
                break
            except BentoMLException as exc:
                status = int(exc.error_code)
                if status == 503:
                    return _error(503, f"overloaded: the classifier could not meet its {MAX_LATENCY_MS} ms latency "
                                       "target for this request; retry shortly", headers={"Retry-After": "1"})
                log.error("classify_tensors failed with %s: %s", status, exc.message)
                return _error(500, "classification failed; see the server log")
            except Exception:  # the in-process connection itself failed: retry once, it is idempotent
                if attempt == 2:
                    log.exception("calling classify_tensors failed twice")
                    return _error(500, "classification failed; see the server log")
                log.warning("calling classify_tensors failed; retrying once", exc_info=True)
        if any("error" in result for result in results):
            log.error("classify_tensors refused the service's own tensors: %s", results)
            return _error(500, "classification failed; see the server log")
        return results

    @bentoml.api(route="/classify")
    async def classify(self, image: Path) -> Classification:
        """Classify one vehicle image (multipart field ``image``): bus, car or truck."""
        try:
            chw = await anyio.to_thread.run_sync(self._prepare, image)
        except processing.InputError as exc:
            return _error(exc.status, f"field 'image': {exc.message}")
        results = await self._classify_prepared([self._tensor_text(chw)])
        return results if isinstance(results, JSONResponse) else Classification(**results[0])

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path]) -> list[Classification]:
        """Classify several images sent in one request (repeat the multipart field ``images``)."""
        if not images:
            return _error(400, "field 'images': no files were sent")
        if len(images) > MAX_BATCH_IMAGES:
            return _error(413, f"field 'images': {len(images)} files, at most {MAX_BATCH_IMAGES} per request")
        tensors = []
        for index, path in enumerate(images):
            try:
                tensors.append(self._tensor_text(await anyio.to_thread.run_sync(self._prepare, path)))
            except processing.InputError as exc:
                return _error(exc.status, f"field 'images', file {index}: {exc.message}", index=index)
        results = await self._classify_prepared(tensors)
        return results if isinstance(results, JSONResponse) else [Classification(**r) for r in results]

    @bentoml.api(route="/classify_tensors", **BATCHING)
    def classify_tensors(self, tensors: list[str]) -> list[dict[str, t.Any]]:
        """The batched classifier behind /classify: each item is base64 of a uint8 [3, height, width]
        array (RGB, already stretched per the model's JSON, sizes in /info). BentoML's adaptive
        batching joins concurrent calls into one onnxruntime run. An item it cannot use gets
        ``{"error": ...}`` instead of a classification."""
        arrays, results = [], []
        expected = int(np.prod(self.tensor_shape))
        for text in tensors:
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError, TypeError):
                results.append({"error": "not base64"})
                continue
            if len(raw) != expected:
                results.append({"error": f"{len(raw)} bytes, expected {expected} (uint8 {list(self.tensor_shape)})"})
                continue
            arrays.append(np.frombuffer(raw, np.uint8).reshape(self.tensor_shape))
            results.append(None)
        if arrays:
            self.batch_stats.record(len(arrays))
            model = self.classifier
            (probabilities,) = model.session.run([model.output_name], {model.input_name: np.stack(arrays)})
            rows = iter(probabilities)
            results = [processing.classification(next(rows), self.labels) if r is None else r for r in results]
        return results

    # -- dehazing -------------------------------------------------------------------------------

    def _prepare_dehaze(self, path: Path, downscale: bool) -> tuple[Image.Image, tuple[int, int]]:
        image = processing.decode_image(_upload_bytes(path))
        original = image.size
        return processing.fit_for_dehazing(image, self.max_dehaze_pixels, processing.MAX_DEHAZE_SIDE, downscale), original

    def _run_dehazer(self, image: Image.Image, fmt: str, quality: int) -> bytes:
        width, height = image.size
        model = self.dehazer
        (clear,) = model.session.run([model.output_name],
                                     {model.input_name: processing.dehazer_input(image, self.pad_multiple)})
        return encode(processing.dehazer_output(clear, height, width), fmt, quality)

    @bentoml.api(route="/dehaze")
    async def dehaze(self, image: Path, format: t.Literal["png", "jpeg"] = "png",
                     quality: t.Annotated[int, Field(ge=1, le=100)] = 90, downscale: bool = False) -> Image.Image:
        """Dehaze one image (multipart field ``image``); the result has the input's size, as PNG or
        (``format=jpeg``) JPEG. Inputs over the limit (4 megapixels, 4096 px a side by default) are
        refused with 413 unless ``downscale=true``, which shrinks them to fit first."""
        try:
            picture, original = await anyio.to_thread.run_sync(self._prepare_dehaze, image, downscale)
        except processing.InputError as exc:
            return _error(exc.status, f"field 'image': {exc.message}")
        try:
            body = await anyio.to_thread.run_sync(self._run_dehazer, picture, format, quality,
                                                  limiter=self.dehaze_limiter)
        except Exception:
            log.exception("dehazing a %dx%d image failed", *picture.size)
            return _error(500, "dehazing failed; see the server log")
        headers = {"X-Image-Size": "%dx%d" % picture.size,
                   "Content-Disposition": f'inline; filename="dehazed.{format}"'}
        if picture.size != original:
            headers["X-Downscaled-From"] = "%dx%d" % original
        return Response(body, media_type=ENCODINGS[format][1], headers=headers)

    # -- introspection --------------------------------------------------------------------------

    def info(self) -> dict:
        return {
            "service": "roadsight",
            "models_dir": str(self.models_dir),
            "provider": self.classifier.provider,
            "models": {"classifier": self.classifier.describe(), "dehazer": self.dehazer.describe()},
            "input_sizes": {"classifier": {"height": self.tensor_shape[1], "width": self.tensor_shape[2]},
                            "dehazer": {"pad_multiple": self.pad_multiple}},
            "limits": {"max_upload_bytes": processing.MAX_UPLOAD_BYTES, "max_request_bytes": MAX_REQUEST_BYTES,
                       "upload_timeout_s": UPLOAD_TIMEOUT_S, "request_timeout_s": TIMEOUT_S,
                       "max_decode_pixels": Image.MAX_IMAGE_PIXELS, "max_dehaze_pixels": self.max_dehaze_pixels,
                       "max_dehaze_side": processing.MAX_DEHAZE_SIDE, "max_batch_images": MAX_BATCH_IMAGES},
            "runtime": {"workers": WORKERS, "worker_pid": os.getpid(), "cores": self.cores,
                        "intra_op_threads": self.threads},
            "batching": {"enabled": bool(BATCHING), "max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS,
                         "ready": self._batcher_ready, "warmup_calls": self._batcher_warmup_calls,
                         "observed": self.batch_stats.snapshot(),
                         "note": "observed onnxruntime batch sizes of this worker since start-up"},
        }


Roadsight.add_asgi_middleware(_RequestGuard, max_bytes=MAX_REQUEST_BYTES, upload_timeout_s=UPLOAD_TIMEOUT_S)
