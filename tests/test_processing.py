"""Pre- and post-processing of the service on odd inputs (no server, no model)."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE
from serving import processing
from serving.images import crop, encode, open_rgb, pad_to_multiple, stretch, to_uint8
from serving.processing import InputError, TooLarge, decode_image

CAR = SAMPLE / "vehicles" / "car" / "car001.jpg"


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width=24, height=16) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)


def test_a_real_jpeg_decodes_as_the_training_side_reads_it():
    image = decode_image(CAR.read_bytes())
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(open_rgb(CAR)))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: Image.new("RGB", (1, 1), (10, 20, 30)), id="1x1"),
    pytest.param(lambda: Image.new("L", (5, 3), 77), id="grayscale"),
    pytest.param(lambda: Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE), id="palette"),
    pytest.param(lambda: Image.fromarray(gradient()).convert("1"), id="bilevel"),
    pytest.param(lambda: Image.new("I;16", (6, 4), 65535), id="16-bit"),
    pytest.param(lambda: Image.new("F", (6, 4), 0.5), id="float"),
])
def test_odd_modes_become_rgb(make):
    source = make()
    image = decode_image(encoded(source, "TIFF" if source.mode == "F" else "PNG"))
    assert image.mode == "RGB" and image.size == source.size


def test_16_bit_png_is_scaled_not_clipped():
    image = decode_image(encoded(Image.fromarray(np.full((4, 4), 32896, np.uint16))))  # ~ 50% grey in 16 bits
    assert np.asarray(image).max() == 128


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    pixels = np.asarray(decode_image(encoded(rgba)))
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[3, 3]) == (255, 255, 255)


def test_cmyk_jpeg_converts():
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    image = decode_image(encoded(cmyk, "JPEG"))
    assert image.mode == "RGB" and image.size == (24, 16)


def test_exif_orientation_is_applied():
    landscape = Image.fromarray(gradient(30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    image = decode_image(encoded(landscape, "JPEG", exif=exif.tobytes()))
    assert image.size == (10, 30)


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(data))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, this is not an image", "not an image"),
    (CAR.read_bytes()[: len(CAR.read_bytes()) // 2], "corrupt or truncated JPEG"),
    (CAR.read_bytes()[:600], "(?i)truncated"),
    (CAR.read_bytes()[:20], "cannot read the image header|truncated|not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|cannot read|truncated"),
])
def test_broken_uploads_are_input_errors(data, message):
    with pytest.raises(InputError, match=message) as caught:
        decode_image(data)
    assert caught.value.status == 400


def test_decompression_bombs_are_refused_before_decoding():
    big = encoded(Image.new("L", (300, 300)))
    with pytest.raises(TooLarge, match="megapixel limit") as caught:
        decode_image(big, max_pixels=300 * 299)
    assert caught.value.status == 413
    assert decode_image(big, max_pixels=300 * 300).size == (300, 300)


def test_pillows_own_bomb_guard_is_an_input_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(TooLarge):
        decode_image(encoded(Image.new("L", (100, 100))), max_pixels=10**9)  # over 2x Pillow's limit


def test_classifier_input_follows_the_contract():
    image = decode_image(CAR.read_bytes())
    spec = {"height": 40, "width": 56, "resize": "stretch", "filter": "bilinear"}
    x = processing.classifier_input(image, spec)
    assert x.shape == (3, 40, 56) and x.dtype == np.uint8
    assert np.array_equal(x, stretch(open_rgb(CAR), 56, 40, "bilinear"))
    with pytest.raises(ValueError, match="resize rule"):
        processing.classifier_input(image, {**spec, "resize": "crop"})


def test_classification_names_labels_in_output_order():
    result = processing.classification(np.array([0.1, 0.7, 0.2], np.float32), ["bus", "car", "truck"])
    assert result["label"] == "car" and result["confidence"] == pytest.approx(0.7)
    assert list(result["probabilities"]) == ["bus", "car", "truck"]
    with pytest.raises(ValueError):
        processing.classification(np.array([0.5, 0.5]), ["bus", "car", "truck"])


def test_dehazer_padding_and_crop_round_trip():
    image = Image.fromarray(gradient(13, 5))
    x = processing.dehazer_input(image, 8)
    assert x.shape == (1, 3, 8, 16) and x.dtype == np.float32 and x.max() <= 1.0
    chw = np.asarray(image).transpose(2, 0, 1)
    assert np.array_equal(x[0], pad_to_multiple(chw, 8).astype(np.float32) / 255)
    assert np.array_equal(x[0, :, 5:, :13], x[0, :, 3:0:-1, :13][:, :3])  # reflected, not repeated
    out = processing.dehazer_output(x[0], 5, 13)
    assert out.shape == (3, 5, 13) and np.array_equal(out, chw)
    assert processing.dehazer_input(Image.new("RGB", (1, 1)), 16).shape == (1, 3, 16, 16)
    assert processing.dehazer_input(image, 1).shape == (1, 3, 5, 13)


def test_to_uint8_rounds_and_clips():
    assert to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]
    assert crop(np.zeros((1, 3, 8, 8)), 5, 6).shape == (1, 3, 5, 6)


def test_dehaze_size_limits():
    small = Image.new("RGB", (100, 50))
    assert processing.fit_for_dehazing(small, max_pixels=5000) is small
    with pytest.raises(TooLarge, match="downscale=true") as caught:
        processing.fit_for_dehazing(small, max_pixels=4999)
    assert caught.value.status == 413
    shrunk = processing.fit_for_dehazing(small, max_pixels=1234, downscale=True)
    assert shrunk.width * shrunk.height <= 1234 and abs(shrunk.width / shrunk.height - 2) < 0.1
    tall = processing.fit_for_dehazing(Image.new("RGB", (10, 5000)), max_pixels=10**6, max_side=4096, downscale=True)
    assert tall.height <= 4096


@pytest.mark.parametrize("fmt, name", [("png", "PNG"), ("jpeg", "JPEG")])
def test_encode(fmt, name):
    chw = gradient(9, 7).transpose(2, 0, 1)
    data = encode(chw, fmt)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == name and decoded.size == (9, 7)
    if fmt == "png":
        assert np.array_equal(np.asarray(decoded).transpose(2, 0, 1), chw)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (137, 103)])
def test_png_encoding_is_lossless_on_noise_and_photos(size):
    """The service's own PNG writer (serving/images.py), read back by Pillow: every pixel, any size."""
    noise = np.random.default_rng(0).integers(0, 256, (3, size[1], size[0]), dtype=np.uint8)
    photo = open_rgb(sorted((SAMPLE / "dehaze" / "hazy").glob("*.jpg"))[0]).resize(size)
    for image, expected in ((noise, noise.transpose(1, 2, 0)), (photo, np.asarray(photo))):
        decoded = Image.open(io.BytesIO(encode(image, "png")))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected)
