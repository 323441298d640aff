"""Whole-slide inference: every nucleus of a slide, region by region, in bounded memory, resumable.

`predict_slide(predictor, path, name, output_dir, options)` is what `predict.predict_one` runs for a slide
(`slides.is_slide_file`). The steps:

1. Scale. The slide is read at the model's pixel size (`slides.SlideReader.read_scaled`, from the pyramid
   level closest to it that is not coarser): the "target grid" is level 0 scaled by
   `scale = slide mpp / model mpp`.
2. Windows. The network windows (`tile_size`, `overlap` at the model's pixel size) lie on ONE global grid
   over the target grid, the very grid `inference.stitch_maps` uses for a whole image, with the same blend
   weights and the same blending code (`inference.blend_windows`). Each window runs once: its maps are kept
   until the last region that needs them (`run_regions`). A window runs only if it touches tissue
   (`tissue.TissueMask.touches`); skipped windows add nothing (their pixels get foreground 0).
3. Regions. The target grid is cut into square regions (`--region_size`). A region's maps are stitched on its
   core plus a margin (`REGION_MARGIN`) from every window that covers a pixel of that area, so they are
   exactly the whole-image maps there. The area is post-processed on its own; an instance is kept by the
   region whose core holds its centroid (the seam rule: the margin is wider than a nucleus, so a kept
   instance is whole, and each instance is kept by exactly one region).
4. Streaming. Background threads read regions ahead of the network (at most `read_threads + 1` regions
   waiting; a region's read is its crop and the windows that run there, not those an earlier region ran:
   `run_boxes`, and the columns it shares with the previous region are copied from that one's: `read_box`);
   finished regions are post-processed in `num_workers` worker processes (at most
   `num_workers + QUEUED_REGIONS + 1` regions in flight, counting the one being blended) or in this process
   (`num_workers` 0); the workers start with the slide, before its thumbnail (or once for a whole run: `Workers`). On an
   accelerator the windows run ahead of the blending in a thread of their own (`inference.MapsAhead`: every
   region's batches as soon as its read has started, at most `inference.AHEAD_BATCHES` batches ahead, the next
   batch's tiles gathered while the device works on one).
   Each region's kept instances (label crop + measurements + polygons) go to a small file in `.progress/<name>/`
   and the progress file `state.json` is rewritten atomically after every region.
5. Outputs, assembled from the region files in region order (global ids 1..N in that order; `Assembly`
   writes GeoJSON and CSV as the regions are recorded, and with workers the label image too, so this overlaps
   the regions still running): `<name>.geojson[.gz]`, `<name>_nuclei.csv`, optional `<name>_labels.tif`
   (rasterised tile by tile), `<name>_tissue.png`, `<name>_overview.png`, `<name>_confidence.png` (drawn by two
   workers where there are any). All coordinates are level-0 pixels of the slide.

Memory: one region's arrays per stage (read-ahead, network, post-processing), the thumbnail-size tissue
mask, the window flags (one byte per window) and the nuclei centroids for the overview, whatever the slide
size, plus the maps of the windows that a later region still needs: those shared with the region below, two
window rows across the tissue of the slide (3 x tile² float32 each: 3 MiB at 512; about 1.5 GiB for a slide
100,000 pixels wide at the model's pixel size, on the device that computes the maps). Re-running the same
command skips a complete slide and continues an unfinished one (only the regions not recorded in
`state.json`); a change of any option that changes results, of the model or of the slide file starts the slide
again; `--overwrite` always does.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import threading
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

import utils
from utils import UserError

log = logging.getLogger(__name__)

REGION_MARGIN = 128        # target pixels post-processed around a region's core (> the largest nucleus)
THUMBNAIL_SIZE = 2048      # longest side of the thumbnail used for tissue detection and the overview
LABEL_TILE = 512           # tile side of the label pyramid
QUEUED_REGIONS = 1         # regions handed to the workers beyond one each, so that a dense region does not stop
                           # the network while a worker finishes it
STATE_VERSION = 2          # 2: region files hold zlib labels and pre-encoded features, rows a confidence


@dataclass
class Region:
    """One region: `core` (y0, x0, y1, x1) in target pixels (the cores tile the slide), `crop` the core
    plus the margin (clipped), `windows` the indices (iy, ix) of the global windows that touch tissue and
    cover a pixel of `crop`, `box` (y0, x0, y1, x1) the crop and those windows (what the region needs on its own;
    a run reads less: `run_boxes`, `read_box`)."""
    index: int
    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]
    windows: list[tuple[int, int]]
    box: tuple[int, int, int, int]


@dataclass
class Geometry:
    """The target grid of a slide: `shape` (H, W) at the model's pixel size, `scale` target pixels per
    level-0 pixel, window starts `ys`, `xs` (`inference.tile_starts`), `tile`, `overlap`."""
    shape: tuple[int, int]
    scale: float
    ys: list[int]
    xs: list[int]
    tile: int
    overlap: int


def slide_geometry(dimensions: tuple[int, int], scale: float, tile: int, overlap: int, path: Path) -> Geometry:
    import inference

    width0, height0 = dimensions
    height, width = int(round(height0 * scale)), int(round(width0 * scale))
    if height < tile or width < tile:
        raise UserError(f"{path}: level 0 is {width0} x {height0} pixels, smaller than one window "
                        f"({tile} pixels at the model's pixel size = {tile / scale:.0f} slide pixels); "
                        f"use a smaller --tile_size or convert it to a PNG/plain TIFF")
    return Geometry((height, width), float(scale), inference.tile_starts(height, tile, overlap),
                    inference.tile_starts(width, tile, overlap), int(tile), int(overlap))


def window_flags(geo: Geometry, tissue) -> np.ndarray:
    """bool (len(ys), len(xs)): which windows touch tissue (level-0 boxes asked to the mask)."""
    flags = np.zeros((len(geo.ys), len(geo.xs)), dtype=bool)
    s = geo.scale
    for iy, y in enumerate(geo.ys):
        for ix, x in enumerate(geo.xs):
            flags[iy, ix] = bool(tissue.touches((x / s, y / s, geo.tile / s, geo.tile / s)))
    return flags


def _covering(starts: list[int], tile: int, lo: int, hi: int) -> list[int]:
    """Indices of the windows (starts of length `tile`) that overlap [lo, hi)."""
    return [i for i, s in enumerate(starts) if s < hi and s + tile > lo]


def plan_regions(geo: Geometry, flags: np.ndarray, region_size: int, margin: int = REGION_MARGIN) -> list[Region]:
    """The regions of the slide in raster order (index = position in the full grid, also for regions left
    out because none of the windows over their core touches tissue)."""
    height, width = geo.shape
    regions = []
    index = 0
    for y0 in range(0, height, region_size):
        for x0 in range(0, width, region_size):
            core = (y0, x0, min(y0 + region_size, height), min(x0 + region_size, width))
            crop = (max(core[0] - margin, 0), max(core[1] - margin, 0),
                    min(core[2] + margin, height), min(core[3] + margin, width))
            core_iy = _covering(geo.ys, geo.tile, core[0], core[2])
            core_ix = _covering(geo.xs, geo.tile, core[1], core[3])
            if flags[np.ix_(core_iy, core_ix)].any():
                iys = _covering(geo.ys, geo.tile, crop[0], crop[2])
                ixs = _covering(geo.xs, geo.tile, crop[1], crop[3])
                windows = [(iy, ix) for iy in iys for ix in ixs if flags[iy, ix]]
                by0 = min([crop[0]] + [geo.ys[iy] for iy, _ in windows])
                bx0 = min([crop[1]] + [geo.xs[ix] for _, ix in windows])
                by1 = max([crop[2]] + [geo.ys[iy] + geo.tile for iy, _ in windows])
                bx1 = max([crop[3]] + [geo.xs[ix] + geo.tile for _, ix in windows])
                regions.append(Region(index, core, crop, windows, (by0, bx0, by1, bx1)))
            index += 1
    return regions


def region_batches(regions: list[Region], batch_size: int) -> list[list[list[tuple[int, int]]]]:
    """The batches of windows each of `regions` runs, in order: its windows that no earlier region ran, in its
    order (the order `stitch_region` runs them in), `batch_size` at a time."""
    first_use: dict = {}
    for k, region in enumerate(regions):
        for key in region.windows:
            first_use.setdefault(key, k)
    batches = []
    for k, region in enumerate(regions):
        run = [key for key in region.windows if first_use[key] == k]
        batches.append([run[i:i + batch_size] for i in range(0, len(run), batch_size)])
    return batches


def run_boxes(regions: list[Region], geo: Geometry) -> list[tuple[int, int, int, int]]:
    """What to read for each region of a run that takes `regions` in this order, keeping window maps for later
    regions (`run_regions`): the crop (its colours are measured) and the windows that run there, those not
    run by an earlier region of the run. The windows an earlier region ran come from the cache, so their pixels
    are not read again: with regions of 2048, 1.44x the slide's pixels instead of 1.70x (`Region.box`) on a
    12288² slide, 1.55x instead of 1.87x on a 40000² one."""
    seen: set = set()
    boxes = []
    for region in regions:
        y0, x0, y1, x1 = region.crop
        for iy, ix in region.windows:
            if (iy, ix) not in seen:
                seen.add((iy, ix))
                y0, x0 = min(y0, geo.ys[iy]), min(x0, geo.xs[ix])
                y1, x1 = max(y1, geo.ys[iy] + geo.tile), max(x1, geo.xs[ix] + geo.tile)
        boxes.append((y0, x0, y1, x1))
    return boxes


def reused_columns(previous: tuple[int, int, int, int] | None, box: tuple[int, int, int, int]) -> int:
    """How many columns on the left of `box` (y0, x0, y1, x1) the previous region's box holds over `box`'s whole
    height: their pixels are copied from the previous region's instead of read again (`read_box`). On a row of
    regions over tissue, about a quarter of each box (768 of 2816 columns with regions of 2048)."""
    if previous is None:
        return 0
    py0, px0, py1, px1 = previous
    y0, x0, y1, x1 = box
    if py0 > y0 or py1 < y1 or not px0 <= x0 < px1:
        return 0
    return min(px1, x1) - x0


def read_box(read, box: tuple[int, int, int, int], previous=None) -> np.ndarray:
    """uint8 RGB of `box` (y0, x0, y1, x1) of the target grid, `read((x, y, w, h))` reading from the slide.
    `previous` (box, rgb | a callable returning it): the previous region's pixels, whose columns that `box`
    shares (`reused_columns`) are copied rather than read again (target pixels depend only on their position, so
    they are the same values)."""
    y0, x0, y1, x1 = box
    shared = reused_columns(previous[0], box) if previous is not None else 0
    new = read((x0 + shared, y0, x1 - x0 - shared, y1 - y0)) if shared < x1 - x0 else None
    if not shared:
        return new
    (py0, px0, _, _), rgb = previous
    rgb = rgb() if callable(rgb) else rgb
    old = rgb[y0 - py0:y1 - py0, x0 - px0:x0 - px0 + shared]
    return np.ascontiguousarray(old) if new is None else np.concatenate((old, new), axis=1)


# ----------------------------------------------------------------------------------------------
# Network part (this process)
# ----------------------------------------------------------------------------------------------
def window_pixels(region: Region, rgb: np.ndarray, geo: Geometry, origin: tuple[int, int]):
    """`pixels(key)`: the uint8 RGB tile of window `key` of `region` from `rgb`, the target pixels from `origin`
    (y, x) on; a window outside them is an error (not a wrapped or shorter slice)."""
    by0, bx0 = origin
    tile = geo.tile

    def pixels(key: tuple[int, int]) -> np.ndarray:
        y, x = geo.ys[key[0]] - by0, geo.xs[key[1]] - bx0
        if y < 0 or x < 0 or y + tile > rgb.shape[0] or x + tile > rgb.shape[1]:
            raise RuntimeError(f"window {key} of region {region.index} lies outside the pixels read")
        return rgb[y:y + tile, x:x + tile]

    return pixels


def stitch_region(region: Region, rgb: np.ndarray, geo: Geometry, maps_fn, batch_size: int,
                  cache: dict | None = None, keep=None, origin: tuple[int, int] | None = None,
                  batches=None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Foreground (h, w) and HV (2, h, w) | None maps of `region.crop` from its windows, blended by the engine
    (`inference.blend_windows` with the global grid's weights: identical values to the whole-image maps of
    `inference.stitch_maps` there), and the number of windows run. `rgb` holds the target pixels from `origin`
    (y, x; default `region.box`'s corner) on, at least those of the windows run here. `cache` {(iy, ix): (fg,
    hv)} holds window maps computed for earlier regions (used, not run again); the maps of this region's windows
    in `keep` (those a later region needs) are added to it, and the caller drops them after their last region
    (`run_regions`), so every window of the grid runs once. `batches`: the maps of the windows run here, computed
    ahead (`inference.MapsAhead`; see `blend_windows`)."""
    import inference

    origin = region.box[:2] if origin is None else origin
    blender = inference.Blender(region.crop, geo.shape, geo.tile, geo.overlap, inference.maps_device(maps_fn))
    ran = inference.blend_windows(blender, region.windows, lambda key: (geo.ys[key[0]], geo.xs[key[1]]),
                                  window_pixels(region, rgb, geo, origin), maps_fn, batch_size, cache, keep,
                                  batches=batches)
    fg_map, hv_map = blender.maps()
    return fg_map, hv_map, ran


# ----------------------------------------------------------------------------------------------
# Post-processing part (worker processes)
# ----------------------------------------------------------------------------------------------
def _scale_row(row: dict, scale: float) -> dict:
    """A `measure_nuclei` row in target pixels -> level-0 pixels (µm columns unchanged)."""
    if scale == 1.0:
        return row
    row = dict(row)
    row["centroid_x"] = (row["centroid_x"] + 0.5) / scale - 0.5
    row["centroid_y"] = (row["centroid_y"] + 0.5) / scale - 0.5
    row["area_px"] = row["area_px"] / (scale * scale)
    for key in ("perimeter_px", "major_axis_px", "minor_axis_px"):
        row[key] = row[key] / scale
    return row


def warm_worker() -> None:
    """Import what `finish_region` needs (a worker process's first task, submitted when the pool starts), and what
    the pictures at the end need (matplotlib: about 0.3 s of CPU, paid here while the worker waits for its first
    region instead of at the end of the slide, where the device is done and everything waits on the pictures), run
    the post-processing and measurements once on two touching discs (`warm_post_processing`: numba's kernels are
    loaded, or compiled the first time on a machine, here rather than in the first region), then leave all of that's
    objects out of the garbage collector's passes (`utils.freeze_startup_objects`)."""
    import visualize

    warm_post_processing()
    visualize.import_matplotlib()
    utils.freeze_startup_objects()


def warm_post_processing() -> int:
    """`postprocess.postprocess` and `export.measure_nuclei` on the maps of two touching discs (64 x 64, the types a
    region's maps, RGB and labels have), so that the compiled kernels (`jit_kernels`: the energy, the boxes, the
    watershed mosaics' Gaussian, the per-nucleus sums) are loaded from numba's cache, or compiled (about 4 s, once per
    machine), before the first region. Returns the number of nuclei found (2)."""
    import export
    import postprocess as pp

    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    labels = np.zeros((64, 64), np.int32)
    hv = np.zeros((2, 64, 64), np.float32)
    for k, cx in ((1, 24.0), (2, 41.0)):
        disc = ((yy - 32) ** 2 + (xx - cx) ** 2 <= 100) & (labels == 0)
        labels[disc] = k
        hv[0][disc], hv[1][disc] = (xx[disc] - cx) / 10, (yy[disc] - 32) / 10
    fg = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    found = pp.postprocess(fg, hv, pp.PostprocessConfig())
    return len(export.measure_nuclei(found, np.full((64, 64, 3), 128, np.uint8), 0.25, foreground=fg))


def start_workers(workers: int):
    """A pool of `workers` post-processing processes (`utils.process_pool`; None for 0), each given `warm_worker` at
    once: spawning a process and importing the modules takes 1-3 s, which then overlaps this process's work."""
    if int(workers) <= 0:
        return None
    pool = utils.process_pool(int(workers))
    for _ in range(int(workers)):
        pool.submit(warm_worker)
    return pool


class Workers:
    """The post-processing worker processes of a whole run (`start_workers`), kept from slide to slide: started once
    (`start`, for example while the command loads its model), so that a later slide does not wait for new
    processes. On the 2-core build machine a slide's first region waited about 2 s for its freshly spawned workers
    while the device sat idle (docs/benchmarks.md, "one pool of workers for the run"). `pool()` is the running pool
    (started on first use; None for 0 workers), `submit(fn, *args)` hands it a task; `discard()` drops a pool a dead
    worker broke (the next `pool()` starts anew); `close()`, or the end of a `with` block, shuts the processes down.
    Slides run in several threads (a Dask worker with several task threads) may share one: the pool is checked and
    replaced under a lock."""

    def __init__(self, count: int) -> None:
        self.count = max(0, int(count))
        self._pool = None
        self._lock = threading.Lock()

    def pool(self):
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            if self._pool is not None:
                try:   # a pool whose worker died (killed for memory, say) refuses new work: replaced, not handed out
                    self._pool.submit(int)
                except BrokenProcessPool:
                    self._drop(wait=False)
            if self.count and self._pool is None:
                self._pool = start_workers(self.count)
            return self._pool

    start = pool

    def submit(self, fn, *args):
        """`pool().submit(fn, *args)`; a pool that a worker's death broke after `pool()` looked is replaced once."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool().submit(fn, *args)
        except BrokenProcessPool:
            self.discard()
            return self.pool().submit(fn, *args)

    def _drop(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def discard(self) -> None:
        with self._lock:
            self._drop(wait=False)

    def close(self) -> None:
        with self._lock:
            self._drop(wait=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_pictures(kinds: tuple, outputs: dict, thumb: tuple, tissue_mask, centroids: np.ndarray,
                  confidence: np.ndarray, mpp0: float, low: float) -> None:
    """Write the slide's pictures of `kinds` ("tissue": the mask, "overview": nuclei per mm² of tissue, "confidence":
    where the nuclei of confidence below `low` are) from the thumbnail `thumb` (image, downsample)."""
    import visualize

    if "tissue" in kinds:
        tissue_mask.save_png(outputs["tissue"])
    if "overview" in kinds:
        visualize.save_slide_overview(outputs["overview"], thumb[0], thumb[1], tissue_mask, centroids, mpp0)
    if "confidence" in kinds:
        visualize.save_confidence_overview(outputs["confidence"], thumb[0], thumb[1], tissue_mask, centroids,
                                           confidence, mpp0, threshold=low)


def draw_pictures(pool, outputs: dict, thumb: tuple, tissue_mask, centroids: np.ndarray, confidence: np.ndarray,
                  mpp0: float, low: float) -> list:
    """`save_pictures` of every picture: in this process without a pool (returns []), else as two tasks of the
    pool's workers (the overview and the confidence picture are drawn side by side), whose futures it returns."""
    jobs = [("tissue", "overview"), ("confidence",)]
    if pool is None:
        for kinds in jobs:
            save_pictures(kinds, outputs, thumb, tissue_mask, centroids, confidence, mpp0, low)
        return []
    return [pool.submit(save_pictures, kinds, outputs, thumb, tissue_mask, centroids, confidence, mpp0, low)
            for kinds in jobs]


def finish_region(job: dict) -> dict:
    """Post-process one region's maps, keep the instances whose centroid lies in the core (and whose
    confidence, the mean foreground probability over the instance, is at least `job["min_confidence"]`),
    measure them and write the region file (atomic). Returns {"nuclei", "dropped", "seconds", "file"}. Runs in
    a worker process.

    Everything after the post-processing is computed for all instances at once (per-pixel sums,
    `export.measure_and_outline_pixels`: measurements and outlines from one scan of the kept instances' pixel
    list over their bounding box, with the pixel counts and coordinate sums of the seam rule), and each feature
    is stored as its JSON text (geometry and measurements) so that `Assembly` only pastes in the global id."""
    import export
    import postprocess as pp

    start = time.time()
    if job.get("arrays") is not None:   # the maps and RGB in shared memory (`utils.ArrayHandoff`)
        job = dict(job, **utils.unpack_arrays(job["arrays"]))
    settings = dict(job["settings"])
    if job["hv"] is None and settings.get("mode", "hv") == "hv":
        settings["mode"] = "binary"
    fg = np.asarray(job["fg"])
    labels = pp.postprocess(fg, job["hv"], pp.PostprocessConfig.from_dict(settings))
    cy0, cx0, cy1, cx1 = job["crop"]
    ky0, kx0, ky1, kx1 = job["core"]
    min_confidence = float(job.get("min_confidence", 0.0) or 0.0)
    flat = labels.ravel()
    pix = np.flatnonzero(flat != 0)   # (on a bool array: several times faster than on the labels)
    n = dropped = 0
    if pix.size:
        lab = flat[pix]
        count = np.bincount(lab)
        top = len(count) - 1
        area = count.astype(np.float64)
        present = area > 0
        safe = np.where(present, area, 1.0)
        # centroid of every instance (the same sums as ndimage.center_of_mass), rounded to its pixel
        sum_r, sum_c = _coordinate_sums(pix, lab, labels.shape, count)
        gy = np.floor(sum_r / safe + 0.5).astype(np.int64) + cy0
        gx = np.floor(sum_c / safe + 0.5).astype(np.int64) + cx0
        in_core = present & (gy >= ky0) & (gy < ky1) & (gx >= kx0) & (gx < kx1)
        in_core[0] = False
        if min_confidence > 0:
            confidence = np.bincount(lab, weights=fg.ravel()[pix].astype(np.float64), minlength=top + 1) / safe
            low = in_core & (confidence < min_confidence)
            dropped = int(low.sum())
            in_core &= ~low
        n = int(in_core.sum())
        lut = np.zeros(top + 1, np.uint16 if n < 65536 else np.uint32)   # already the region file's label dtype
        lut[in_core] = np.arange(1, n + 1, dtype=lut.dtype)
        if n:
            # the kept instances as a pixel list (the kept label map is never made for the whole crop)
            new_ids = lut[lab]
            keep = new_ids != 0
            kept_pix, kept_ids = pix[keep], new_ids[keep]
            del new_ids, keep
            # their pixel counts and coordinate sums are the ones just made (exact integers)
            sums = (np.r_[0, count[in_core]], np.r_[0.0, sum_r[in_core]], np.r_[0.0, sum_c[in_core]])
    values: dict[str, list] = {}    # the rows, column by column
    geometry: list[str] = []
    if n:
        # measurements and outlines from one scan of the kept instances' pixels (their bounding box)
        values, (corners, _, spans), (by0, bx0, crop_labels) = export.measure_and_outline_pixels(
            labels.shape, kept_pix, kept_ids, job["rgb"], mpp=job["mpp"], foreground=fg, sums=sums, as_columns=True)
    scale = float(job["scale"])
    if values:  # region crop -> target grid of the whole slide (per value what `_scale_row` does per row)
        values["centroid_x"] = [v + cx0 for v in values["centroid_x"]]
        values["centroid_y"] = [v + cy0 for v in values["centroid_y"]]
        if scale != 1.0:
            values = _scale_columns(values, scale)
    if n:
        xy = corners.astype(np.float64) + np.array([cx0, cy0], np.float64)
        if scale != 1.0:
            xy = xy / scale
        geometry = export.polygons_json(xy, spans)
    rows_text, measurements = export.columns_and_measurements_json(values)
    columns = _typed_columns(values)
    # the kept instances' bounding box in target pixels (crop_labels above), as compact as their count allows
    if not n:
        by0 = bx0 = 0
        crop_labels = np.zeros((0, 0), np.uint32)
    crop_labels = np.ascontiguousarray(crop_labels.astype(np.uint16 if n < 65536 else np.uint32, copy=False))
    path = Path(job["file"])
    buffer = io.BytesIO()
    # the label crop is mostly zeros: zlib level 1 packs it about as well as the default level, several times faster
    # (zlib-ng's level 1 where it is installed: the same format, 3x faster again, `utils.deflate`)
    np.savez(buffer, labels_z=np.frombuffer(utils.deflate(crop_labels, 1), np.uint8),
             labels_shape=np.array(crop_labels.shape, np.int64), labels_dtype=np.array(crop_labels.dtype.str),
             origin=np.array([by0 + cy0, bx0 + cx0], np.int64), nuclei=np.array(n, np.int64),
             dropped=np.array(dropped, np.int64),
             rows=np.frombuffer(rows_text.encode(), np.uint8),
             geometry=np.frombuffer("\n".join(geometry).encode(), np.uint8),
             measurements=np.frombuffer("\n".join(measurements).encode(), np.uint8),
             **{COLUMN_PREFIX + key: array for key, array in columns.items()})
    utils.atomic_write_bytes(path, buffer.getvalue())  # flushed to disk before state.json records the region
    return {"nuclei": n, "dropped": dropped, "seconds": time.time() - start, "file": path.name}


COLUMN_PREFIX = "col_"   # region file arrays holding the rows column by column (float64 / int64, `_typed_columns`)


def _scale_columns(values: dict[str, list], scale: float) -> dict[str, list]:
    """`_scale_row` of every row, on the rows given column by column."""
    out = dict(values)
    for key in ("centroid_x", "centroid_y"):
        out[key] = [(v + 0.5) / scale - 0.5 for v in values[key]]
    area_scale = scale * scale
    out["area_px"] = [v / area_scale for v in values["area_px"]]
    for key in ("perimeter_px", "major_axis_px", "minor_axis_px"):
        out[key] = [v / scale for v in values[key]]
    return out


def _typed_columns(values: dict[str, list]) -> dict[str, np.ndarray]:
    """The rows' columns as arrays (float64 for a key whose values are all Python floats, int64 for all ints: the
    same numbers, so `tolist()` gives back the very values), so that `Assembly` needs no JSON parsing; {} when a
    key is not a string or a column holds other values."""
    if not values or not all(type(k) is str for k in values):
        return {}
    columns = {}
    for key, column in values.items():
        kinds = set(map(type, column))
        if kinds == {float}:
            columns[key] = np.array(column, np.float64)
        elif kinds == {int} and -2**63 <= min(column) and max(column) < 2**63:
            columns[key] = np.array(column, np.int64)
        else:
            return {}
    return columns


def _coordinate_sums(pix: np.ndarray, lab: np.ndarray, shape: tuple[int, int],
                     count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the rows, sum of the columns) of each label's pixels (float64 arrays as long as `count`, the
    labels' pixel counts; exact integers), `pix` the flat positions of the labels `lab` in a map of `shape`.
    Both from one `bincount` when they fit together in float64's 53 bits: the weight row * 2**k + column sums
    to (sum of rows) * 2**k + (sum of columns) with the column sum below 2**k, every partial sum an integer
    below 2**53 (exact); else one `bincount` each."""
    height, width = shape
    big = int(count.max()) if count.size else 0
    k = ((width - 1) * big).bit_length()
    row_of = pix // width
    if ((height - 1) * big + 1) << k <= 1 << 53:
        weight = row_of * ((1 << k) - width)
        weight += pix                                  # row * 2**k + column
        total = np.bincount(lab, weights=weight, minlength=len(count)).astype(np.int64)
        return (total >> k).astype(np.float64), (total & ((1 << k) - 1)).astype(np.float64)
    return (np.bincount(lab, weights=row_of, minlength=len(count)),
            np.bincount(lab, weights=pix - row_of * width, minlength=len(count)))


def _region_labels(data) -> np.ndarray:
    shape = tuple(int(v) for v in data["labels_shape"])
    dtype = np.dtype(str(data["labels_dtype"]))
    size = math.prod(shape) * dtype.itemsize
    packed = data["labels_z"].tobytes()
    raw = None
    if size:
        try:   # libdeflate (imagecodecs) inflates the same stream to the same bytes, about 3x faster than zlib
            import imagecodecs

            raw = imagecodecs.deflate_decode(packed, out=size)
        except Exception:  # noqa: BLE001 - imagecodecs without libdeflate or an older version: zlib below
            raw = None
        if raw is not None and len(raw) != size:
            raw = None
    if raw is None:
        raw = zlib.decompress(packed, bufsize=max(size, 1))   # (the output size known: no regrowing)
    return np.frombuffer(raw, dtype).reshape(shape)


def confidence_review_threshold(settings: dict | None) -> float:
    """The confidence below which the slide's confidence picture counts a nucleus as doubtful: halfway between
    the post-processing foreground threshold (every nucleus pixel lies above it) and 1, 0.75 by default."""
    return 0.5 * (1.0 + float((settings or {}).get("fg_threshold", 0.5)))


def read_region_file(path: Path, labels: bool = True, rows: bool = True) -> dict:
    """A region file of `finish_region`: labels (crop; None with `labels=False`, which skips decompressing
    them), labels_shape, origin, nuclei, dropped, rows (dicts), columns (the rows as {key: array}, None in
    region files written before them), geometry and measurements (one JSON text per nucleus, in row order).
    `rows=False` skips parsing the rows' JSON when the file has the columns (rows None then)."""
    with np.load(path) as data:
        n = int(data["nuclei"])
        geometry = data["geometry"].tobytes().decode()
        measurements = data["measurements"].tobytes().decode()
        columns = {k[len(COLUMN_PREFIX):]: data[k] for k in data.files if k.startswith(COLUMN_PREFIX)}
        columns = columns if columns or n == 0 else None
        parse = rows or columns is None
        return {"labels": _region_labels(data) if labels else None,
                "labels_shape": tuple(int(v) for v in data["labels_shape"]),
                "origin": tuple(int(v) for v in data["origin"]), "nuclei": n,
                "dropped": int(data["dropped"]), "rows": json.loads(data["rows"].tobytes().decode()) if parse else None,
                "columns": columns,
                "geometry": geometry.split("\n") if n else [], "measurements": measurements.split("\n") if n else []}


# ----------------------------------------------------------------------------------------------
# Resume state
# ----------------------------------------------------------------------------------------------
def progress_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / ".progress" / name


def _fingerprint(path: str | os.PathLike | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return {"path": str(p)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_key(path: Path, predictor, options, geo: Geometry, mpp0: float) -> dict:
    """What the slide's results depend on; a saved state with another key is not continued."""
    tissue = options.tissue_mask
    return {"version": STATE_VERSION, "slide": _fingerprint(path), "mpp": mpp0, "shape": list(geo.shape),
            "tile": geo.tile, "overlap": geo.overlap, "region_size": int(options.region_size),
            "margin": REGION_MARGIN, "tissue_mask": tissue if tissue in ("auto", "none") else _fingerprint(tissue),
            "model": _fingerprint(options.model_path), "pretrained": _fingerprint(options.pretrained),
            "ensemble": bool(options.ensemble), "amp": bool(options.amp),
            "min_confidence": float(getattr(options, "min_confidence", 0.0) or 0.0),
            "postprocess": predictor.postprocess, "model_mpp": predictor.model_mpp}


def output_paths(output_dir: Path, name: str, options) -> dict[str, Path]:
    paths = {"geojson": output_dir / (f"{name}.geojson.gz" if options.geojson_gzip else f"{name}.geojson"),
             "csv": output_dir / f"{name}_nuclei.csv", "tissue": output_dir / f"{name}_tissue.png",
             "overview": output_dir / f"{name}_overview.png",
             "confidence": output_dir / f"{name}_confidence.png"}
    if options.label_image:
        paths["labels"] = output_dir / f"{name}_labels.tif"
    return paths


# ----------------------------------------------------------------------------------------------
# The slide
# ----------------------------------------------------------------------------------------------
def _tissue_mask(slide, options, mpp0: float):
    import tissue

    if options.tissue_mask == "none":
        return tissue.full_mask(slide.dimensions), None
    thumb, downsample = slide.thumbnail(THUMBNAIL_SIZE)
    if options.tissue_mask == "auto":
        return tissue.detect_tissue(thumb, downsample, mpp=mpp0, dimensions=slide.dimensions), (thumb, downsample)
    return tissue.read_tissue_mask(options.tissue_mask, slide.dimensions), (thumb, downsample)


def predict_slide(predictor, path: Path, name: str, output_dir: Path, options,
                  on_region_done: Callable[[int], None] | None = None, workers: Workers | None = None):
    """Segment one slide into `output_dir` (see the module docstring); returns an `inference.Outcome`.
    A problem of this slide comes back as `Outcome(status="failed")`. `on_region_done(k)` is called after
    the k-th region of this run is recorded (tests use it to interrupt a run). `workers`: the run's post-processing
    processes (`Workers`), kept after the slide; without it the slide starts `predictor.num_workers` of its own and
    shuts them down at its end."""
    import inference

    start = time.time()
    try:   # a worker that died breaks the run's pool: `Workers.pool()` replaces it for the next slide
        return _predict_slide(predictor, Path(path), name, Path(output_dir), options, on_region_done, start,
                              workers)
    except Exception as e:
        log.debug("failed on %s", path, exc_info=True)
        return inference.Outcome(str(path), name, "failed", error=inference.error_message(Path(path), e),
                               seconds=round(time.time() - start, 3), kind="slide")


def _predict_slide(predictor, path: Path, name: str, output_dir: Path, options, on_region_done, start, workers):
    import inference
    import slides

    pool = None
    own_pool = workers is None
    try:
        with slides.open_slide(path, mpp=options.mpp) as slide:
            mpp0 = float(slide.require_mpp())
            width0, height0 = slide.dimensions
            scale = mpp0 / float(predictor.model_mpp)
            geo = slide_geometry(slide.dimensions, scale, predictor.tile_size, predictor.overlap, path)
            key = run_key(path, predictor, options, geo, mpp0)
            pdir = progress_dir(output_dir, name)
            state_path = pdir / "state.json"
            outputs = output_paths(output_dir, name, options)
            state = None
            if state_path.is_file() and not options.overwrite:
                try:
                    state = utils.read_json(state_path)
                except Exception:  # an unreadable state is started again
                    state = None
                if state is not None and state.get("key") != key:
                    log.warning("%s: options, model or slide changed since the recorded progress; starting again", path)
                    state = None
            if state is not None and state.get("complete") and all(p.is_file() for p in outputs.values()):
                log.info("%s: already complete (pass --overwrite to redo it)", path)
                return inference.Outcome(**dict(state["outcome"], status="skipped"))
            if state is None or state.get("complete"):
                if pdir.exists():
                    shutil.rmtree(pdir)
                state = {"key": key, "complete": False, "regions": {}}
            pdir.mkdir(parents=True, exist_ok=True)
            utils.write_json(state_path, state)

            # the post-processing workers (the run's, else this slide's, whose spawn overlaps the thumbnail and the
            # tissue mask); they also draw the pictures at the end, while this process writes the label image
            pool = start_workers(int(predictor.num_workers)) if own_pool else workers.pool()
            tissue_mask, thumb = _tissue_mask(slide, options, mpp0)
            if thumb is None:
                thumb = slide.thumbnail(THUMBNAIL_SIZE)
        flags = window_flags(geo, tissue_mask)
        regions = plan_regions(geo, flags, int(options.region_size))
        if not regions:
            log.warning("%s: no tissue found (0 nuclei); see %s", path, outputs["tissue"])
        # the outputs are assembled from the region files in region order, as the regions are recorded
        assembly = Assembly(outputs, regions, state, pdir, mpp0, options)
        pictures: list = []
        try:
            if pool is not None:   # this process has time while the workers post-process: the label image now
                assembly.stream_labels(geo, (height0, width0))
            timing = run_regions(predictor, path, options, geo, regions, state, state_path, pdir, on_region_done,
                                 assembly, pool)
            # every region is in: the pictures are drawn (by the workers, where there are any) while the outputs
            # are closed and the label image written
            nuclei, centroids, confidence = assembly.collect()
            # every nucleus pixel has foreground probability above fg_threshold, so confidences lie in (t, 1]: the
            # picture counts the nuclei in the lower half of that range
            t_pictures = time.time()
            pictures = draw_pictures(pool, outputs, thumb, tissue_mask, centroids, confidence, mpp0,
                                     confidence_review_threshold(predictor.postprocess))
            picture_seconds = time.time() - t_pictures
            assembly.finish(geo, (height0, width0))
        except BaseException:
            for picture in pictures:   # a run's pool goes on to the next slide: not this one's pictures
                picture.cancel()
            assembly.abort()
            raise
        t_pictures = time.time()
        for picture in pictures:
            picture.result()
        # the assembly's own time (during the run too) and the pictures' time in this process (with workers: the
        # wait for them after the label image)
        write_seconds = assembly.seconds + picture_seconds + time.time() - t_pictures
        area = float(tissue_mask.area_mm2(mpp0))
        outcome = inference.Outcome(
            str(path), name, "ok", nuclei, height0, width0, round(time.time() - start, 3), kind="slide", mpp=mpp0,
            tissue_area_mm2=round(area, 6), nuclei_per_mm2=(round(nuclei / area, 3) if area > 0 else None),
            windows=int(timing["windows"]), read_seconds=round(timing["read"], 3),
            network_seconds=round(timing["network"], 3), postprocess_seconds=round(timing["postprocess"], 3),
            write_seconds=round(write_seconds, 3),
            dropped_low_confidence=int(state.get("dropped_low_confidence", 0)))
        for region in regions:  # the region files are no longer needed; the state keeps the outcome
            f = pdir / f"region_{region.index:06d}.npz"
            if f.exists():
                f.unlink()
        state.update(complete=True, outcome=vars(outcome))
        utils.write_json(state_path, state)
        log.info("%s: %d nuclei in %.1f mm² of tissue -> %s", path, nuclei, area, outputs["geojson"])
        if outcome.dropped_low_confidence:
            log.info("%s: %d nuclei below --min_confidence %g dropped", path, outcome.dropped_low_confidence,
                     options.min_confidence)
        return outcome
    finally:
        if pool is not None and own_pool:
            pool.shutdown(wait=True, cancel_futures=True)


class _Readers:
    """Region reads in background threads, each thread with its own slide handle."""

    def __init__(self, path: Path, options, scale: float) -> None:
        self.path, self.options, self.scale = path, options, scale
        self.local = threading.local()
        self.handles: list = []
        self.lock = threading.Lock()

    def read(self, box: tuple[int, int, int, int], previous=None) -> tuple[np.ndarray, float]:
        """(RGB of `box`, seconds); `previous` (box, future of its read): the previous region's read, whose shared
        columns are copied (`read_box`); this thread reads the rest first, then waits for it."""
        import slides

        start = time.time()
        slide = getattr(self.local, "slide", None)
        if slide is None:
            slide = slides.open_slide(self.path, mpp=self.options.mpp)
            self.local.slide = slide
            with self.lock:
                self.handles.append(slide)
        waited = 0.0

        def previous_rgb() -> np.ndarray:
            nonlocal waited
            t = time.time()
            rgb = previous[1].result()[0]
            waited += time.time() - t
            return rgb

        rgb = read_box(lambda b: slide.read_scaled(b, self.scale), box,
                       None if previous is None else (previous[0], previous_rgb))
        return rgb, time.time() - start - waited

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def run_regions(predictor, path: Path, options, geo: Geometry, regions: list[Region], state: dict,
                state_path: Path, pdir: Path, on_region_done, assembly: "Assembly | None" = None,
                pool=None) -> dict:
    """Run the regions not yet recorded in `state`; records each finished one (atomically) and then lets
    `assembly` write what it can (`Assembly.feed`). `pool`: the post-processing workers (`start_workers`), which
    the caller shuts down; without it, a pool of `predictor.num_workers` is started and shut down here."""
    import inference

    todo = [r for r in regions if str(r.index) not in state["regions"]]
    timing = {"read": 0.0, "network": 0.0, "postprocess": 0.0, "windows": 0}
    timing["postprocess"] = sum(float(v.get("seconds", 0.0)) for v in state["regions"].values())
    if assembly is not None:
        assembly.feed()   # the regions recorded by an earlier, interrupted run
    if not todo:
        return timing
    settings = dict(predictor.postprocess or {})
    workers = int(predictor.num_workers)
    readers = _Readers(path, options, geo.scale)
    read_pool = ThreadPoolExecutor(max(1, int(options.read_threads)), thread_name_prefix="wsi-read")
    own_pool = pool is None and workers > 0
    if own_pool:   # started now, so that the workers' start overlaps the first region's read and network
        pool = start_workers(workers)
    handoff = utils.ArrayHandoff()
    reads: deque = deque()
    pending: deque = deque()
    upcoming = iter(zip(todo, run_boxes(todo, geo)))   # each region's pixels, less the windows already run
    # window maps are kept from the region that runs them to the last region that needs them (the next one
    # on the right, or the one below: at most about one region row of windows); each window runs once
    last_use = {key: k for k, region in enumerate(todo) for key in region.windows}
    cache: dict = {}
    batch_size = int(getattr(predictor, "batch_size", None) or options.batch_size or 1)
    # on an accelerator the windows run ahead of the blending in a thread of their own, region after region: the
    # batches each region runs (its windows not run by an earlier one, in the order `blend_windows` runs them)
    ahead = inference.MapsAhead(predictor.maps_fn) if inference.runs_ahead(predictor.maps_fn) else None
    run_batches = region_batches(todo, batch_size) if ahead is not None else []
    done_count = 0
    bar = tqdm(total=len(todo), desc=f"{path.name} regions", unit="region", leave=False)

    last_read: list = [None]   # (box, future) of the latest read: its shared columns are copied, not read again
    started = [0]              # regions whose read has started

    def tiles_of(region: Region, box: tuple, future, keys: list) -> list:
        """The tiles of `keys` from the region's read (called in the maps thread: it waits for the read)."""
        pixels = window_pixels(region, future.result()[0], geo, box[:2])
        return [pixels(key) for key in keys]

    def read_next() -> None:
        region, box = next(upcoming, (None, None))
        if region is not None:
            future = read_pool.submit(readers.read, box, last_read[0])
            last_read[0] = (box, future)
            reads.append((region, box, future))
            if ahead is not None:   # its batches can run as soon as its pixels are read
                for keys in run_batches[started[0]]:
                    ahead.add(keys, lambda r=region, b=box, f=future, keys=keys: tiles_of(r, b, f, keys))
            started[0] += 1

    def record(region: Region, result: dict) -> None:
        nonlocal done_count
        state["regions"][str(region.index)] = {"file": result["file"], "nuclei": int(result["nuclei"]),
                                               "seconds": round(float(result["seconds"]), 3)}
        timing["postprocess"] += float(result["seconds"])
        utils.write_json(state_path, state)
        if assembly is not None:
            assembly.feed()
        done_count += 1
        bar.update(1)
        if on_region_done is not None:
            on_region_done(done_count)

    try:
        for _ in range(max(1, int(options.read_threads)) + 1):
            read_next()
        for k in range(len(todo)):
            region, box, future = reads.popleft()
            rgb, seconds = future.result()
            read_next()
            timing["read"] += seconds
            t0 = time.time()
            later = {key for key in region.windows if last_use[key] > k}
            batches = None if ahead is None else (ahead.take(keys) for keys in run_batches[k])
            fg, hv, ran = stitch_region(region, rgb, geo, predictor.maps_fn, batch_size, cache, later, box[:2],
                                        batches)
            for key in region.windows:
                if last_use[key] == k:
                    cache.pop(key, None)
            timing["network"] += time.time() - t0
            timing["windows"] += ran
            (by0, bx0), (cy0, cx0, cy1, cx1) = box[:2], region.crop
            job = {"fg": fg, "hv": hv, "rgb": np.ascontiguousarray(rgb[cy0 - by0:cy1 - by0, cx0 - bx0:cx1 - bx0]),
                   "settings": settings, "crop": region.crop, "core": region.core, "scale": geo.scale,
                   "mpp": float(predictor.model_mpp), "file": str(pdir / f"region_{region.index:06d}.npz"),
                   "min_confidence": float(options.min_confidence)}
            del rgb, fg, hv
            if pool is None:
                record(region, finish_region(job))
            else:
                # the maps and RGB go to the worker through a file in shared memory where there is one (a pickle
                # of them costs this process about 0.14 s per region)
                packed = handoff.pack({key: job[key] for key in ("fg", "hv", "rgb")})
                if packed is not None:
                    job = dict(job, fg=None, hv=None, rgb=None, arrays=packed)
                pending.append((region, packed, pool.submit(finish_region, job)))
                while len(pending) > workers + QUEUED_REGIONS:
                    r, p, f = pending.popleft()
                    record(r, f.result())
                    handoff.release(p)
            del job
        while pending:
            r, p, f = pending.popleft()
            record(r, f.result())
            handoff.release(p)
    finally:
        for _, _, f in pending:   # a failed slide's regions not yet begun (a run's pool goes on to the next slide)
            f.cancel()
        handoff.close()
        bar.close()
        for _, _, f in reads:
            f.cancel()
        read_pool.shutdown(wait=True, cancel_futures=True)
        if ahead is not None:   # after the reads: a batch waiting for a cancelled read ends at once
            ahead.close()
        readers.close()
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return timing


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
class _RegionLabels:
    """Level-0 label tiles rasterised from the region files (nearest neighbour from the target grid),
    with a small cache of decoded regions."""

    def __init__(self, files: list[Path], offsets: list[int], boxes: list[tuple], scale: float,
                 cache: int = 6, wait: Callable[[int, int, int, int], None] | None = None) -> None:
        """`boxes`: each region file's label crop (y0, x0, y1, x1) in target pixels. `wait(ty0, tx0, ty1, tx1)`: called
        before a tile is made with its box in target pixels, returns once every region that can reach the box is in
        the three lists (which then may still grow: an `Assembly` being fed while its label image is written)."""
        self.files, self.offsets, self.scale = files, offsets, scale
        self.cache: OrderedDict[int, tuple] = OrderedDict()
        self.size = cache
        self.box_list, self.wait = boxes, wait
        self.boxes = np.array(boxes, np.float64).reshape(-1, 4)

    def _get(self, i: int) -> tuple:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        with np.load(self.files[i]) as data:
            item = (_region_labels(data), tuple(int(v) for v in data["origin"]))
        self.cache[i] = item
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return item

    def read_tile(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        s = self.scale
        ty0, ty1 = math.floor((y + 0.5) * s), math.floor((y + h - 0.5) * s) + 1
        tx0, tx1 = math.floor((x + 0.5) * s), math.floor((x + w - 0.5) * s) + 1
        if self.wait is not None:
            self.wait(ty0, tx0, ty1, tx1)
            if len(self.box_list) != len(self.boxes):   # regions fed since the last tile (their files are in)
                self.boxes = np.array(list(self.box_list), np.float64).reshape(-1, 4)
        if not len(self.boxes):
            return np.zeros((h, w), np.uint32)
        out = None    # made by the first region that covers the whole tile (no zeros to write first), else zeros
        b = self.boxes
        hits = np.flatnonzero((b[:, 0] < ty1) & (b[:, 2] > ty0) & (b[:, 1] < tx1) & (b[:, 3] > tx0)
                              & (b[:, 2] > b[:, 0]))
        rows_t = np.floor((np.arange(y, y + h) + 0.5) * s).astype(np.int64)
        cols_t = np.floor((np.arange(x, x + w) + 0.5) * s).astype(np.int64)
        for i in hits.tolist():
            labels, (oy, ox) = self._get(i)
            if out is None and not (oy <= rows_t[0] and rows_t[-1] < oy + labels.shape[0]
                                    and ox <= cols_t[0] and cols_t[-1] < ox + labels.shape[1]):
                out = np.zeros((h, w), np.uint32)
            r = rows_t - oy
            c = cols_t - ox
            rv = np.flatnonzero((r >= 0) & (r < labels.shape[0]))
            cv = np.flatnonzero((c >= 0) & (c < labels.shape[1]))
            if not rv.size or not cv.size:
                continue
            if s == 1.0:   # r and c are runs of consecutive integers by construction (a test checks the rule)
                rs = slice(int(r[rv[0]]), int(r[rv[-1]]) + 1)
                cs = slice(int(c[cv[0]]), int(c[cv[-1]]) + 1)
            else:
                rs, cs = _consecutive(r[rv]), _consecutive(c[cv])
            if rs is not None and cs is not None:
                # one target pixel per region pixel (scale 1, or any run of distinct rows / columns): views,
                # no gathers; rv and cv are runs too (r and c never decrease)
                sub = labels[rs, cs]
                if out is None:   # the whole tile from this region: sub + offset, times 0 where sub is 0
                    out = np.add(sub, np.uint32(self.offsets[i]), dtype=np.uint32, casting="unsafe")
                    np.multiply(out, sub != 0, out=out)
                    continue
                target = out[rv[0]:rv[-1] + 1, cv[0]:cv[-1] + 1]
                np.add(sub, np.uint32(self.offsets[i]), out=target, where=sub > 0, casting="unsafe")
                continue
            out = np.zeros((h, w), np.uint32) if out is None else out
            sub = labels[np.ix_(r[rv], c[cv])].astype(np.uint32)
            target = out[np.ix_(rv, cv)]
            nz = sub > 0
            target[nz] = sub[nz] + np.uint32(self.offsets[i])
            out[np.ix_(rv, cv)] = target
        return np.zeros((h, w), np.uint32) if out is None else out


def _consecutive(index: np.ndarray) -> slice | None:
    """`slice(a, b)` when `index` is exactly a, a + 1, ..., b - 1 (non-empty), else None."""
    if index.size and int(index[-1]) - int(index[0]) == index.size - 1 and bool(np.all(np.diff(index) == 1)):
        return slice(int(index[0]), int(index[-1]) + 1)
    return None


class Assembly:
    """A slide's GeoJSON and CSV, written from its region files in region order (global ids 1..N in that order)
    while the run goes on: `feed()` adds every region recorded in `state` from the first one not yet added up to
    the first one still missing (`run_regions` calls it after recording each region, so with post-processing
    workers this writing overlaps the regions still running instead of following the last one); `finish()` adds
    the rest, moves both files into place and writes the label image; `abort()` deletes the temporary files (the
    outputs of an earlier run stay untouched). `seconds` is the time spent in `feed` and `finish`.

    `stream_labels(geo, shape0)` writes the label image while the regions are fed instead of in `finish`: in a thread
    of its own, each tile as soon as every region whose crop reaches it is in (region rows come in order, so the
    writer follows them a row behind); the same bytes. `predict_slide` uses it when there are post-processing
    workers, so that the slide does not end with the whole label pyramid on one core."""

    def __init__(self, outputs: dict, regions: list[Region], state: dict, pdir: Path, mpp0: float, options) -> None:
        import export

        self.outputs, self.regions, self.state, self.pdir, self.mpp0 = outputs, regions, state, pdir, mpp0
        self.files, self.offsets, self.boxes, self.centroids, self.confidence = [], [], [], [], []
        self.total = self.dropped = self.added = 0
        self.seconds = 0.0
        self.fed = threading.Condition()
        self.labels_thread: threading.Thread | None = None
        self.labels_error: list = []
        self.aborted = False
        self.geojson = export.GeoJSONWriter(outputs["geojson"], gzip=options.geojson_gzip)
        try:
            self.csv = export.CSVWriter(outputs["csv"], export.measurement_columns(mpp0, confidence=True))
        except BaseException:
            self.geojson.abort()
            raise

    def feed(self) -> None:
        import export

        start = time.time()
        while self.added < len(self.regions):
            record = self.state["regions"].get(str(self.regions[self.added].index))
            if record is None:
                break
            f = self.pdir / record["file"]
            # the label pyramid decodes the labels tile by tile; the rows come as columns (no JSON to parse) when
            # the region file has them
            data = read_region_file(f, labels=False, rows=False)
            offset = self.total
            columns = data["columns"]
            if columns is not None:
                n = data["nuclei"]
                if n and not {"id", "centroid_x", "centroid_y"} <= set(columns):
                    raise ValueError(f"{f}: region file without the id and centroid columns")
                values = {key: array.tolist() for key, array in columns.items()}
                ids = values["id"] = [int(i) + offset for i in values["id"]] if n else []
                self.centroids.append(np.stack([columns["centroid_x"], columns["centroid_y"]], axis=1)
                                      .astype(np.float32).reshape(-1, 2) if n else np.zeros((0, 2), np.float32))
                self.confidence.append(columns["confidence"].astype(np.float32) if "confidence" in columns
                                       else np.full(n, np.nan, np.float32))
                self.geojson.add_text(export.features_json(ids, data["geometry"], data["measurements"]))
                self.csv.add_columns(values)
            else:
                for row in data["rows"]:
                    row["id"] = int(row["id"]) + offset
                self.centroids.append(np.array([(r["centroid_x"], r["centroid_y"]) for r in data["rows"]],
                                               np.float32).reshape(-1, 2))
                self.confidence.append(np.array([r.get("confidence", np.nan) for r in data["rows"]], np.float32))
                self.geojson.add_text(export.features_json([row["id"] for row in data["rows"]], data["geometry"],
                                                           data["measurements"]))
                self.csv.add(data["rows"])
            self.files.append(f)
            self.offsets.append(offset)
            oy, ox = data["origin"]
            self.boxes.append((oy, ox, oy + data["labels_shape"][0], ox + data["labels_shape"][1]))
            self.total += data["nuclei"]
            self.dropped += data["dropped"]
            with self.fed:
                self.added += 1
                self.fed.notify_all()
        self.seconds += time.time() - start

    def stream_labels(self, geo: Geometry, shape0: tuple[int, int]) -> None:
        if "labels" not in self.outputs or self.labels_thread is not None:
            return
        crops = np.array([r.crop for r in self.regions], np.int64).reshape(-1, 4)

        def wait(ty0: int, tx0: int, ty1: int, tx1: int) -> None:
            # the last region (in feeding order) whose crop, which holds its labels, reaches the tile's box
            reach = np.flatnonzero((crops[:, 0] < ty1) & (crops[:, 2] > ty0)
                                   & (crops[:, 1] < tx1) & (crops[:, 3] > tx0))
            needed = int(reach[-1]) + 1 if reach.size else 0
            with self.fed:
                while self.added < needed and not self.aborted:
                    self.fed.wait()
                if self.aborted:
                    raise RuntimeError("the slide's run stopped")

        def write() -> None:
            try:
                self._write_labels(geo, shape0, wait)
            except BaseException as e:   # noqa: BLE001 - given to `finish`
                self.labels_error.append(e)

        self.labels_thread = threading.Thread(target=write, name="label-image", daemon=True)
        self.labels_thread.start()

    def _stop_labels(self) -> None:
        if self.labels_thread is not None:
            with self.fed:
                self.aborted = True
                self.fed.notify_all()
            self.labels_thread.join()

    def collect(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Adds every recorded region (`feed`) and returns (N, level-0 centroids (N, 2) x, y float32, confidences
        (N,) float32) of what was added."""
        self.feed()
        return (self.total, (np.concatenate(self.centroids) if self.centroids else np.zeros((0, 2), np.float32)),
                (np.concatenate(self.confidence) if self.confidence else np.zeros(0, np.float32)))

    def finish(self, geo: Geometry, shape0: tuple[int, int]) -> tuple[int, np.ndarray, np.ndarray]:
        """Returns what `collect` does, once every region is in; `state["dropped_low_confidence"]` gets the number
        of nuclei `--min_confidence` dropped."""
        collected = self.collect()
        start = time.time()
        if self.added < len(self.regions):
            raise RuntimeError(f"region {self.regions[self.added].index} has no region file")
        self.geojson.close()
        self.csv.close()
        self.state["dropped_low_confidence"] = self.dropped
        if self.labels_thread is not None:   # written while the regions came: its last tiles now
            self.labels_thread.join()
            if self.labels_error:
                raise self.labels_error[0]
        elif "labels" in self.outputs:
            self._write_labels(geo, shape0)
        self.seconds += time.time() - start
        return collected

    def _write_labels(self, geo: Geometry, shape0: tuple[int, int], wait=None) -> None:
        """The label image from the region files fed (`wait`: `_RegionLabels`'; given, the tiles follow the feeding,
        in a thread without a progress bar)."""
        import label_pyramid

        raster = _RegionLabels(self.files, self.offsets, self.boxes, geo.scale, wait=wait)
        label_pyramid.write_label_pyramid(self.outputs["labels"], shape0, raster.read_tile, mpp=self.mpp0,
                                          tile_size=LABEL_TILE, show_progress=wait is None)

    def abort(self) -> None:
        self._stop_labels()   # its temporary files go; an earlier run's label image stays
        self.geojson.abort()
        self.csv.abort()


def assemble(output_dir: Path, name: str, outputs: dict, regions: list[Region], state: dict, pdir: Path,
             geo: Geometry, mpp0: float, shape0: tuple[int, int], options) -> tuple[int, np.ndarray, np.ndarray]:
    """Write GeoJSON, CSV (and the label image) from the region files of a finished run at once (`Assembly`);
    returns what `Assembly.finish` does."""
    assembly = Assembly(outputs, regions, state, pdir, mpp0, options)
    try:
        return assembly.finish(geo, shape0)
    except BaseException:
        assembly.abort()
        raise
