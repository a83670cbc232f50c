"""The service's OpenAPI document (``/docs.json``): BentoML's, told the truth.

BentoML documents each API with its request and 200 schemas, and 400/404/500 answers whose bodies
say ``{"error": str, "detail": str}``. The service answers otherwise: every error is JSON
``{"error": "..."}`` (``/classify_batch`` adds the ``index`` of the file at fault) with the
statuses of ``ERRORS``; 405 answers carry ``Allow`` and 503 answers ``Retry-After``; ``/dehaze``
answers PNG or JPEG; ``/info`` (a mounted Starlette route BentoML does not see) exists. ``document``
rewrites those parts of BentoML's document and ``allowed_methods`` reads the methods of each path
back from it, so the request guard's 405 answers follow the same document.
"""
from __future__ import annotations

import copy
import typing as t

ERROR_SCHEMA = "Error"
ERROR_BODY = {
    "type": "object", "title": ERROR_SCHEMA, "required": ["error"], "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "what was wrong, for a person to read"},
        "index": {"type": "integer", "minimum": 0, "description": "/classify_batch: the file at fault (from 0)"}},
}

# status -> when the service answers it, on the POST APIs
ERRORS = {
    400: "The request is malformed: not multipart/form-data with the documented fields, a field sent twice "
         "or unknown, a value out of range (more than 64 images in /classify_batch too), a file that is not an "
         "image in an accepted format, empty or truncated.",
    405: "The API takes POST; the Allow header says so.",
    408: "The upload did not arrive within the upload timeout (ROADSIGHT_UPLOAD_TIMEOUT_S).",
    413: "The request, a file or an image is over a limit (bytes, decoded pixels, /dehaze's megapixels "
         "without downscale=true).",
    415: "The body is not multipart/form-data.",
    500: "The model failed on a valid request; the server log says why.",
    503: "Overloaded: the model's queue is full. Retry after the Retry-After seconds.",
    504: "No answer within the request timeout (ROADSIGHT_TIMEOUT_S).",
}
HEADERS = {405: {"Allow": "the methods the path takes"}, 503: {"Retry-After": "seconds to wait before retrying"}}
INFO_ROUTE = "/info"
CONVENTIONS = ("\n\nUploads are multipart/form-data; JPEG, PNG, WebP, BMP, GIF and TIFF are decoded, told by their "
               "bytes. Every error is JSON {\"error\": \"...\"} saying what was wrong; 503 answers carry "
               "Retry-After. /info describes the served models and limits.")


def _error_response(status: int, description: str) -> dict:
    response: dict[str, t.Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}}
    if status in HEADERS:
        response["headers"] = {name: {"description": text, "required": True, "schema": {"type": "string"}}
                               for name, text in HEADERS[status].items()}
    return response


def _method_not_allowed(methods: str) -> dict:
    return _error_response(405, f"The path takes {methods}; the Allow header says so.")


def document(bentoml_document: dict, description: str) -> dict:
    """BentoML's document (``Service.openapi_spec.asdict()``) with the service's real answers."""
    spec = copy.deepcopy(bentoml_document)
    spec["info"]["description"] = description
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA] = ERROR_BODY
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = {int(status): response for status, response in operation["responses"].items()}
            if method == "post":
                ok = responses[200]
                if "image/*" in ok.get("content", {}):  # /dehaze: PNG by default, JPEG with format=jpeg
                    schema = ok["content"].pop("image/*")["schema"]
                    ok["content"] = {"image/png": {"schema": schema}, "image/jpeg": {"schema": schema}}
                operation["responses"] = {200: ok, **{status: _error_response(status, text)
                                                      for status, text in ERRORS.items()}}
            else:
                operation["responses"] = {200: responses[200], 405: _method_not_allowed(method.upper())}
    spec["paths"]["/readyz"]["get"]["responses"][503] = {"description": "Not ready yet (models loading)."}
    spec["paths"][INFO_ROUTE] = {"get": {
        "tags": ["Infrastructure"], "description": "The served models (name, sha256 version, provider, input "
        "sizes, labels), the service's limits and the batch sizes its onnxruntime runs have had.",
        "operationId": "roadsight__info",
        "responses": {200: {"description": "Successful Response",
                            "content": {"application/json": {"schema": {"type": "object"}}}},
                      405: _method_not_allowed("GET"),
                      503: _error_response(503, "The service is still starting.")}}}
    return spec


def allowed_methods(spec: dict) -> dict[str, str]:
    """Path -> the ``Allow`` header value of a 405 there (HEAD goes with GET, as Starlette serves it)."""
    allowed = {}
    for path, item in spec["paths"].items():
        methods = [method.upper() for method in item]
        if "GET" in methods:
            methods.append("HEAD")
        allowed[path] = ", ".join(methods)
    return allowed
