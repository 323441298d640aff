"""Reading whole-slide images: OpenSlide first, tiffslide where OpenSlide cannot open the file, and where it reads
the same pixels faster (levels of SVS and generic tiled TIFF files, checked when the slide is opened).

- `is_slide_file(path)` tells the slide path (vendor formats, tiled / pyramidal TIFF and OME-TIFF) from
  plain images that `predict` reads whole (PNG, JPEG, strip TIFF). It reads the file header only.
- `open_slide(path, mpp=None, backend=None) -> SlideReader`: one reader for both libraries, with
  `read_region` (level pixels, alpha composited over white, white outside the slide), `read_scaled`
  (any target pixel size, from the closest pyramid level that is not coarser, resampled with a fixed
  separable kernel so boxes tile seamlessly), `thumbnail` (streamed, bounded memory) and the pixel size.

OpenSlide (`openslide-python` + the `openslide-bin` wheel) is imported lazily: a machine without it still
reads TIFF-based slides through tiffslide. A reader is not shared between processes (each process opens
the path itself); reads from several threads of one process are fine for both libraries.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

import image_io
from utils import UserError

log = logging.getLogger(__name__)

VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = VENDOR_SUFFIXES + TIFF_SUFFIXES
BACKENDS = ("openslide", "tiffslide")

# A level whose downsample exceeds the wanted one by at most this fraction still counts as "not coarser"
# (pyramid sizes are rounded, so a nominal 4x level is often 4.0003x).
LEVEL_TOLERANCE = 0.01
# Source pixels (of the chosen level) read at once by `thumbnail` (bounds its memory: ~3 bytes each + floats).
_THUMBNAIL_CHUNK_PIXELS = 4 * 1024 * 1024
THUMBNAIL_THREADS = 4   # strips of a thumbnail read side by side (OpenSlide), at most


_TIFF_LOG_LOCK = threading.Lock()
_tiff_log_users = 0            # blocks of `_tifffile_log_to` running now, in any thread
_tiff_log_propagate = True     # tifffile's `propagate` before the first of them


@contextlib.contextmanager
def _tifffile_log_to(handler: logging.Handler | None = None):
    """tifffile's log records of this thread go to `handler` (None: dropped) instead of the user's terminal
    while the block runs: a damaged file is reported once, as a UserError line, by `_check_tiff_complete`.

    Slides are opened by several read threads at once: the first block to start turns tifffile's propagation
    off and the last to end restores it (saving and restoring it per block would leave it off for good when
    two blocks overlap), and each handler only sees the records of its own thread."""
    global _tiff_log_users, _tiff_log_propagate
    tif_log = logging.getLogger("tifffile")
    handler = handler or logging.NullHandler()
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    with _TIFF_LOG_LOCK:
        if _tiff_log_users == 0:
            _tiff_log_propagate = tif_log.propagate
            tif_log.propagate = False
        _tiff_log_users += 1
        tif_log.addHandler(handler)
    try:
        yield
    finally:
        with _TIFF_LOG_LOCK:
            tif_log.removeHandler(handler)
            _tiff_log_users -= 1
            if _tiff_log_users == 0:
                tif_log.propagate = _tiff_log_propagate


def _tiff_is_tiled_rgb(path: Path) -> bool:
    import tifffile

    try:
        with _tifffile_log_to(), tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            rgb = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR) or (
                page.samplesperpixel in (3, 4) and page.planarconfig == tifffile.PLANARCONFIG.CONTIG)
            return bool(page.is_tiled and rgb and page.dtype == np.uint8)
    except Exception:  # noqa: BLE001 - any unreadable TIFF is not routed to the slide path
        return False


def is_slide_file(path: str | os.PathLike) -> bool:
    """True for vendor slide formats and for tiled 8-bit RGB TIFF / OME-TIFF files (pyramidal or large),
    which `predict` reads region by region; False for PNG/JPEG, strip TIFFs and non-RGB TIFFs (label
    images, fluorescence), which go through the in-memory image path. Reads the TIFF header only."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VENDOR_SUFFIXES:
        return True
    if suffix in TIFF_SUFFIXES and path.is_file():
        return _tiff_is_tiled_rgb(path)
    return False


def _import_openslide():
    """The `openslide` module, or None where it (or its shared library) is missing."""
    try:
        import openslide  # noqa: PLC0415 - optional, lazy
    except (ImportError, OSError) as e:
        log.debug("OpenSlide unavailable: %s", e)
        return None
    return openslide


def openslide_available() -> bool:
    return _import_openslide() is not None


def _check_tiff_complete(path: Path) -> None:
    """Raise UserError when a TIFF's IFD chain or tile data run past the end of the file (truncated copy).

    tifffile logs (instead of raising) a page offset beyond the end of the file, so its log is watched
    while the pages are listed; every page's data segments must lie inside the file.
    """
    import tifffile

    size = path.stat().st_size
    problems: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.levelno >= logging.WARNING and ("offset" in message or "truncat" in message
                                                      or "corrupt" in message):
                problems.append(message)

    try:
        with _tifffile_log_to(_Catch()), tifffile.TiffFile(path) as tif:  # reported below as one UserError line
            pages = list(tif.pages)
            for page in pages:
                for sub in getattr(page, "pages", None) or []:  # SubIFD levels (OME pyramids)
                    pages.append(sub)
            for page in pages:
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                ends = [o + c for o, c in zip(offsets, counts) if c]
                if ends and max(ends) > size:
                    problems.append(f"image data of page {page.index} ends at byte {max(ends)}")
                    break
    except tifffile.TiffFileError as e:
        problems.append(str(e))
    if problems:
        raise UserError(f"{path}: truncated or damaged TIFF ({size} bytes; {problems[0]})")


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tiff_mpp(path: Path) -> float | None:
    """Level-0 um/px from a TIFF's own metadata, for files whose reader reports none: OME-XML
    `PhysicalSizeX` (with its unit), else the first page's resolution tags (centimetre or inch units)."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                root = ET.fromstring(tif.ome_metadata)
                for element in root.iter():
                    if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
                        factor = _UNIT_TO_UM.get(element.get("PhysicalSizeXUnit", "µm"))
                        size = _positive_float(element.get("PhysicalSizeX"))
                        if factor and size:
                            return size * factor
                        break
            page = tif.pages.first
            unit = page.resolutionunit
            xres = page.tags.get("XResolution")
            if xres is None or unit not in (tifffile.RESUNIT.CENTIMETER, tifffile.RESUNIT.INCH):
                return None
            numerator, denominator = xres.value
            per_unit = numerator / denominator if denominator else 0
            if per_unit <= 0:
                return None
            return (1e4 if unit == tifffile.RESUNIT.CENTIMETER else 25400.0) / per_unit
    except Exception:  # noqa: BLE001 - metadata is optional; a broken file fails elsewhere
        return None


def _is_ome_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001
        return False


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class SlideReader:
    """One opened slide (see the module docstring). Use `open_slide` to make one; close it (or use `with`)."""

    def __init__(self, path: Path, backend: str, handle: Any, mpp: float | None):
        self.path = path
        self.backend = backend
        self._slide = handle
        self.properties: dict[str, str] = {str(k): str(v) for k, v in dict(handle.properties).items()}
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.mpp = mpp if mpp is not None else self._metadata_mpp()
        # levels whose pixels a tiffslide handle of the same file reads instead (`_attach_tiffslide_twin`)
        self._twin: Any = None
        self.twin_levels: tuple[int, ...] = ()

    # -- metadata ------------------------------------------------------------------------------
    def _metadata_mpp(self) -> float | None:
        prefix = "openslide" if self.backend == "openslide" else "tiffslide"
        mpp_x = _positive_float(self.properties.get(f"{prefix}.mpp-x"))
        mpp_y = _positive_float(self.properties.get(f"{prefix}.mpp-y"))
        if mpp_x is None and mpp_y is None and _is_tiff(self.path):
            return _tiff_mpp(self.path)
        if mpp_x is None:
            return mpp_y
        if mpp_y is not None and abs(mpp_x - mpp_y) > 0.01 * mpp_x:
            log.warning("%s: non-square pixels (mpp-x %.4g, mpp-y %.4g); using mpp-x", self.path, mpp_x, mpp_y)
        return mpp_x

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise UserError(f"{self.path}: no pixel size (mpp) in the file's metadata; pass --mpp")
        return float(self.mpp)

    # -- raw reads -----------------------------------------------------------------------------
    def _to_rgb(self, array: np.ndarray) -> np.ndarray:
        """uint8 RGB of a backend's region (grey repeated, straight alpha composited over white): the policy
        of `image_io.to_rgb`, which rejects anything but 8-bit samples."""
        return image_io.to_rgb(array, str(self.path))

    def _location(self, level: int, lx: int, backend: str | None = None) -> int:
        """A level-0 coordinate that `backend` (default: the reader's) maps to level pixel `lx` (tiffslide:
        int(x / ds))."""
        ds = self.level_downsamples[level]
        if level == 0:
            return int(lx)
        loc = int(round(lx * ds))
        if (backend or self.backend) == "tiffslide":
            while int(loc / ds) < lx:
                loc += 1
            while loc > 0 and int(loc / ds) > lx:
                loc -= 1
        return loc

    def _read_level(self, level: int, lx: int, ly: int, width: int, height: int,
                    twin: bool | None = None) -> np.ndarray:
        """uint8 RGB (height, width, 3) of `level` pixels [ly, ly+height) x [lx, lx+width); white outside.
        The backend's pixels go straight into the result (`_paste_rgb`). `twin`: read with the tiffslide twin
        (True) or the reader's own backend (False) instead of the one `twin_levels` picks."""
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height)
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        if twin is None:
            twin = level in self.twin_levels
        backend, handle = ("tiffslide", self._twin) if twin else (self.backend, self._slide)
        location = (self._location(level, x0, backend), self._location(level, y0, backend))
        size = (x1 - x0, y1 - y0)
        try:
            if backend == "openslide":
                region = handle.read_region(location, level, size)
            else:
                region = handle.read_region(location, level, size, as_array=True, padding=False)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged tile anywhere in the file
            raise UserError(f"{self.path}: cannot read level {level} region {size[0]}x{size[1]} at "
                            f"({x0}, {y0}): {type(e).__name__}: {e}") from None
        target = out[y0 - ly:y1 - ly, x0 - lx:x1 - lx]
        if hasattr(region, "getchannel") and region.mode == "RGBA" and region.size == size:
            # a PIL image from OpenSlide (straight alpha): opaque, its RGB bytes go straight in, no compositing
            if region.getchannel("A").getextrema()[0] == 255:
                target[...] = np.frombuffer(region.tobytes("raw", "RGB"), np.uint8).reshape(size[1], size[0], 3)
                return out
        region = np.asarray(region)
        if not (region.dtype == np.uint8 and region.ndim == 3 and region.shape[2] in (3, 4)):
            region = self._to_rgb(region)
        if region.shape[:2] != (size[1], size[0]):
            raise UserError(f"{self.path}: level {level} read returned {region.shape[1]}x{region.shape[0]} "
                            f"pixels instead of {size[0]}x{size[1]} (damaged file?)")
        if inside and region.shape[2] == 3 and region.flags.c_contiguous and region.flags.writeable \
                and region.base is None:
            return region   # tiffslide's own new RGB array is the result: no copy
        _paste_rgb(target, region)
        return out

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """uint8 RGB (height, width, 3): `x, y` in level-0 pixels, `width, height` in pixels of `level`.
        Transparent pixels are composited over white; parts outside the slide are white (255)."""
        width, height, level = int(width), int(height), int(level)
        if width < 0 or height < 0:
            raise ValueError(f"negative region size {width}x{height}")
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"level {level} out of range (the slide has {len(self.level_dimensions)})")
        ds = self.level_downsamples[level]
        lx = int(x) if level == 0 else math.floor(int(x) / ds + 1e-9)
        ly = int(y) if level == 0 else math.floor(int(y) / ds + 1e-9)
        return self._read_level(level, lx, ly, width, height)

    # -- resampled reads -----------------------------------------------------------------------
    def best_level(self, scale: float) -> int:
        """The pyramid level closest to target pixels of `1 / scale` level-0 pixels that is not coarser."""
        wanted = 1.0 / float(scale)
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= wanted * (1.0 + LEVEL_TOLERANCE) and ds > self.level_downsamples[best]:
                best = level
        return best

    def read_scaled(self, box: tuple[int, int, int, int], scale: float) -> np.ndarray:
        """uint8 RGB (h, w, 3) of `box = (x, y, w, h)` in the target grid (level 0 scaled by `scale` =
        level-0 mpp / target mpp). Target pixel (r, c) is centred on level-0 ((c + 0.5) / scale - 0.5,
        (r + 0.5) / scale - 0.5). Reads `best_level(scale)` and resamples with a separable triangle
        kernel (widened by the shrink factor, so shrinking is antialiased); every target pixel depends
        only on its own position, so adjacent boxes tile seamlessly. `scale == 1` is `read_region`."""
        x, y, w, h = (int(v) for v in box)
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive, got {scale}")
        if w < 0 or h < 0:
            raise ValueError(f"negative box size {w}x{h}")
        if scale == 1.0:
            return self.read_region(x, y, w, h, 0)
        level = self.best_level(scale)
        level_w, level_h = self.level_dimensions[level]
        # target px per level px, per axis (from the level's actual size, not the rounded downsample)
        fx = scale * self.dimensions[0] / level_w
        fy = scale * self.dimensions[1] / level_h
        if abs(fx - 1.0) < 1e-9 and abs(fy - 1.0) < 1e-9:
            return self._read_level(level, x, y, w, h)
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        cols, wx = _kernel(x, w, fx, level_w)
        rows, wy = _kernel(y, h, fy, level_h)
        lx0, lx1 = int(cols.min()), int(cols.max()) + 1
        ly0, ly1 = int(rows.min()), int(rows.max()) + 1
        source = self._read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        out = _resample(source, rows - ly0, wy, cols - lx0, wx)
        # target pixels centred outside the slide are white
        outside_x = _outside(x, w, scale, self.dimensions[0])
        outside_y = _outside(y, h, scale, self.dimensions[1])
        out[:, outside_x] = 255
        out[outside_y] = 255
        return out

    def thumbnail(self, max_size: int = 2048, threads: int | None = None) -> tuple[np.ndarray, float]:
        """(uint8 RGB thumbnail of the whole slide, longest side <= max_size, downsample = level-0
        pixels per thumbnail pixel). Read strip by strip through `read_scaled`, so memory stays bounded
        even for a slide without a pyramid. With OpenSlide as the reader (whose reads, and its tiffslide twin's,
        may run side by side on one handle and release the GIL, as do the resampling's numpy passes) the strips
        are read by up to `threads` threads (default: the usable cores, at most `THUMBNAIL_THREADS`), each strip the
        same pixels: a slide's first step, before any region, 1.8x faster with 2 threads on a 2048² thumbnail
        (3 strips)."""
        width0, height0 = self.dimensions
        max_size = int(max_size)
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        scale = min(1.0, max_size / max(width0, height0))
        tw = min(max_size, max(1, int(round(width0 * scale))))
        th = min(max_size, max(1, int(round(height0 * scale))))
        level = self.best_level(scale)
        src_per_row = max(1.0, self.level_dimensions[level][0] * (1.0 / max(tw, 1)))
        rows_per_chunk = max(1, int(_THUMBNAIL_CHUNK_PIXELS / (self.level_dimensions[level][0] * src_per_row)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        starts = list(range(0, th, rows_per_chunk))

        def strip(r0: int) -> None:
            r1 = min(th, r0 + rows_per_chunk)
            out[r0:r1] = self.read_scaled((0, r0, tw, r1 - r0), scale)

        if threads is None:
            import utils

            threads = min(utils.usable_cores(), THUMBNAIL_THREADS)
        threads = min(int(threads), len(starts)) if self.backend == "openslide" else 1
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="thumbnail") as pool:
                for _ in pool.map(strip, starts):   # a strip's error comes out here
                    pass
        else:
            for r0 in starts:
                strip(r0)
        return out, 1.0 / scale

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._twin is not None:
            self._twin.close()
            self._twin, self.twin_levels = None, ()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        twin = f", levels read with tiffslide={self.twin_levels}" if self.twin_levels else ""
        return (f"SlideReader({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
                f"levels={len(self.level_dimensions)}, mpp={self.mpp}{twin})")


def _paste_rgb(target: np.ndarray, array: np.ndarray) -> None:
    """Write uint8 RGB or RGBA (h, w, 3|4) into `target` (h, w, 3) as `image_io.to_rgb` makes it, without its
    intermediate arrays: the colour is copied in, and straight alpha is composited over white only at the
    pixels whose alpha is below 255 (where it is 255 the compositing formula gives the colour itself)."""
    target[...] = array[..., :3]
    if array.shape[2] == 4:
        alpha = array[..., 3]
        rows, cols = np.nonzero(alpha != 255)
        if rows.size:
            target[rows, cols] = image_io.composite_over_white(array[rows, cols, :3][None], alpha[rows, cols][None])[0]


def _outside(start: int, count: int, scale: float, size0: int) -> np.ndarray:
    """Target pixels start..start+count-1 whose centre lies outside level-0 pixels 0..size0-1 (their area)."""
    centre0 = (np.arange(start, start + count, dtype=np.float64) + 0.5) / scale
    return (centre0 < 0) | (centre0 > size0)


def _kernel(start: int, count: int, f: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (count, K) and weights (count, K) for target pixels start..start+count-1 along an
    axis with `f` target pixels per source pixel. Triangle kernel of radius max(1, 1 / f) source pixels;
    K depends only on f, so the sum for every target pixel runs over the same taps in the same order.
    Taps beyond the level's `size` pixels reuse its edge pixel (edge replication)."""
    radius = max(1.0, 1.0 / f)
    taps = int(math.ceil(2 * radius)) + 1
    centre = (np.arange(start, start + count, dtype=np.float64) + 0.5) / f - 0.5
    first = np.floor(centre - radius).astype(np.int64) + 1
    index = first[:, None] + np.arange(taps, dtype=np.int64)[None, :]
    weight = np.clip(1.0 - np.abs(index - centre[:, None]) / radius, 0.0, None)
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, size - 1), weight.astype(np.float32)


_RESAMPLE_BAND = 32   # output rows `_resample` makes at a time (their float32 sums, about 1 MB, stay in the caches)


def _resample(source: np.ndarray, rows: np.ndarray, wy: np.ndarray, cols: np.ndarray,
              wx: np.ndarray) -> np.ndarray:
    """Separable resampling of uint8 (H, W, 3) `source` with per-output taps: along x, then along y, in float32.
    Each output value is 0 + w0 * x0 + w1 * x1 + ... over its taps in their stored order, each product and sum
    rounded to float32 (the arithmetic of a CSR sparse-matrix product, which this function was until 2026-12:
    the same bits), then rounded to the nearest integer; every output pixel gets the same arithmetic whatever the
    box it belongs to.

    The output is made in bands of `_RESAMPLE_BAND` rows, each from the source rows its taps reach (a band's
    horizontal pass is redone for the one or two source rows two bands share), so the float32 sums stay in the
    caches; the taps are gathered with `np.take`. The regions of a slide at 0.2527 µm/px read for a 0.25 µm/px model
    cost 3.4x less CPU than through the sparse products and their whole-box transposes (docs/benchmarks.md)."""
    out_h, out_w = rows.shape[0], cols.shape[0]
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, _RESAMPLE_BAND):
        r1 = min(r0 + _RESAMPLE_BAND, out_h)
        total = _resampled_sums(source, rows[r0:r1], wy[r0:r1], cols, wx)
        np.rint(total, out=total)
        out[r0:r1] = np.clip(total, 0, 255, out=total)
    return out


def _resampled_sums(source: np.ndarray, rows: np.ndarray, wy: np.ndarray, cols: np.ndarray,
                    wx: np.ndarray) -> np.ndarray:
    """float32 (len(rows), len(cols), 3): `_resample`'s sums before rounding, for the output rows whose taps are
    `rows`, `wy`, from the source rows those taps reach. A tap whose weight is 0 for every output is left out: its
    products are +0 and adding +0 to a sum of non-negative terms leaves its bits as they are (near scale 1 the
    triangle's third tap always has weight 0: two taps of three)."""
    s0 = int(rows.min())
    band = source[s0:int(rows.max()) + 1]
    horizontal = None
    for k in np.flatnonzero(wx.any(axis=0)).tolist():
        weight = np.ascontiguousarray(wx[:, k])[None, :, None]
        term = np.multiply(np.take(band, np.ascontiguousarray(cols[:, k]), axis=1), weight, dtype=np.float32)
        horizontal = term if horizontal is None else np.add(horizontal, term, out=horizontal)
    total = None
    for k in np.flatnonzero(wy.any(axis=0)).tolist():
        term = np.multiply(np.take(horizontal, rows[:, k] - s0, axis=0), wy[:, k][:, None, None])
        total = term if total is None else np.add(total, term, out=total)
    return total


def _open_openslide(path: Path):
    openslide = _import_openslide()
    if openslide is None:
        raise RuntimeError("OpenSlide is not installed (pip install openslide-python openslide-bin)")
    return openslide.OpenSlide(str(path))


def _open_tiffslide(path: Path):
    import tiffslide

    return tiffslide.TiffSlide(str(path))


# OpenSlide's drivers for TIFF files whose tiles tiffslide reads alike (the same pages, decoded by the same codecs)
TWIN_VENDORS = ("aperio", "generic-tiff")
_TWIN_SAMPLE = 256   # side of the box, at the centre of each level, that both readers read to compare


def _attach_tiffslide_twin(reader: SlideReader) -> None:
    """Let a tiffslide handle of the file read the levels of `reader` (an OpenSlide one) where it reads the same
    pixels: `reader.twin_levels`.

    OpenSlide decodes the tiles of a TIFF-based slide and composites them through an ARGB buffer, then
    openslide-python converts that to RGBA: about 30-38 ns per pixel on one core here, against 14-17 ns for
    tiffslide's decoding straight into an RGB array (docs/benchmarks.md). For the drivers in `TWIN_VENDORS` (SVS,
    generic tiled TIFF) and where tiffslide sees the same pyramid (level sizes and downsamples), tiffslide reads
    level 0 and each level whose downsample is a whole number, if all its tiles hold bytes and in a box at its
    centre its pixels equal OpenSlide's. A level with a fractional downsample (odd level-0 sizes) stays with
    OpenSlide, which reads it at a sub-pixel offset (interpolated values, not tiffslide's), as does a level of a
    sparse file (`_all_tiles_stored`) and every level of another driver, of a file tiffslide cannot open or of a
    different pyramid. The reader's metadata (mpp, properties) stay OpenSlide's."""
    if reader.backend != "openslide" or reader.properties.get("openslide.vendor") not in TWIN_VENDORS:
        return
    try:
        with _tifffile_log_to():   # tifffile's notes on a file OpenSlide reads are not the user's concern
            handle = _open_tiffslide(reader.path)
    except Exception:  # noqa: BLE001 - OpenSlide reads it: stay with that
        return
    reader._twin = handle
    try:
        with _tifffile_log_to():
            levels = _twin_levels(reader, handle)
    except Exception:  # noqa: BLE001 - a twin that cannot read the file is no twin
        levels = []
    if not levels:
        reader._twin = None
        handle.close()
        return
    reader.twin_levels = tuple(levels)
    log.debug("%s: levels %s read with tiffslide (the same pixels as OpenSlide's, read faster)", reader.path,
              reader.twin_levels)


def _all_tiles_stored(handle: Any, level: int) -> bool:
    """Whether every tile (or strip) of a tiffslide handle's `level` has bytes in the file. A sparse file's missing
    tile is white through OpenSlide (transparent, composited over white) and black through tiffslide (zeros); a
    check of one box would see it only where it falls, so such a level stays with OpenSlide."""
    try:
        series = handle.ts_tifffile.series[int(handle.properties["tiffslide.series-index"])]
        return all(min(page.databytecounts, default=0) > 0 for page in series.levels[level].pages)
    except Exception:  # noqa: BLE001 - a layout this cannot inspect: no twin for the level
        return False


def _twin_levels(reader: SlideReader, handle: Any) -> list[int]:
    """The levels of `reader` whose pixels its tiffslide `handle` (set as `reader._twin`) reads alike: none for a
    different pyramid; else level 0 and the levels of whole-number downsample whose tiles all hold bytes and where a
    centre box agrees."""
    same = (tuple(tuple(int(v) for v in d) for d in handle.level_dimensions) == reader.level_dimensions
            and tuple(float(d) for d in handle.level_downsamples) == reader.level_downsamples)
    levels = []
    for level, ds in enumerate(reader.level_downsamples if same else ()):
        if ds != round(ds) or not _all_tiles_stored(handle, level):
            continue
        width, height = reader.level_dimensions[level]
        w, h = min(width, _TWIN_SAMPLE), min(height, _TWIN_SAMPLE)
        x, y = (width - w) // 2, (height - h) // 2
        if np.array_equal(reader._read_level(level, x, y, w, h, twin=False),
                          reader._read_level(level, x, y, w, h, twin=True)):
            levels.append(level)
    return levels


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: str | None = None) -> SlideReader:
    """Open a slide with OpenSlide, or tiffslide where OpenSlide cannot open it (`backend` forces one).
    OME-TIFF files go to tiffslide first (OpenSlide ignores their SubIFD pyramid). Where OpenSlide opens an SVS
    or a generic tiled TIFF, tiffslide reads the levels where its pixels are the same, 2-3x faster
    (`_attach_tiffslide_twin`); `backend` given: that library alone.

    `mpp` (level-0 micrometres per pixel) overrides the file's metadata: the reader's `mpp-x` property
    (Aperio `MPP`, vendor fields, TIFF resolution tags), else OME-XML `PhysicalSizeX` or the resolution tags
    read with tifffile. A file neither library opens,
    or a truncated one, raises `UserError("<path>: <problem>")`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if mpp is not None:
        given = _positive_float(mpp)
        if given is None:
            raise UserError(f"--mpp {mpp}: must be a positive number (micrometres per pixel)")
        mpp = given
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    is_tiff = _is_tiff(path)
    if is_tiff and path.suffix.lower() != ".ndpi":  # NDPI stores 64-bit offsets in 32-bit fields
        # OpenSlide opens a TIFF whose later IFDs, tag values or tiles were cut off as long as the first
        # level's header reads; such a copy must stop here, not midway through the slide
        _check_tiff_complete(path)
    order = [backend] if backend else list(BACKENDS)
    if backend is None and is_tiff and _is_ome_tiff(path):
        order.reverse()  # OpenSlide reads only the first level of an OME-TIFF (its pyramid is in SubIFDs)
    failures: list[str] = []
    for name in order:
        try:
            handle = _open_openslide(path) if name == "openslide" else _open_tiffslide(path)
        except UserError as e:  # truncated / damaged: no other reader will do better
            raise e from None
        except Exception as e:  # noqa: BLE001 - each library has its own error types
            failures.append(f"{name}: {str(e).strip() or type(e).__name__}")
            continue
        try:
            reader = SlideReader(path, name, handle, mpp)
            if not reader.dimensions[0] or not reader.dimensions[1]:
                raise UserError(f"{path}: empty image ({reader.dimensions[0]}x{reader.dimensions[1]} pixels)")
        except BaseException:
            handle.close()
            raise
        if backend is None:
            _attach_tiffslide_twin(reader)
        return reader
    raise UserError(f"{path}: not a slide or image that OpenSlide or tiffslide can open ({'; '.join(failures)})")
