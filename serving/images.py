"""Image decoding and resizing shared by training and serving (Pillow and NumPy only, no torch).

Training builds its tensors with these functions and serving feeds the ONNX models with them,
so the resize rule recorded in a model's metadata is applied by the very same code on both sides.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageOps

RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any Pillow image: EXIF orientation applied; grayscale, palette,
    RGBA/LA (composited on white), CMYK and 16-bit modes converted. The image is turned in place
    (callers pass what they have just decoded), and an upright RGB image comes back as it is, not
    copied twice."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes to upright RGB (first frame of animations)."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return to_rgb(image)


def stretch(image: Image.Image, width: int, height: int, resize: str = "bilinear") -> np.ndarray:
    """Resize ignoring aspect ratio (the lab's "stretch") and return uint8 CHW."""
    resized = image.resize((width, height), RESIZE_FILTERS[resize])
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad a (..., H, W) array bottom/right so H and W become multiples of ``multiple``
    (the dehazer contract's ``pad_multiple``); crop the model's output back with ``[..., :H, :W]``."""
    height, width = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, -height % multiple), (0, -width % multiple)]
    return np.pad(image, pad, mode="reflect")


def crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo ``pad_to_multiple``: the top-left ``height`` x ``width`` of a (..., H, W) array."""
    return image[..., :height, :width]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] to uint8 by rounding (the rule every saved or served dehazer output follows)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


ENCODINGS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg")}


def _png(hwc: np.ndarray) -> bytes:
    """PNG of an RGB uint8 HWC array: each row "Up"-filtered (PNG filter type 2) by NumPy, deflated by
    ISA-L at level 1 (isal; zlib's format). On the course's photos at 550x413: 2.6 ms, where zlib at
    level 1 takes 12 ms for 2% fewer bytes and Pillow's encoder 21 ms for 7% fewer (benchmarks/README.md)."""
    height, width, _ = hwc.shape
    rows = hwc.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG filters are

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    pixels = isal_zlib.compress(filtered.tobytes(), 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encode(image: Image.Image | np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode an RGB image (Pillow, or uint8 CHW array) as PNG or JPEG bytes."""
    if fmt == "png":
        hwc = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image.transpose(1, 2, 0)
        return _png(np.ascontiguousarray(hwc, dtype=np.uint8))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, ENCODINGS[fmt][0], quality=quality)
    return buffer.getvalue()
