"""Tissue masks of whole slides: which parts of a slide are worth reading and segmenting.

- `detect_tissue(thumbnail, downsample, mpp=None)`: automatic mask on a low-resolution picture of the
  slide: colour saturation (H&E tissue is pink/purple, glass and background are grey-white), Otsu's
  threshold, kept within [`MIN_SATURATION`, `MAX_SATURATION`] (a blank slide gives an empty mask instead
  of thresholding noise; on a slide that is nearly all tissue Otsu would split pale from dark stain), then pieces smaller than `MIN_TISSUE_UM2` are removed (dust, pen dots) and holes smaller than
  `MAX_HOLE_UM2` are filled. Sizes are in level-0 square micrometres, converted with the slide's mpp (or
  `ASSUMED_MPP` when it is unknown).
- `read_tissue_mask(path, slide_dimensions)`: a user's mask, either an image of any size whose non-zero
  pixels are tissue (PNG/TIFF/BMP, grey or binary, scaled to the slide; JPEG: pixels above mid-grey, as
  its compression noise makes black pixels non-zero; a colour image is refused), or a GeoJSON of polygons in
  level-0 pixels as QuPath exports annotations (FeatureCollection, a bare list of features, a Feature, or
  a geometry; Polygon and MultiPolygon with holes; other geometry types are ignored).
- `full_mask(slide_dimensions)`: everything is tissue (`--tissue_mask none`).

A `TissueMask` is a boolean picture plus its scale (`downsample` level-0 pixels per mask pixel).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

import utils
from utils import UserError

log = logging.getLogger(__name__)

MIN_SATURATION = 0.07      # saturation threshold floor (0..1): background and glass stay below it
MAX_SATURATION = 0.12      # ... and ceiling: pale tissue (fat, mucosa: 0.1-0.2) stays above it, even when
                           # the thumbnail is nearly all tissue and Otsu splits pale from dark stain
MIN_TISSUE_UM2 = 10_000.0  # tissue pieces smaller than this (0.01 mm^2, about 100 x 100 um) are dropped
MAX_HOLE_UM2 = 10_000.0    # holes smaller than this inside tissue are filled
ASSUMED_MPP = 0.25         # level-0 um/px used for those sizes when the slide has no pixel size
GEOJSON_MAX_SIZE = 4096    # longest side (pixels) of the raster a GeoJSON mask is drawn at
IMAGE_MAX_SIZE = 8192      # a larger mask image is reduced (a pixel is tissue if any pixel it covers is)
GEOJSON_SUFFIXES = (".geojson", ".json")


@dataclass
class TissueMask:
    """`mask` bool (h, w); mask pixel (r, c) covers level-0 pixels [c*ds, (c+1)*ds) x [r*ds, (r+1)*ds)
    with ds = `downsample`; `source` is "auto", "none" or the mask file; `dimensions` the slide's
    level-0 (width, height) when known (clips the area of edge pixels)."""

    mask: np.ndarray
    downsample: float
    source: str = "auto"
    dimensions: tuple[int, int] | None = None

    def _span(self, start: float, length: float, size: int) -> tuple[int, int]:
        first = max(0, int(math.floor(start / self.downsample)))
        last = min(size, int(math.ceil((start + length) / self.downsample)))
        return first, last

    def touches(self, box0: tuple[float, float, float, float]) -> bool:
        """Does the level-0 box (x, y, w, h) contain (part of) a tissue pixel of the mask?"""
        x, y, w, h = box0
        if w <= 0 or h <= 0:
            return False
        c0, c1 = self._span(x, w, self.mask.shape[1])
        r0, r1 = self._span(y, h, self.mask.shape[0])
        return bool(c1 > c0 and r1 > r0 and self.mask[r0:r1, c0:c1].any())

    def fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_mm2(self, mpp0: float) -> float:
        """Tissue area in mm^2 for level-0 pixels of `mpp0` micrometres (edge pixels clipped to the slide)."""
        ds = float(self.downsample)
        if self.dimensions is None:
            area_px = float(np.count_nonzero(self.mask)) * ds * ds
        else:
            h, w = self.mask.shape
            wx = np.clip(np.minimum((np.arange(w) + 1) * ds, self.dimensions[0]) - np.arange(w) * ds, 0, None)
            wy = np.clip(np.minimum((np.arange(h) + 1) * ds, self.dimensions[1]) - np.arange(h) * ds, 0, None)
            area_px = float(wy @ self.mask.astype(np.float64) @ wx)
        return area_px * float(mpp0) ** 2 / 1e6

    def save_png(self, path: str | os.PathLike) -> Path:
        """Write the mask as an 8-bit grey PNG (255 = tissue), atomically."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(buf, format="PNG")
        return utils.atomic_write_bytes(path, buf.getvalue())


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max in 0..1 (0 for black), float32. The channels' max and min are taken on the
    uint8 pixels, channel by channel (a reduction along the last axis of a float copy cost 8x more on a 2048²
    thumbnail), then converted: whole numbers, so the float32 difference and quotient are the same."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top = np.maximum(np.maximum(r, g), b).astype(np.float32)
    bottom = np.minimum(np.minimum(r, g), b).astype(np.float32)
    out = np.subtract(top, bottom)
    out /= np.maximum(top, np.float32(1e-6))   # black (top 0): 0 / 1e-6 = 0
    return out


def remove_small_pieces(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """`mask` without 8-connected pieces of fewer than `min_pixels` pixels."""
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(pieces.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[pieces]


def fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """`mask` with background pieces (4-connected) of fewer than `max_pixels` pixels that do not touch the
    border filled."""
    holes, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(holes.ravel())
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < max_pixels
    fill[0] = False
    fill[border] = False
    return mask | fill[holes]


def detect_tissue(thumbnail_rgb: np.ndarray, downsample: float, mpp: float | None = None,
                  dimensions: tuple[int, int] | None = None) -> TissueMask:
    """Automatic tissue mask of a slide from its thumbnail (uint8 RGB) of `downsample` level-0 pixels per
    pixel (see the module docstring). A blank slide gives an empty mask, not an error."""
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB thumbnail (h, w, 3), got shape {rgb.shape}")
    saturation = _saturation(rgb[..., :3])
    threshold = MIN_SATURATION
    if saturation.size and float(saturation.max()) > float(saturation.min()):
        from skimage.filters import threshold_otsu

        threshold = min(MAX_SATURATION, max(MIN_SATURATION, float(threshold_otsu(saturation))))
    mask = saturation > threshold
    pixel_um2 = (float(mpp or ASSUMED_MPP) * float(downsample)) ** 2
    mask = remove_small_pieces(mask, MIN_TISSUE_UM2 / pixel_um2)
    mask = fill_small_holes(mask, MAX_HOLE_UM2 / pixel_um2)
    return TissueMask(mask, float(downsample), "auto", dimensions)


def full_mask(slide_dimensions: tuple[int, int]) -> TissueMask:
    """Everything is tissue (`--tissue_mask none`): a small all-true mask covering the slide."""
    width, height = int(slide_dimensions[0]), int(slide_dimensions[1])
    ds = max(1.0, max(width, height) / 256.0)
    shape = (max(1, math.ceil(height / ds)), max(1, math.ceil(width / ds)))
    return TissueMask(np.ones(shape, dtype=bool), ds, "none", (width, height))


# ----------------------------------------------------------------------------------------------
# Mask files
# ----------------------------------------------------------------------------------------------
def _features(data, path: Path) -> list:
    """Feature or geometry dicts of a GeoJSON document (FeatureCollection, list, Feature, geometry)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            features = data.get("features")
            if isinstance(features, list):
                return features
        elif data.get("type") in ("Feature", "Polygon", "MultiPolygon", "GeometryCollection"):
            return [data]
    raise UserError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")


def _polygons(item) -> list[list]:
    """Polygons (each a list of rings) of one feature or geometry."""
    geometry = item.get("geometry", item) if isinstance(item, dict) else None
    if not isinstance(geometry, dict):
        return []
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [coords]
    if kind == "MultiPolygon":
        return list(coords or [])
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _polygons(g)]
    return []


def _rasterise_geojson(path: Path, slide_dimensions: tuple[int, int]) -> TissueMask:
    from skimage.draw import polygon, polygon_perimeter

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid GeoJSON file ({e})") from None
    width, height = int(slide_dimensions[0]), int(slide_dimensions[1])
    ds = max(1.0, max(width, height) / GEOJSON_MAX_SIZE)
    shape = (max(1, math.ceil(height / ds)), max(1, math.ceil(width / ds)))
    mask = np.zeros(shape, dtype=bool)
    count = 0
    for item in _features(data, path):
        for rings in _polygons(item):
            piece = np.zeros(shape, dtype=bool)  # this polygon alone: its holes cut only itself
            for k, ring in enumerate(rings or []):
                try:
                    xy = np.asarray(ring, dtype=np.float64)
                except (TypeError, ValueError):
                    xy = np.zeros((0, 2))
                if xy.ndim != 2 or xy.shape[0] < 3 or xy.shape[1] < 2 or not np.isfinite(xy).all():
                    raise UserError(f"{path}: a polygon ring is not a list of at least 3 [x, y] points")
                cols, rows = xy[:, 0] / ds - 0.5, xy[:, 1] / ds - 0.5  # pixel centres at c + 0.5 (level 0)
                rr, cc = polygon(rows, cols, shape)
                if k == 0:  # exterior ring: its inside and every mask pixel its outline passes through
                    piece[rr, cc] = True
                    rr, cc = polygon_perimeter(np.round(rows), np.round(cols), shape, clip=True)
                    piece[rr, cc] = True
                    count += 1
                else:  # a hole
                    piece[rr, cc] = False
            mask |= piece
    if count == 0:
        raise UserError(f"{path}: no Polygon or MultiPolygon annotation in the GeoJSON file")
    return TissueMask(mask, ds, str(path), (width, height))


def _read_mask_image(path: Path, slide_dimensions: tuple[int, int]) -> TissueMask:
    width, height = int(slide_dimensions[0]), int(slide_dimensions[1])
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
                if image.mode == "P":
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                array = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - PIL and tifffile raise many kinds
        raise UserError(f"{path}: not an image or GeoJSON tissue mask ({type(e).__name__}: {e})") from None
    array = np.squeeze(np.asarray(array))
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[..., :-1]  # drop alpha
    if array.ndim == 3 and array.shape[2] == 3:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise UserError(f"{path}: a colour image, not a tissue mask (expected a grey or binary image "
                            f"whose non-zero pixels are tissue)")
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise UserError(f"{path}: a {array.ndim}-D image of shape {array.shape}, not a 2-D tissue mask")
    # non-zero is tissue; JPEG's compression noise makes dark pixels 1..10, so there the cut is mid-range
    lossy = path.suffix.lower() in (".jpg", ".jpeg")
    mask = array > (np.iinfo(array.dtype).max // 2 if lossy and array.dtype.kind == "u" else 0)
    mh, mw = mask.shape
    if abs((width / mw) / (height / mh) - 1.0) > 0.02 + 1.0 / min(mw, mh):
        raise UserError(f"{path}: the mask is {mw}x{mh} pixels, the slide {width}x{height}: their aspect "
                        f"ratios differ, so the mask cannot be scaled to the slide")
    factor = math.ceil(max(mh, mw) / IMAGE_MAX_SIZE)
    if factor > 1:  # reduce a very large mask: a pixel is tissue when any pixel it covers is
        ph, pw = (-mh) % factor, (-mw) % factor
        padded = np.pad(mask, ((0, ph), (0, pw)))
        mask = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).any(axis=(1, 3))
        mw, mh = mw / factor, mh / factor
    ds = 0.5 * (width / mw + height / mh)
    return TissueMask(mask, float(ds), str(path), (width, height))


def read_tissue_mask(path: str | os.PathLike, slide_dimensions: tuple[int, int]) -> TissueMask:
    """A tissue mask from a file (image of any size, or GeoJSON polygons in level-0 pixels) for a slide
    of `slide_dimensions` (level-0 width, height). A file of the wrong kind raises a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tissue_mask {path}: file not found")
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        return _rasterise_geojson(path, slide_dimensions)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] in (b"{", b"["):
        return _rasterise_geojson(path, slide_dimensions)
    return _read_mask_image(path, slide_dimensions)
