"""The one image reader (image_io) used by train/evaluate (dataset.read_image) and predict (predict.read_image):
one policy for PNG and TIFF, 16-bit and float rejected, alpha composited over white (issue 12, point 2)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import image_io
import predict
from utils import UserError

READERS = {"image_io": image_io.read_image, "dataset": dataset.read_image, "predict": predict.read_image}
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _save_png16_rgb(path, array16):
    import zlib, struct  # noqa: E401  (a 16-bit RGB PNG by hand: Pillow cannot write one)

    h, w, _ = array16.shape
    raw = b"".join(b"\x00" + array16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("reader", READERS)
def test_16_bit_rgb_is_rejected_not_truncated(tmp_path, reader):
    twelve_bit = (RGB.astype(np.uint16) * 16)  # 12-bit scanner data in a 16-bit file
    tifffile.imwrite(tmp_path / "a.tif", twelve_bit, photometric="rgb")
    _save_png16_rgb(tmp_path / "a.png", twelve_bit)
    for name in ("a.tif", "a.png"):
        with pytest.raises(UserError, match=rf"{name}: 16-bit image; .*8-bit"):
            READERS[reader](tmp_path / name)


@pytest.mark.parametrize("reader", READERS)
def test_float_and_16_bit_grey_rejected_in_png_and_tiff(tmp_path, reader):
    tifffile.imwrite(tmp_path / "f.tif", RGB.astype(np.float32) / 255, photometric="rgb")
    tifffile.imwrite(tmp_path / "g16.tif", RGB[..., 0].astype(np.uint16) * 257)
    Image.fromarray(RGB[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    for name, what in (("f.tif", "32-bit floating-point"), ("g16.tif", "16-bit"), ("g16.png", "16-bit")):
        with pytest.raises(UserError, match=f"{name}: {what} image"):
            READERS[reader](tmp_path / name)


@pytest.mark.parametrize("reader", READERS)
def test_alpha_grey_palette_same_policy_for_png_and_tiff(tmp_path, reader):
    alpha = RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)
    rgba = np.dstack([RGB, alpha])
    expected = np.clip(RGB * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0) + 0.5, 0,
                       255).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    grey = RGB[..., 1]
    Image.fromarray(grey).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", grey)
    pal = Image.fromarray(RGB).quantize(16)
    pal.save(tmp_path / "p.png")
    pal_rgb = np.asarray(pal.convert("RGB"))
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :16] = np.asarray(pal.getpalette()[:48], np.uint16).reshape(16, 3).T * 257
    tifffile.imwrite(tmp_path / "p.tif", np.asarray(pal), photometric="palette", colormap=cmap)
    read = READERS[reader]
    for name in ("a.png", "a.tif"):
        assert np.array_equal(read(tmp_path / name), expected), name
    for name in ("g.png", "g.tif"):
        assert np.array_equal(read(tmp_path / name), np.repeat(grey[..., None], 3, axis=2)), name
    for name in ("p.png", "p.tif"):
        assert np.array_equal(read(tmp_path / name), pal_rgb), name


def test_header_check_finds_truncated_png_and_tiff_without_decoding(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 30])
    tifffile.imwrite(tmp_path / "ok.tif", RGB, photometric="rgb")
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    assert image_io.image_info(tmp_path / "ok.png") == image_io.ImageInfo(24, 32, 3, 8, "uint")
    assert image_io.image_info(tmp_path / "ok.tif") == image_io.ImageInfo(24, 32, 3, 8, "uint")
    for name in ("cut.png", "cut.tif"):
        with pytest.raises(UserError, match=f"{name}: .*truncated"):
            image_io.image_info(tmp_path / name)
