"""The per-request classifier server users commonly write first, as P3's baseline: FastAPI, the
torch model called eagerly on one image per request inside the async handler (no batching, no
onnxruntime, torch's default threads). Same weights, same image preparation and the same JSON
answer as the service's /classify, so the load generator drives both alike.

    .venv/bin/python -m uvicorn benchmarks.naive_server:app --port 3001
"""
from __future__ import annotations

import torch
from fastapi import FastAPI, UploadFile

from serving.images import open_rgb, stretch
from serving.processing import classification

from .common import MODELS
from .torch_twins import classifier_twin

twin = classifier_twin(MODELS)
spec, labels = twin.contract["input"], twin.contract["labels"]
app = FastAPI(title="naive roadsight classifier")


@app.post("/classify")
async def classify(image: UploadFile) -> dict:
    pixels = stretch(open_rgb(await image.read()), spec["width"], spec["height"], spec["filter"])
    with torch.no_grad():
        probabilities = twin.model(torch.from_numpy(pixels)[None])[0]
    return classification(probabilities.numpy(), labels)


@app.get("/readyz")
def ready() -> dict:
    return {"ready": True}
