"""The roadsight BentoML service: vehicle classification and dehazing on the shipped ONNX models.

    bentoml serve serving.service:Roadsight --host 127.0.0.1 --port 3000      # or: make serve

Endpoints (multipart form uploads; errors are JSON ``{"error": ...}`` with a 4xx status):

- ``POST /classify``        field ``image``: ``{label, confidence, probabilities: {bus, car, truck}}``
- ``POST /classify_batch``  field ``images`` (repeated, up to 64): a list of the above, in order
- ``POST /dehaze``          field ``image`` (+ ``format`` png|jpeg, ``quality``, ``downscale``): the image
- ``GET /info``             models, versions (sha256), provider, input sizes, limits, observed batch sizes
- ``GET /livez``, ``/readyz``, ``/metrics`` (BentoML's own), ``/`` (OpenAPI UI)

Each request's form is parsed and checked once (``_RequestGuard``), its images decoded and resized in
a thread, and their arrays go to the model's batcher (``serving/batching.py``) inside the same
worker: concurrent requests share one onnxruntime run without a second request path, an idle model
runs a request at once, and a request alone in the worker has every core for its image.
Everything the models need (labels, input size, resize rule, padding) comes from their JSON files
(models/README.md). Settings come from ``ROADSIGHT_*`` environment variables, read when the module
is imported (see README "Serving").
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import time
import typing as t
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import anyio
import bentoml
import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import bentoml_timeout, openapi, processing
from serving.batching import Batcher, Overloaded
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
MAX_BATCH_SIZE = max(1, _env_int("ROADSIGHT_MAX_BATCH_SIZE", 32))  # 1: batching off
# Images waiting for the classifier per worker before requests are shed (503): 8 full batches,
# about 2 s of work on 2 CPU cores; a client waits that long at most before its run starts.
MAX_QUEUE = _env_int("ROADSIGHT_MAX_QUEUE", 256)
# On the CPU, the most pixels one dehazer run takes (four 550x413 frames, a 720p one): batches give no
# speed per pixel there, and each run at once keeps memory laid out for this many (~350 MB per megapixel).
DEHAZE_RUN_PIXELS = 1_000_000
TIMEOUT_S = _env_int("ROADSIGHT_TIMEOUT_S", 120)
MAX_REQUEST_BYTES = _env_int("ROADSIGHT_MAX_REQUEST_BYTES", 64 * 2**20)
UPLOAD_TIMEOUT_S = _env_int("ROADSIGHT_UPLOAD_TIMEOUT_S", 60)
MAX_BATCH_IMAGES = 64


class Classification(BaseModel):
    label: str = Field(description="the most probable class")
    confidence: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability (labels from the model's JSON)")


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: t.Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _refuse_large_upload(size: int) -> None:
    if size > processing.MAX_UPLOAD_BYTES:
        raise processing.TooLarge(f"the uploaded image is {size / 2**20:.1f} MiB, over the "
                                  f"{processing.MAX_UPLOAD_BYTES / 2**20:.0f} MiB limit")


async def _info_endpoint(request: Request) -> Response:
    service = bentoml.get_current_service()
    if service is None:
        return _error(503, "the service is still starting")
    return JSONResponse(service.info())


@dataclass(frozen=True)
class _Form:
    """What an API's multipart form takes, from its own input model."""
    spec: type  # the API's pydantic input model (BentoML's input_spec)
    files: frozenset[str]  # fields that take files
    lists: frozenset[str]  # fields that take several values
    handler: str  # the service method that answers it, the uploads as bytes (Roadsight.<api>_from_bytes)

    @classmethod
    def of(cls, method) -> _Form:
        fields = method.input_spec.model_fields
        handler = f"{method.name}_from_bytes"
        if not callable(getattr(Roadsight.inner, handler, None)):
            raise TypeError(f"API {method.name!r} has no {handler} method to answer its HTTP requests")
        lists = frozenset(name for name, field in fields.items() if t.get_origin(field.annotation) is list)
        return cls(method.input_spec, frozenset(method.input_spec.multipart_fields), lists, handler)

    def example(self) -> str:
        return "curl " + " ".join(f"-F {name}=@photo.jpg" for name in sorted(self.files)) + " ..."


@functools.cache
def _openapi() -> tuple[dict, dict[str, str]]:
    """The service's OpenAPI document (serving/openapi.py) and the methods each of its paths takes."""
    spec = openapi.document(Roadsight.openapi_spec.asdict(), Roadsight.inner.__doc__ + openapi.CONVENTIONS)
    return spec, openapi.allowed_methods(spec)


def _with_service_headers(send):
    """``send`` adding to a response the headers BentoML's API handler gives its answers (``Server``,
    ``X-BentoML-Request-ID``: the request's span, as in BentoML's access log), for the answers the
    request guard gives in its place."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.context import trace_context

    headers = [(b"server", f"BentoML Service/{Roadsight.name}".encode())]
    if trace_context.request_id is not None:
        span_format = BentoMLContainer.logging_formatting.get()["span_id"]
        headers.append((b"x-bentoml-request-id", format(trace_context.request_id, span_format).encode()))

    async def stamped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)
    return stamped


class _RequestGuard:
    """ASGI middleware in front of BentoML's request handling, inside its metrics, tracing, access log
    and timeout. It serves the OpenAPI document that says what the service really answers
    (``/docs.json``, serving/openapi.py), and it is the one request path of the APIs' multipart
    forms: it reads and checks each form once and hands its values to the service's
    ``<api>_from_bytes`` method (BentoML's own handling would parse it a second time, write every
    upload to a temporary file and validate it again). It answers, with a JSON error, what BentoML's
    own request parsing would turn into a 500, a pydantic error list or a silent guess: methods a
    documented path does not take (405 with ``Allow``), bodies over ``max_bytes`` (413), uploads
    still incomplete after ``upload_timeout_s`` (408, before BentoML's whole-request timeout answers
    504), bodies that are not multipart/form-data (415, or 400 when there is no body or JSON),
    malformed multipart bodies, unknown or missing form fields, a single-value field sent twice, a file
    sent in a plain field or text in a file field, and values the API's input model refuses (400).
    Text in a file field is refused rather than fetched as a URL, so the service never makes outbound
    requests on a client's behalf."""

    def __init__(self, app, max_bytes: int, upload_timeout_s: float):
        self.app, self.max_bytes, self.upload_timeout_s = app, max_bytes, upload_timeout_s

    @staticmethod
    @functools.cache
    def _forms() -> dict[str, _Form]:
        return {method.route: _Form.of(method) for method in Roadsight.apis.values()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self._guard(scope, receive, send, _with_service_headers(send))

    async def _guard(self, scope, receive, pass_on, send):
        """Answers through ``send`` (BentoML's response headers added) or passes the request on to
        BentoML's app, which answers through ``pass_on`` with its own."""
        path, method = scope["path"], scope["method"]
        document, allowed = _openapi()
        if path == "/docs.json" and method in ("GET", "HEAD"):
            return await JSONResponse(document)(scope, receive, send)
        if path in allowed and method not in allowed[path].split(", "):
            return await _error(405, f"{path} takes {allowed[path]}, not {method}",
                                headers={"Allow": allowed[path]})(scope, receive, send)
        form = self._forms().get(path)
        if form is None:
            return await self.app(scope, receive, pass_on)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(int(length))(scope, receive, send)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            status = 400 if media_type in ("", "application/json") else 415
            return await _error(status, f"{path} takes multipart/form-data uploads, not "
                                        f"{media_type or 'a body without a content type'} (e.g. {form.example()})"
                                )(scope, receive, send)
        body = await self._receive_body(receive)
        if body is None:  # the client went away
            return
        if isinstance(body, Response):
            return await body(scope, receive, send)
        values = await self._read_form(headers, body, form)
        if isinstance(values, str):
            return await _error(400, values)(scope, receive, send)
        await (await self._answer(path, form, values))(scope, receive, send)

    @staticmethod
    async def _answer(path: str, form: _Form, values: dict[str, t.Any]) -> Response:
        service = bentoml.get_current_service()
        if service is None:
            return _error(503, "the service is still starting")
        try:
            result = await service.answer(form.handler, values)
        except Exception:
            log.exception("answering %s failed", path)
            return _error(500, f"{path} failed; see the server log")
        if isinstance(result, Response):
            return result
        if isinstance(result, list):
            return JSONResponse([item.model_dump() for item in result])
        return JSONResponse(result.model_dump())

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
    async def _read_form(headers, body: bytes, form: _Form) -> dict[str, t.Any] | str:
        """The values of the multipart ``body`` for this API (each file's bytes), or what is wrong with
        it. Values are read as BentoML reads them (JSON where they parse) and validated by the API's own
        input model, strictly (as documented: ``downscale`` is true or false, not 0 or "yes"), with a
        path standing in for each file, so BentoML's pydantic errors never reach a client."""
        from pydantic import ValidationError
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            parsed = await MultiPartParser(headers, stream(), max_part_size=processing.MAX_UPLOAD_BYTES).parse()
        except MultiPartException as exc:
            return f"malformed multipart/form-data body: {exc.message}"
        except Exception as exc:  # the multipart library raises several types on broken bodies
            return f"malformed multipart/form-data body: {exc or type(exc).__name__}"
        accepted = form.spec.model_fields
        values: dict[str, t.Any] = {}
        stand_ins: dict[str, t.Any] = {}  # what the input model validates: a path for each file
        try:
            sent = collections.Counter(name for name, _ in parsed.multi_items())
            for name, value in parsed.multi_items():
                if name not in accepted:
                    return f"unexpected form field {name!r}; this endpoint takes {', '.join(accepted)}"
                if name in form.files and not isinstance(value, UploadFile):
                    return f"field {name!r} must be a file upload, not a text value"
                if name not in form.files and isinstance(value, UploadFile):
                    return f"field {name!r} takes a plain value, not a file"
                if sent[name] > 1 and name not in form.lists:
                    return f"field {name!r} was sent {sent[name]} times; it takes one value"
                if name in form.files:
                    pairs = ((values, await value.read()), (stand_ins, PurePath(value.filename or "upload")))
                else:
                    with contextlib.suppress(ValueError):  # BentoML reads plain values as JSON when they are
                        value = json.loads(value)
                    pairs = ((values, value), (stand_ins, value))
                for target, item in pairs:
                    target[name] = [*target.get(name, []), item] if name in form.lists else item
        finally:
            await parsed.close()
        try:
            form.spec.model_validate(stand_ins, strict=True)  # a boolean is true or false, as documented
        except ValidationError as exc:
            error = exc.errors()[0]
            name = ".".join(str(part) for part in error["loc"])
            if error["type"] == "missing":
                return f"field {name!r} is missing (e.g. {form.example()})"
            return f"field {name!r}: {error['msg']}"
        return values


_info_app = Starlette(routes=[Route("/info", _info_endpoint, methods=["GET"])])


def _overloaded(what: str) -> JSONResponse:
    return _error(503, f"overloaded: the {what} queue is full; retry shortly", headers={"Retry-After": "1"})


@bentoml.asgi_app(_info_app, path="/")
@bentoml.service(name="roadsight", workers=WORKERS, threads=2, traffic={"timeout": TIMEOUT_S})
class Roadsight:
    """Vehicle classification (bus / car / truck) and image dehazing with the shipped ONNX models."""

    def __init__(self) -> None:
        from serving import runtime  # onnxruntime is imported here, in the worker, not at import time

        runtime.limit_malloc_arenas()
        Image.MAX_IMAGE_PIXELS = _env_int("ROADSIGHT_MAX_DECODE_PIXELS", processing.MAX_DECODE_PIXELS)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is refused (413)
        self.max_dehaze_pixels = _env_int("ROADSIGHT_DEHAZE_MAX_PIXELS", processing.MAX_DEHAZE_PIXELS)
        self.models_dir = runtime.default_models_dir()
        self.cores = runtime.available_cores()
        worker_cores = max(1, self.cores // max(1, WORKERS))
        cpu_runs, self.threads = runtime.cpu_layout(worker_cores, _env_int("ROADSIGHT_PARALLEL_RUNS", 0),
                                                    _env_int("ROADSIGHT_INTRA_OP_THREADS", 0))
        preference = os.environ.get("ROADSIGHT_PROVIDER", "auto").strip().lower() or "auto"
        started = time.perf_counter()
        self.classifier = runtime.load_model(self.models_dir, "classify", self.threads, preference)
        self.dehazer = runtime.load_model(self.models_dir, "dehaze", self.threads, preference)
        # A GPU runs one model's work at a time anyway: there, concurrent requests only batch.
        self.parallel_runs = {model.task: cpu_runs if model.provider == "CPUExecutionProvider" else 1
                              for model in (self.classifier, self.dehazer)}
        spec = self.classifier.contract["input"]
        self.labels = list(self.classifier.contract["labels"])
        self.tensor_shape = (3, int(spec["height"]), int(spec["width"]))
        self.pad_multiple = int(self.dehazer.contract.get("pad_multiple", 1))
        # A session per run at once, each laid out at start-up for the largest run it gets (runtime.SessionPool):
        # a full batch for the classifier; for the dehazer on the CPU, batches of up to
        # ROADSIGHT_DEHAZE_RUN_PIXELS, a larger image alone in an arena-less session.
        on_cpu = self.dehazer.provider == "CPUExecutionProvider"
        run_pixels = _env_int("ROADSIGHT_DEHAZE_RUN_PIXELS", DEHAZE_RUN_PIXELS)
        self.dehaze_run_pixels = min(self.max_dehaze_pixels, run_pixels) if on_cpu else self.max_dehaze_pixels
        # A request alone in the worker runs its image with all the worker's cores (runtime.SessionPool's
        # solo session): on 2 cores, classifying takes 8.5 ms where a 1-thread run takes 14.3, and dehazing
        # a 550x413 photo 106-109 ms (arena-less) where it takes 160-166 (benchmarks/README.md).
        self.classifier_sessions = runtime.session_pool(self.classifier, self.parallel_runs["classify"], self.threads,
                                                        solo_threads=worker_cores)
        self.dehazer_sessions = runtime.session_pool(self.dehazer, self.parallel_runs["dehaze"], self.threads,
                                                     self.dehaze_run_pixels if on_cpu else None,
                                                     solo_threads=worker_cores)
        self.requests_in_flight = 0  # form requests being answered (answer)
        self.classify_batcher = Batcher("classifier", self._run_classifier, MAX_BATCH_SIZE, MAX_QUEUE,
                                        parallel=self.parallel_runs["classify"])
        # The dehazer's runs in progress hold at most the pixels of one largest image together (the
        # memory bound /dehaze always had), so same-size camera frames share runs or run side by side
        # and a 4-megapixel image runs alone.
        self.dehaze_max_queue_pixels = _env_int("ROADSIGHT_DEHAZE_MAX_QUEUE_PIXELS",
                                                max(16_000_000, self.max_dehaze_pixels))
        self.dehaze_batcher = Batcher("dehazer", self._run_dehazer, MAX_BATCH_SIZE, self.dehaze_max_queue_pixels,
                                      cost=lambda pixels: pixels.shape[-2] * pixels.shape[-1],
                                      max_batch_cost=self.max_dehaze_pixels, parallel=self.parallel_runs["dehaze"],
                                      max_run_cost=self.dehaze_run_pixels)
        self._warm_up()
        log.info("roadsight: models from %s; classifier %s on %s, dehazer %s on %s; runs at once %s of %d "
                 "intra-op threads (%d cores / %d workers); batches of up to %d; ready in %.1f s", self.models_dir,
                 self.classifier.sha256[:12], self.classifier.provider, self.dehazer.sha256[:12],
                 self.dehazer.provider, self.parallel_runs, self.threads, self.cores, WORKERS, MAX_BATCH_SIZE,
                 time.perf_counter() - started)

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

    def _warm_up(self) -> None:
        """Every session through the largest run it will get (the classifier's full batch, the dehazer's
        per-run pixels a little over, for shapes that round up inside the net), so its memory arena is laid
        out once and no request pays for onnxruntime's first-run set-up; the classifier at batch 1 too."""
        for n in sorted({1, MAX_BATCH_SIZE}):
            self.classifier_sessions.warm_up(np.zeros((n, *self.tensor_shape), np.uint8))
        if self.dehazer_sessions.max_run_cost is None:  # on a GPU: no layout to set, only the set-up
            side = self.pad_multiple * max(1, -(-64 // self.pad_multiple))
        else:
            side = self.pad_multiple * math.ceil(math.sqrt(1.05 * self.dehaze_run_pixels) / self.pad_multiple)
        self.dehazer_sessions.warm_up(np.zeros((1, 3, side, side), np.float32))

    @bentoml.on_shutdown
    def _stop_batchers(self) -> None:
        self.classify_batcher.close()
        self.dehaze_batcher.close()

    # -- the models (called in the batchers' threads) --------------------------------------------

    @property
    def _alone(self) -> bool:
        """No other form request is being answered: a run may take every core (runtime.SessionPool)."""
        return self.requests_in_flight <= 1

    def _run_classifier(self, images: np.ndarray) -> np.ndarray:
        return self.classifier_sessions.run(images, alone=self._alone)

    def _run_dehazer(self, pixels: np.ndarray) -> np.ndarray:
        return self.dehazer_sessions.run(processing.dehazer_scale(pixels), cost=pixels[:, 0].size,
                                         alone=self._alone)

    async def answer(self, method: str, values: dict[str, t.Any]) -> t.Any:
        """The request guard's way in: ``method`` (an ``<api>_from_bytes``) on a checked form's values,
        counted among the requests in flight, so that a request alone in the worker runs on every core
        (_run_classifier, _run_dehazer) and one among others leaves the cores to the runs side by side."""
        self.requests_in_flight += 1
        try:
            return await getattr(self, method)(**values)
        finally:
            self.requests_in_flight -= 1

    # -- classification -------------------------------------------------------------------------
    # Each API has a ``<name>_from_bytes`` twin taking the uploads as bytes: HTTP requests reach it from
    # the request guard, which has already parsed and checked the form (one parse, no temporary file
    # per upload); the API methods themselves serve in-process callers (``Roadsight.inner()``).

    def _prepare(self, data: bytes) -> np.ndarray:
        _refuse_large_upload(len(data))
        return processing.classifier_input(processing.decode_image(data), self.classifier.contract["input"])

    async def _classify(self, arrays: list[np.ndarray]) -> list[Classification] | JSONResponse:
        try:
            rows = await self.classify_batcher.submit(arrays)
        except Overloaded:
            return _overloaded("classifier")
        except Exception:
            log.exception("classifying %d images failed", len(arrays))
            return _error(500, "classification failed; see the server log")
        return [Classification(**processing.classification(row, self.labels)) for row in rows]

    @bentoml.api(route="/classify")
    async def classify(self, image: Path) -> Classification:
        """Classify one vehicle image (multipart field ``image``): bus, car or truck."""
        return await self.classify_from_bytes(await anyio.Path(image).read_bytes())

    async def classify_from_bytes(self, image: bytes) -> Classification | JSONResponse:
        try:
            chw = await anyio.to_thread.run_sync(self._prepare, image)
        except processing.InputError as exc:
            return _error(exc.status, f"field 'image': {exc.message}")
        results = await self._classify([chw])
        return results if isinstance(results, JSONResponse) else results[0]

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: t.Annotated[list[Path], Field(min_length=1, max_length=MAX_BATCH_IMAGES)]
                             ) -> list[Classification]:
        """Classify several images sent in one request (repeat the multipart field ``images``, at most 64)."""
        return await self.classify_batch_from_bytes([await anyio.Path(path).read_bytes() for path in images])

    async def classify_batch_from_bytes(self, images: list[bytes]) -> list[Classification] | JSONResponse:
        arrays = []
        for index, data in enumerate(images):
            try:
                arrays.append(await anyio.to_thread.run_sync(self._prepare, data))
            except processing.InputError as exc:
                return _error(exc.status, f"field 'images', file {index}: {exc.message}", index=index)
        return await self._classify(arrays)

    # -- dehazing -------------------------------------------------------------------------------

    def _prepare_dehaze(self, data: bytes, downscale: bool) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """The padded pixels for the dehazer, the size to crop its output to, and the upload's size."""
        _refuse_large_upload(len(data))
        image = processing.decode_image(data)
        original = image.size
        image = processing.fit_for_dehazing(image, self.max_dehaze_pixels, processing.MAX_DEHAZE_SIDE, downscale)
        return processing.dehazer_pixels(image, self.pad_multiple), image.size, original

    @staticmethod
    def _encode_dehazed(clear: np.ndarray, width: int, height: int, fmt: str, quality: int) -> bytes:
        return encode(processing.dehazer_output(clear, height, width), fmt, quality)

    @bentoml.api(route="/dehaze")
    async def dehaze(self, image: Path, format: t.Literal["png", "jpeg"] = "png",
                     quality: t.Annotated[int, Field(ge=1, le=100)] = 90, downscale: bool = False) -> Image.Image:
        """Dehaze one image (multipart field ``image``); the result has the input's size, as PNG or
        (``format=jpeg``) JPEG. Inputs over the limit (4 megapixels, 4096 px a side by default) are
        refused with 413 unless ``downscale=true``, which shrinks them to fit first."""
        return await self.dehaze_from_bytes(await anyio.Path(image).read_bytes(),
                                            format, quality, downscale)

    async def dehaze_from_bytes(self, image: bytes, format: str = "png", quality: int = 90,
                                downscale: bool = False) -> Response:
        try:
            pixels, (width, height), original = await anyio.to_thread.run_sync(self._prepare_dehaze, image, downscale)
        except processing.InputError as exc:
            return _error(exc.status, f"field 'image': {exc.message}")
        try:
            (clear,) = await self.dehaze_batcher.submit([pixels])
            body = await anyio.to_thread.run_sync(self._encode_dehazed, clear, width, height, format, quality)
        except Overloaded:
            return _overloaded("dehazer")
        except Exception:
            log.exception("dehazing a %dx%d image failed", width, height)
            return _error(500, "dehazing failed; see the server log")
        headers = {"X-Image-Size": f"{width}x{height}", "Content-Disposition": f'inline; filename="dehazed.{format}"'}
        if (width, height) != original:
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
                        "intra_op_threads": self.threads, "parallel_runs": self.parallel_runs,
                        "lone_run_threads": {"classify": self.classifier_sessions.solo_threads,
                                             "dehaze": self.dehazer_sessions.solo_threads}},
            "batching": {
                "max_batch_size": MAX_BATCH_SIZE,
                "classifier": {"max_queue_images": MAX_QUEUE, "queued_images": self.classify_batcher.queued,
                               "observed": self.classify_batcher.stats.snapshot()},
                "dehazer": {"max_batch_pixels": self.max_dehaze_pixels,
                            "max_queue_pixels": self.dehaze_max_queue_pixels,
                            "queued_pixels": self.dehaze_batcher.queued,
                            "max_run_pixels": self.dehaze_run_pixels,
                            "observed": self.dehaze_batcher.stats.snapshot()},
                "note": "observed: sizes of this worker's onnxruntime runs since start-up"},
        }


Roadsight.add_asgi_middleware(_RequestGuard, max_bytes=MAX_REQUEST_BYTES, upload_timeout_s=UPLOAD_TIMEOUT_S)
