"""Pure pre- and post-processing for the service: bytes in, arrays out and back (Pillow and NumPy only).

Everything a client can get wrong is raised here as an ``InputError`` carrying the HTTP status the
service answers with, so the service itself never has to guess and never answers 500 for bad input.
The resize rule, input size, labels and padding come from the model's JSON (``models/README.md``).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import crop, pad_to_multiple, stretch, to_rgb, to_uint8

# The service's documented limits (overridable through the service's environment variables).
MAX_UPLOAD_BYTES = 32 * 2**20
MAX_DECODE_PIXELS = 40_000_000  # Pillow's decompression-bomb threshold inside the service
MAX_DEHAZE_PIXELS = 4_000_000  # the largest image /dehaze runs on (4 megapixels)
MAX_DEHAZE_SIDE = 4096  # the dehazer graph is exported for H, W <= 4096
# The formats the service decodes (JPEG includes the multi-picture JPEGs some phones save). Pillow
# would otherwise try every plugin it has on untrusted bytes, rarely used decoders included, and hand
# EPS/PostScript to Ghostscript where that is installed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class InputError(ValueError):
    """Something wrong with what the client sent; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class TooLarge(InputError):
    status = 413


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode uploaded bytes to upright 8-bit RGB, or raise ``InputError`` saying what is wrong.

    EXIF orientation is applied and grayscale, palette, RGBA, CMYK and 16-bit images are converted
    (``serving.images.to_rgb``); animations give their first frame. Only ``ACCEPTED_FORMATS`` are
    decoded. Images over ``max_pixels`` (default: Pillow's ``Image.MAX_IMAGE_PIXELS``) are refused
    before their pixels are decoded.
    """
    if not data:
        raise InputError("the uploaded image is empty (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"not an image in an accepted format ({len(data)} bytes); send a JPEG, PNG, WebP, "
                         "BMP, GIF or TIFF file") from exc
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise InputError(f"cannot read the image header: {exc}") from exc
    width, height = image.size
    if limit and width * height > limit:
        raise TooLarge(f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                       f"{limit / 1e6:.1f} megapixel limit for decoding")
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # truncated or corrupt data
        raise InputError(f"corrupt or truncated {image.format or 'image'} data: {exc}") from exc
    try:
        return to_rgb(image)
    except Exception as exc:
        raise InputError(f"cannot convert the {image.format} image (mode {image.mode}) to RGB: {exc}") from exc


def classifier_input(image: Image.Image, spec: dict) -> np.ndarray:
    """uint8 CHW array for the classifier, per its JSON ``input`` (``stretch`` with the named filter)."""
    if spec.get("resize", "stretch") != "stretch":
        raise ValueError(f"unsupported resize rule {spec.get('resize')!r} in the classifier contract")
    return stretch(image, int(spec["width"]), int(spec["height"]), spec.get("filter", "bilinear"))


def classification(probabilities: np.ndarray, labels: list[str]) -> dict:
    """``{label, confidence, probabilities: {name: p}}`` from one row of softmax output."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(probabilities) != len(labels):
        raise ValueError(f"model gave {len(probabilities)} probabilities for {len(labels)} labels")
    best = int(probabilities.argmax())
    return {"label": labels[best], "confidence": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(labels, probabilities)}}


def fit_for_dehazing(image: Image.Image, max_pixels: int = MAX_DEHAZE_PIXELS, max_side: int = MAX_DEHAZE_SIDE,
                     downscale: bool = False) -> Image.Image:
    """The image itself when within the limits; otherwise ``TooLarge``, or with ``downscale`` a copy
    shrunk (aspect ratio kept, Lanczos) to fit both limits."""
    width, height = image.size
    if width * height <= max_pixels and max(width, height) <= max_side:
        return image
    if not downscale:
        raise TooLarge(f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; /dehaze takes at most "
                       f"{max_pixels / 1e6:g} megapixels and {max_side} pixels a side (send downscale=true to have "
                       "it shrunk to fit)")
    scale = min(math.sqrt(max_pixels / (width * height)), max_side / max(width, height))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    while size[0] * size[1] > max_pixels:  # floor rounding can leave it a hair over
        size = (size[0] - 1, size[1]) if size[0] >= size[1] else (size[0], size[1] - 1)
    return image.resize(size, Image.Resampling.LANCZOS)


def dehazer_pixels(image: Image.Image, multiple: int) -> np.ndarray:
    """uint8 [3, H', W']: the image reflect-padded bottom/right to multiples of ``multiple``; what the
    service queues for a dehazer run (a quarter of the memory of the float input)."""
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    return pad_to_multiple(chw, max(1, int(multiple)))


def dehazer_scale(pixels: np.ndarray) -> np.ndarray:
    """The dehazer's float32 input in [0, 1] from uint8 pixels (any leading batch dimensions)."""
    return pixels.astype(np.float32) / 255.0


def dehazer_input(image: Image.Image, multiple: int) -> np.ndarray:
    """float32 [1, 3, H', W'] in [0, 1], reflect-padded bottom/right to multiples of ``multiple``."""
    return dehazer_scale(dehazer_pixels(image, multiple)[None])


def dehazer_output(clear: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 CHW of one image's [3, H', W'] model output cropped back to ``height`` x ``width``."""
    return to_uint8(crop(np.asarray(clear), height, width))
