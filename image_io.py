"""The one reader of H&E images for train, evaluate, demo and predict: any file -> uint8 RGB (H, W, 3).

One policy for PNG, JPEG and TIFF alike (documented in docs/data.md):

- 8-bit RGB: used as is. 8-bit grey: repeated to three channels. Palette: expanded to its colours.
- Alpha (RGBA, grey + alpha, palette with transparency): composited over white, the brightfield background
  (a transparent pixel shows no tissue); an all-opaque alpha changes nothing.
- 16-bit, 32-bit integer, floating-point and 1-bit images are rejected with one line naming the file: the
  intensity range of 16-bit files is ambiguous (12-bit scanner data is often stored in 16-bit files, where a
  division by 257 makes it nearly black and keeping the high byte makes it black), so the user converts them
  with the scale they know.
- A missing, unreadable or truncated file is a UserError naming the file.

`image_info(path)` checks a file from its header (and, cheaply, that its data is complete) without decoding
the pixels: what `dataset.validate_dataset` uses to check a whole dataset before training writes anything.
Label masks keep their own reader (`dataset.read_label_mask`): their integer ids must not be converted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
CONVERT_HINT = "convert it to 8-bit RGB with the scale you know (e.g. 12-bit data: divide by 16)"


@dataclass(frozen=True)
class ImageInfo:
    """What a header says: size, channels (1-4 after palette expansion) and bits per sample."""
    height: int
    width: int
    channels: int
    bits: int
    kind: str  # "uint", "int", "float" or "bool"
    palette: bool = False  # a palette image: `channels` counts the colours it expands to (3, or 4 with alpha)


def png_bit_depth(path: str | os.PathLike) -> int | None:
    """Bit depth from a PNG header (Pillow silently reduces 16-bit RGB PNGs to 8 bits)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _unsupported(path: Path, info: ImageInfo) -> str | None:
    if info.kind == "uint" and info.bits == 8:
        return None
    if info.kind == "bool" or info.bits == 1:
        return f"{path}: 1-bit (black and white) image; H&E images are 8-bit RGB"
    what = {"float": f"{info.bits}-bit floating-point", "int": f"{info.bits}-bit signed integer"}.get(
        info.kind, f"{info.bits}-bit")
    return f"{path}: {what} image; this tool reads 8-bit images only: {CONVERT_HINT}"


# PIL modes -> (channels, bits, kind); P is expanded to RGB(A), so it counts as 8-bit colour
_PIL_MODES = {"1": (1, 1, "bool"), "L": (1, 8, "uint"), "LA": (2, 8, "uint"), "La": (2, 8, "uint"),
              "P": (3, 8, "uint"), "PA": (4, 8, "uint"), "RGB": (3, 8, "uint"), "RGBA": (4, 8, "uint"),
              "RGBa": (4, 8, "uint"), "RGBX": (3, 8, "uint"), "CMYK": (3, 8, "uint"), "YCbCr": (3, 8, "uint"),
              "LAB": (3, 8, "uint"), "HSV": (3, 8, "uint"), "I": (1, 32, "int"), "F": (1, 32, "float"),
              "I;16": (1, 16, "uint"), "I;16B": (1, 16, "uint"), "I;16L": (1, 16, "uint"), "I;16N": (1, 16, "uint")}


def _tiff_page(tif):
    return tif.series[0].levels[0] if tif.series else tif.pages[0]


def _tiff_layout(shape: tuple, planar_hint: bool = False) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels_first) of a tifffile array shape, or channels 0 if unsupported."""
    shape = tuple(int(s) for s in shape if s != 1) or (1,)
    if len(shape) == 2:
        return shape[0], shape[1], 1, False
    if len(shape) == 3:
        if shape[2] in (1, 2, 3, 4) and not (planar_hint and shape[0] in (1, 2, 3, 4)):
            return shape[0], shape[1], shape[2], False
        if shape[0] in (1, 2, 3, 4):
            return shape[1], shape[2], shape[0], True
    return 0, 0, 0, False


def image_header(path: str | os.PathLike) -> ImageInfo:
    """Size, channels and sample type from the file's header, after checking that its data is complete (PNG
    chunks and CRCs read through, TIFF strips/tiles inside the file), without decoding the pixels and without
    the 8-bit policy (label masks are checked with it too). UserError naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = _tiff_page(tif)
                dtype = np.dtype(page.dtype)
                height, width, channels, _ = _tiff_layout(page.shape, _is_planar(page))
                size = path.stat().st_size
                first = tif.pages[0]
                ends = [o + n for o, n in zip(first.dataoffsets, first.databytecounts) if n]
                if not ends or max(ends) > size:
                    raise UserError(f"{path}: truncated TIFF (image data runs past the end of the file)")
                photometric = getattr(first.photometric, "name", str(first.photometric))
            palette = photometric == "PALETTE" and channels == 1
            kind = {"u": "uint", "i": "int", "f": "float", "b": "bool"}.get(dtype.kind, dtype.kind)
            info = ImageInfo(height, width, 3 if palette else channels,
                             8 * dtype.itemsize if kind != "bool" else 1, kind, palette)
            if channels == 0:
                raise UserError(f"{path}: unsupported image shape {tuple(page.shape)} (expected H x W grey, RGB "
                                f"or RGBA)")
        else:
            from PIL import Image

            bit_depth = png_bit_depth(path) if path.suffix.lower() == ".png" else None
            with Image.open(path) as im:
                mode, (width, height) = im.mode, im.size
                transparent = "transparency" in im.info
                if im.format == "PNG":
                    im.verify()  # reads every chunk and checks its CRC: a truncated file fails here
            if mode not in _PIL_MODES:
                raise UserError(f"{path}: unsupported image mode {mode}")
            channels, bits, kind = _PIL_MODES[mode]
            if bit_depth is not None and bit_depth > 8:
                bits, kind = bit_depth, "uint"
            if mode == "P" and transparent:
                channels = 4
            info = ImageInfo(height, width, channels, bits, kind, mode in ("P", "PA"))
    except UserError:
        raise
    except Exception as e:  # any decoder error: one readable line naming the file
        raise UserError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    return info


def image_info(path: str | os.PathLike) -> ImageInfo:
    """`image_header`, after checking that the image is one this tool reads (the policy of the module
    docstring): what `read_image` and `dataset.validate_dataset` check. UserError naming the file otherwise."""
    path = Path(path)
    info = image_header(path)
    problem = _unsupported(path, info)
    if problem:
        raise UserError(problem)
    if min(info.height, info.width) < 1:
        raise UserError(f"{path}: empty image ({info.width}x{info.height})")
    return info


def _is_planar(page) -> bool:
    planar = getattr(page, "planarconfig", None)
    return getattr(planar, "name", str(planar)) == "SEPARATE"


def composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour (H, W, 3) and uint8 alpha (H, W) -> uint8 RGB over a white background."""
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """An 8-bit array (H, W), (H, W, 1|2|3|4) or channel-first (1|2|3|4, H, W) -> uint8 RGB (H, W, 3) with
    the policy of this module (grey repeated, alpha composited over white, other sample types rejected)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        kind = {"u": "uint", "i": "int", "f": "float", "b": "bool"}.get(array.dtype.kind, array.dtype.kind)
        bits = 1 if kind == "bool" else 8 * array.dtype.itemsize
        raise UserError(_unsupported(Path(name), ImageInfo(0, 0, 0, bits, kind))
                        or f"{name}: unsupported sample type {array.dtype}")
    height, width, channels, first = _tiff_layout(array.shape)
    if channels == 0 or min(height, width) < 1:
        raise UserError(f"{name}: unsupported image shape {array.shape} (expected H x W grey, RGB or RGBA)")
    array = array.reshape((channels, height, width) if first else (height, width, channels))
    if first:
        array = np.moveaxis(array, 0, -1)
    if channels in (1, 2):
        colour = np.repeat(array[..., :1], 3, axis=2)
    else:
        colour = array[..., :3]
    if channels in (2, 4):
        return composite_over_white(colour, array[..., -1])
    return np.ascontiguousarray(colour)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an H&E image (PNG, JPEG, TIFF) as uint8 RGB (H, W, 3) with the policy of this module."""
    path = Path(path)
    image_info(path)  # the same checks (and messages) as the dataset validation
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = _tiff_page(tif)
                array = page.asarray()
                first = tif.pages[0]
                photometric = getattr(first.photometric, "name", str(first.photometric))
                if photometric == "PALETTE" and first.colormap is not None:
                    cmap = np.asarray(first.colormap)
                    cmap = (cmap // 257 if cmap.max() > 255 else cmap).astype(np.uint8)  # (3, 2**bits)
                    array = np.moveaxis(cmap[:, np.squeeze(array)], 0, -1)
                elif _is_planar(first):
                    height, width, channels, _ = _tiff_layout(array.shape, True)
                    array = np.moveaxis(array.reshape(channels, height, width), 0, -1)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("PA", "La", "RGBa"):
                    im = im.convert("RGBA")
                elif im.mode not in ("L", "LA", "RGB", "RGBA"):
                    im = im.convert("RGB")
                array = np.asarray(im)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    return to_rgb(array, str(path))
