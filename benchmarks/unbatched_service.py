"""The roadsight service with adaptive batching off, P2's "off" side: each /classify request runs
onnxruntime on its own image.

BentoML 1.4.39 refuses ``max_batch_size=1`` at import ("'max_batch_size' must be > 1"), so
ROADSIGHT_MAX_BATCH_SIZE cannot switch batching off. This module imports the very same service with
``bentoml.api`` briefly made to declare every API unbatched; nothing else differs.

    .venv/bin/bentoml serve benchmarks.unbatched_service:Roadsight
"""
from __future__ import annotations

import bentoml

_declare_api = bentoml.api


def _unbatched_api(*args, **options):
    for option in ("batch_dim", "max_batch_size", "max_latency_ms"):
        options.pop(option, None)
    return _declare_api(*args, **{**options, "batchable": False})


bentoml.api = _unbatched_api
try:
    from serving.service import Roadsight  # noqa: E402  (declared while bentoml.api is patched)
finally:
    bentoml.api = _declare_api

__all__ = ["Roadsight"]
