"""The inference engine: from pixels to network maps, for every caller (plain images, slides, `evaluate`,
`demo`, prompt windows, Dask workers). `predict.py` is only the command on top of it.

What it owns:
- The model set and its maps function: `select_models` (the fold model with the best validation score, or all
  with `ensemble`), `model_maps_fn` -> a `NetworkMaps` (the networks on one device), `network_scale`,
  `model_tile_size`, `model_mpp`; `Predictor` / `load_predictor` (loaded once per process).
- The window grid (`tile_starts`) and the blend weights (`tile_weights`): along an edge shared with a
  neighbouring window the weight is 0 on the outer quarter of the overlap (where the network sees only part
  of a nucleus and its HV map is unreliable), then rises as a smooth sin² ramp to 1; along an image border it
  is 1 up to the edge. Every pixel is covered by a positive weight of at least one window.
- Blending: ONE implementation, `blend_windows` (a `Blender` of torch tensors on the maps function's device),
  used by `stitch_maps` (a whole image) and by `wsi.stitch_region` (a slide region from the slide's global
  grid). Windows are added in raster order, so a pixel's sums do not depend on which caller stitched it.
- Batching and device placement, with per-device defaults (`default_batch_size`, `default_num_workers`):
  on the CPU a batch of 1 (fastest per window there, measured: docs/benchmarks.md "Issue 17"); on CUDA the
  largest batch that still raises throughput (`probe_batch_size`, once per process). On an accelerator the
  windows go to the device once (pinned memory, copied on a side CUDA stream so the copy of the next batch
  overlaps the network), are resized to the network input, run, resized back and blended there; only the
  blended maps of an image / region come back to the host; a slide's batches run ahead of the blending in a
  thread of their own (`MapsAhead`), so the device works while this process blends, hands regions to the
  post-processing workers and writes outputs. On the CPU the maps are those of
  `nuclei_model.predict_maps_scaled` (PIL resizing), blended with the same torch code (bit-identical to numpy
  float32 arithmetic: tests/test_inference.py).
- `image_maps` / `labels_from_maps` / `predict_image`: a whole image of any size; `Outcome` (what happened to
  one input) and `error_message`, shared by `predict`, `wsi` and `dask_predict`.

Scale: with `mpp` (micrometres per pixel of the input) an image is resized so its pixel size matches the
model's training pixel size (the checkpoint's `mpp`, NuInsSeg's by default); windows and overlap are counted in
pixels of that resized image.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

import image_io
import utils
from utils import UserError

log = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 512   # source pixels per tile when the checkpoint does not say (NuInsSeg image size)

# maps_fn(list of uint8 RGB tiles) -> list of (foreground probability (h, w), hv (2, h, w) or None)
MapsFn = Callable[[list], list]


# ----------------------------------------------------------------------------------------------
# Tiling and stitching
# ----------------------------------------------------------------------------------------------
def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile_size` covering 0..length with at least `overlap` pixels shared
    between neighbours; the last tile ends at `length` (an image shorter than a tile gets one tile)."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def _ramp(overlap: int) -> np.ndarray:
    """Weights of the `overlap` pixels at a tile edge shared with a neighbour, outermost first: 0 on the
    outer quarter, a sin² rise over the middle half, ~1 on the inner quarter."""
    if overlap <= 0:
        return np.ones(0, dtype=np.float32)
    crop = overlap // 4
    rise = max(overlap - 2 * crop, 1)
    t = np.clip((np.arange(overlap) + 0.5 - crop) / rise, 0.0, 1.0)
    return (np.sin(t * np.pi / 2) ** 2).astype(np.float32)


def tile_weights(length: int, start: int, tile_size: int, overlap: int, total: int) -> np.ndarray:
    """1-D weight profile of a tile spanning `start .. start + length` of an axis of `total` pixels."""
    w = np.ones(length, dtype=np.float32)
    ramp = _ramp(min(overlap, length // 2))
    if start > 0 and ramp.size:
        w[: ramp.size] = ramp
    if start + length < total and ramp.size:
        w[length - ramp.size:] = np.minimum(w[length - ramp.size:], ramp[::-1])
    return w


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pad_h, pad_w = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")


def maps_device(maps_fn):
    """The torch device where a maps function's maps are blended: `maps_fn.device` for one that keeps its maps
    there (`keep_on_device` true and a `device_maps` method: `NetworkMaps` on an accelerator), else the CPU (a
    function returning numpy maps)."""
    import torch

    if getattr(maps_fn, "keep_on_device", False) and getattr(maps_fn, "device_maps", None) is not None:
        return torch.device(maps_fn.device)
    return torch.device("cpu")


class Blender:
    """Weighted sums of window maps over `box` (y0, x0, y1, x1) of a grid of `total` (H, W) pixels, with the
    weights `tile_weights` gives the window at its place in that grid: float32 torch tensors on `device`.

    `add(y, x, fg, hv)` adds one `tile` x `tile` window at (y, x) (only its part inside the box); `maps()` is
    (sum of w * maps) / (sum of w) as numpy. Each operation is one IEEE float32 product or sum per pixel, the
    same on every device and identical to the numpy float32 arithmetic of the loop this replaces, so callers
    that add a pixel's windows in the same order get bit-identical maps (tests/test_inference.py). A window's pixels
    of weight 0 (the outer quarter of an overlap shared with a neighbour) are not added: for finite maps that is
    the same (adding 0 * a finite value changes no sum), and a NaN there does not spread into the neighbour's."""

    def __init__(self, box: tuple[int, int, int, int], total: tuple[int, int], tile: int, overlap: int,
                 device=None) -> None:
        import torch

        self.torch = torch
        self.box = tuple(int(v) for v in box)
        self.total = (int(total[0]), int(total[1]))
        self.tile, self.overlap = int(tile), int(overlap)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        y0, x0, y1, x1 = self.box
        self.shape = (y1 - y0, x1 - x0)
        self.fg = self._zeros(self.shape)
        self.w = self._zeros(self.shape)
        self.hv = None
        self.has_hv: bool | None = None
        self._profiles: dict = {}
        self._weights: dict = {}     # a window's weights depend only on which grid borders it touches
        self._scratch = None         # (3, tile, tile) products of one window, reused (no allocation per window)
        self._done = False

    def _zeros(self, shape: tuple):
        """float32 zeros on the device; on the CPU through numpy's calloc, whose fresh pages are zero already (no
        pass over the box to clear them: about a third of a CPU region's blending time)."""
        if self.device.type == "cpu":
            return self.torch.from_numpy(np.zeros(shape, np.float32))
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def _profile(self, axis: int, start: int):
        """(weights, first, end): a window's 1-D profile along `axis` and the range of its non-zero weights. It
        depends only on whether the window touches the grid's two borders."""
        key = (axis, start > 0, start + self.tile < self.total[axis])
        if key not in self._profiles:
            w = tile_weights(self.tile, start, self.tile, self.overlap, self.total[axis])
            nonzero = np.flatnonzero(w)
            first, end = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
            self._profiles[key] = (self.torch.from_numpy(w).to(self.device), first, end)
        return self._profiles[key]

    def _weight(self, y: int, x: int):
        """The window's (tile, tile) weights: the outer product of its two profiles, made once per kind of window
        (a slice of it is the outer product of the profiles' slices: the same float32 products)."""
        key = (y > 0, y + self.tile < self.total[0], x > 0, x + self.tile < self.total[1])
        if key not in self._weights:
            self._weights[key] = self.torch.outer(self._profile(0, y)[0], self._profile(1, x)[0])
        return self._weights[key]

    def _tensor(self, value):
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return value.to(device=self.device, dtype=torch.float32)
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(self.device)

    def add(self, y: int, x: int, fg, hv=None) -> None:
        if self._done:
            raise RuntimeError("Blender.add after maps()")
        torch = self.torch
        tile = self.tile
        if tuple(fg.shape) != (tile, tile):
            raise RuntimeError(f"maps function returned a {tuple(fg.shape)} map for a {tile}-pixel tile")
        if self.has_hv is None:
            self.has_hv = hv is not None
            if self.has_hv:
                self.hv = self._zeros((2,) + self.shape)
        y0, x0, y1, x1 = self.box
        # the part of the window inside the box where its weight is not 0 (the outer quarter of a shared overlap
        # is 0: adding 0 * a finite value leaves every sum as it is, so those pixels are not touched)
        _, fy, ey = self._profile(0, y)
        _, fx, ex = self._profile(1, x)
        ty0, tx0 = max(y0 - y, fy), max(x0 - x, fx)
        ty1, tx1 = min(y1 - y, ey), min(x1 - x, ex)
        if ty1 <= ty0 or tx1 <= tx0:
            return
        if self._scratch is None:
            self._scratch = torch.empty((3, tile, tile), dtype=torch.float32, device=self.device)
        h, w = ty1 - ty0, tx1 - tx0
        weight = self._weight(y, x)[ty0:ty1, tx0:tx1]
        oy, ox = y + ty0 - y0, x + tx0 - x0
        sl = (slice(oy, oy + h), slice(ox, ox + w))
        # the same IEEE float32 product and sum per pixel as `sums[sl] += weight * map`, into a reused buffer
        product = self._scratch[0, :h, :w]
        torch.mul(weight, self._tensor(fg)[ty0:ty1, tx0:tx1], out=product)
        self.fg[sl] += product
        self.w[sl] += weight
        if self.hv is not None:
            product = self._scratch[1:, :h, :w]
            torch.mul(weight[None], self._tensor(hv)[:, ty0:ty1, tx0:tx1], out=product)
            self.hv[(slice(None),) + sl] += product

    def maps(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(foreground (h, w), hv (2, h, w) | None) float32 numpy of the box (one copy to the host). The sums are
        divided in place (on the CPU the arrays returned are the blender's own memory): the blender is done."""
        self._done = True
        self._scratch = None
        w = self.w.clamp_min_(1e-12)
        fg = self.fg.div_(w).cpu().numpy()
        hv = None if self.hv is None else self.hv.div_(w[None]).cpu().numpy()
        return fg, hv


def runs_ahead(maps_fn) -> bool:
    """Whether a maps function does its work on an accelerator (`accelerator` true: `NetworkMaps` on any device
    but the CPU, or a stand-in that says so), so that a slide's windows are best run a few batches ahead of
    the blending in a thread of their own (`MapsAhead`): the device then computes the next batch while this
    process blends the last one, hands regions to the post-processing workers and writes outputs. On the CPU the
    network uses every core itself and is called in line."""
    return bool(getattr(maps_fn, "accelerator", False))


def run_batch(maps_fn: MapsFn, tiles: list) -> list:
    """The maps of one batch of tiles as a list of (fg, hv | None), one pair per tile: through `device_maps` for a
    maps function that keeps its maps on its device (views of the batch's tensors), else its own call."""
    if getattr(maps_fn, "keep_on_device", False) and getattr(maps_fn, "device_maps", None) is not None:
        fg, hv = maps_fn.device_maps(tiles)
        results = [(fg[i], None if hv is None else hv[i]) for i in range(len(tiles))]
    else:
        results = maps_fn(tiles)
    if len(results) != len(tiles):
        raise RuntimeError(f"maps function returned {len(results)} results for {len(tiles)} tiles")
    return results


def blend_windows(blender: Blender, windows: Sequence, position: Callable, pixels: Callable, maps_fn: MapsFn,
                  batch_size: int, cache: dict | None = None, keep=None,
                  progress: Callable[[int], None] | None = None, batches=None) -> int:
    """Run the network on `windows` (keys, in raster order of the grid) and add their maps to `blender`; the
    ONE window loop of the project (`stitch_maps` for an image, `wsi.stitch_region` for a slide region).

    `position(key)` is the window's (y, x) in the blender's grid, `pixels(key)` its uint8 RGB tile. Windows in
    `cache` {key: (fg, hv)} are not run again; the maps of run windows whose key is in `keep` are added to
    `cache` (the caller drops what no later call needs). Windows are added in the order of `windows`, whether
    cached or run, so the sums never depend on the cache. A maps function that keeps its maps on its device
    (`keep_on_device`: `NetworkMaps` on an accelerator) is given the tiles through `device_maps`; any other is
    called with the list of tiles and returns numpy maps (`run_batch`). `batches`: the maps of the windows to run
    computed elsewhere (`MapsAhead`), an iterator of (keys, results) per batch of `batch_size` windows in order,
    whose keys must be this call's; `maps_fn` is then not called (and `pixels` not used). Returns the number of
    windows run."""
    cache = {} if cache is None else cache
    keep = () if keep is None else keep
    step = max(int(batch_size or 1), 1)
    on_device = getattr(maps_fn, "keep_on_device", False) and getattr(maps_fn, "device_maps", None) is not None
    todo = [key for key in windows if key not in cache]
    ready: dict = {}
    position_in_order = 0

    def drain() -> None:
        nonlocal position_in_order
        while position_in_order < len(windows):
            key = windows[position_in_order]
            if key in cache:
                maps = cache[key]
            elif key in ready:
                maps = ready.pop(key)
            else:
                break
            blender.add(*position(key), *maps)
            position_in_order += 1

    for first in range(0, len(todo), step):
        batch = todo[first:first + step]
        if batches is None:
            results = run_batch(maps_fn, [np.ascontiguousarray(pixels(key)) for key in batch])
        else:
            keys, results = next(batches, (None, None))
            if keys is None or list(keys) != batch or len(results) != len(batch):
                raise RuntimeError(f"maps computed ahead for windows {keys}, expected {batch}")
        for key, maps in zip(batch, results):
            ready[key] = maps
            if key in keep:
                # a device map is a view of its whole batch: a copy frees the batch
                cache[key] = tuple(m.clone() if on_device and m is not None else m for m in maps)
        drain()
        if progress is not None:
            progress(len(batch))
    drain()
    return len(todo)


AHEAD_BATCHES = 4   # batches a slide's maps thread may run ahead of the blending (`MapsAhead`)


class MapsAhead:
    """A maps function run in a thread of its own, ahead of the caller, on a schedule of batches known in advance
    (a slide's batches, region after region: `wsi.run_regions` on an accelerator). `add(keys, tiles_fn)` appends
    one batch (`tiles_fn()` gives its tiles; it is called in a second thread, which gathers the next batch's tiles
    while the device works on this one, so it may wait for a read); at most `depth` batches are gathered, computed
    or waiting to be taken, so memory holds `depth` batches of tiles and maps whatever the slide. `take(keys)`
    gives (keys, results) of the oldest batch, which must be `keys` (`blend_windows`' `batches`), starting the
    next ones first. An error of the maps function (or of a read) comes out of `take` for that batch. `close()`
    drops what was not taken and waits for the batch running (at most one per thread)."""

    def __init__(self, maps_fn: MapsFn, depth: int = AHEAD_BATCHES) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.maps_fn, self.depth = maps_fn, max(int(depth), 1)
        self.waiting: deque = deque()    # (keys, tiles_fn) not started yet
        self.running: deque = deque()    # (keys, tiles future, maps future) started, in order
        self.gather = ThreadPoolExecutor(1, thread_name_prefix="maps-tiles")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="maps-ahead")

    @staticmethod
    def _tiles(tiles_fn: Callable[[], list]) -> list:
        return [np.ascontiguousarray(t) for t in tiles_fn()]

    def _run(self, tiles) -> list:
        return run_batch(self.maps_fn, tiles.result())

    def _start(self) -> None:
        while self.waiting and len(self.running) < self.depth:
            keys, tiles_fn = self.waiting.popleft()
            tiles = self.gather.submit(self._tiles, tiles_fn)
            self.running.append((keys, tiles, self.pool.submit(self._run, tiles)))

    def add(self, keys: list, tiles_fn: Callable[[], list]) -> None:
        self.waiting.append((list(keys), tiles_fn))
        self._start()

    def take(self, keys: list) -> tuple[list, list]:
        self._start()
        if not self.running:
            raise RuntimeError(f"no maps computed ahead for windows {list(keys)}")
        got, _, future = self.running.popleft()
        if got != list(keys):
            raise RuntimeError(f"maps computed ahead for windows {got}, expected {list(keys)}")
        try:
            return got, future.result()
        finally:
            self._start()

    def close(self) -> None:
        self.waiting.clear()
        for _, tiles, future in self.running:
            future.cancel()
            tiles.cancel()
        self.running.clear()
        self.gather.shutdown(wait=True, cancel_futures=True)   # a batch waiting for these tiles ends at once
        self.pool.shutdown(wait=True, cancel_futures=True)


def stitch_maps(image: np.ndarray, tile_size: int, overlap: int, maps_fn: MapsFn, batch_size: int | None = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Foreground probability (H, W) and HV maps (2, H, W) (None for a binary model) of a whole image
    from overlapping tiles blended with `tile_weights` (`blend_windows`).

    `maps_fn` receives a list of at most `batch_size` (default: `default_batch_size` of its device) uint8 RGB
    tiles of `tile_size` x `tile_size` and returns one (foreground probability, hv | None) pair per tile at the
    tile's size. An image smaller than a tile is padded (mirrored) to a full tile so the network always sees
    the same scale.
    """
    if tile_size < 16:
        raise UserError(f"--tile_size {tile_size}: must be at least 16 pixels")
    if overlap < 0 or 2 * overlap > tile_size:
        raise UserError(f"--overlap {overlap}: must be between 0 and half the tile size ({tile_size // 2})")
    height, width = image.shape[:2]
    padded = _pad_to(image, tile_size, tile_size)
    full_h, full_w = padded.shape[:2]
    ys, xs = tile_starts(full_h, tile_size, overlap), tile_starts(full_w, tile_size, overlap)
    boxes = [(y, x) for y in ys for x in xs]
    if batch_size is None:
        batch_size = default_batch_size(maps_fn, tile_size)
    blender = Blender((0, 0, full_h, full_w), (full_h, full_w), tile_size, overlap, maps_device(maps_fn))
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False, disable=not progress)
    blend_windows(blender, boxes, lambda key: key,
                  lambda key: padded[key[0]:key[0] + tile_size, key[1]:key[1] + tile_size], maps_fn, batch_size,
                  progress=bar.update)
    bar.close()
    fg_map, hv_map = blender.maps()
    fg_map = fg_map[:height, :width]
    hv_map = None if hv_map is None else hv_map[:, :height, :width]
    return fg_map, hv_map


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def model_tile_size(model_set) -> int:
    """Source pixels per network input the model was trained with (config `tile_size`, recorded by
    train.py; else 512, the NuInsSeg image size)."""
    config = getattr(model_set, "config", None) or {}
    for key in ("tile_size",):
        value = config.get(key)
        if isinstance(value, (int, float)) and value >= 16:
            return int(value)
    return DEFAULT_TILE_SIZE


def model_mpp(model_set) -> float:
    """Micrometres per pixel of the model's training images (config `mpp`, else NuInsSeg's)."""
    config = getattr(model_set, "config", None) or {}
    value = config.get("mpp")
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    import dataset

    return float(dataset.NUINSSEG_MPP)


def _member_score(member) -> float | None:
    """The member's validation score from its checkpoint (`val[monitor]`, negated for a loss so that
    higher is always better), or None when the checkpoint records none."""
    import nuclei_model

    path = getattr(member, "checkpoint_path", None)
    if path is None:
        return None
    try:
        ckpt = nuclei_model.read_checkpoint(path)
    except UserError:
        return None
    monitor = str(ckpt.get("monitor") or "pq")
    value = (ckpt.get("val") or {}).get(monitor)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return -float(value) if "loss" in monitor else float(value)


def select_models(model_set, ensemble: bool) -> list:
    """The networks to run: all fold models with `ensemble`, else the fold model with the best
    validation score recorded in its checkpoint (`val[monitor]`; the first member when none is recorded)."""
    members = list(model_set.members)
    if not members:
        raise UserError("--model_path: the model set holds no models")
    if ensemble or len(members) == 1:
        return [m.model for m in members]
    scored = [(s, -i) for i, m in enumerate(members) if (s := _member_score(m)) is not None]
    best = -max(scored)[1] if scored else 0
    if not scored:
        log.warning("no validation scores stored with the fold models; using fold %s "
                    "(pass --ensemble to average all folds)", getattr(members[0], "fold", 0))
    else:
        log.info("using the fold model with the best validation score: fold %s "
                 "(pass --ensemble to average all folds)", getattr(members[best], "fold", best))
    return [members[best].model]


class NetworkMaps:
    """The maps function of a model set's network(s) on one device (`model_maps_fn`).

    Called with a list of uint8 RGB tiles it returns numpy maps (`nuclei_model.predict_maps_scaled`: PIL
    resizing on the host; the CPU path). `device_maps(tiles)` keeps everything on an accelerator: the tiles
    are stacked in pinned host memory and copied on a side CUDA stream (`non_blocking`, so the copy of the
    next batch overlaps the network on this one), resized to the network input there (bilinear, antialiased
    when shrinking, rounded to 0..255 as PIL does), mirror-padded to a multiple of 64, run, and the maps
    resized back on the device; returns (fg (B, H, W), hv (B, 2, H, W) | None) device tensors.
    `keep_on_device` (default: on any device but the CPU) makes the engine use `device_maps` and blend on the
    device; on the CPU it is off, so the CPU path is today's numpy one (tests turn it on to check it there).
    `accelerator` (on any device but the CPU) makes a slide run its batches ahead in a thread (`MapsAhead`)."""

    def __init__(self, models: list, scale: float, device, amp: bool = True, multiple: int = 64) -> None:
        import torch

        self.models, self.scale, self.amp, self.multiple = list(models), float(scale), bool(amp), int(multiple)
        self.device = torch.device(device)
        self.keep_on_device = self.device.type != "cpu"
        self.accelerator = self.device.type != "cpu"   # a slide's windows run ahead of the blending (`runs_ahead`)
        self._copy_stream = None

    def __call__(self, tiles: list) -> list:
        import nuclei_model

        # the magnification is the model's (input size / training tile), whatever the window size
        return nuclei_model.predict_maps_scaled(self.models, tiles, self.scale, self.device, amp=self.amp)

    def upload(self, tiles: list):
        """The tiles as one uint8 (B, H, W, 3) tensor on the device (pinned + asynchronous on CUDA)."""
        import torch

        host = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]))
        if self.device.type != "cuda":
            return host.to(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        host = host.pin_memory()  # the caching host allocator keeps it until the copy is done
        current = torch.cuda.current_stream(self.device)
        # the copy runs on its own stream, so it does not wait for the network still busy on the previous batch
        with torch.cuda.stream(self._copy_stream):
            batch = host.to(self.device, non_blocking=True)
        current.wait_stream(self._copy_stream)  # the network on this batch waits for its copy only
        batch.record_stream(current)  # the caching allocator keeps it until the network has read it
        return batch

    def device_maps(self, tiles: list):
        import torch
        import torch.nn.functional as F

        import nuclei_model

        with torch.no_grad():
            batch = self.upload(tiles)
            n, h, w = batch.shape[:3]
            rh, ph = nuclei_model.network_size(h, self.scale, self.multiple)
            rw, pw = nuclei_model.network_size(w, self.scale, self.multiple)
            side = max(ph, pw)
            x = batch.permute(0, 3, 1, 2)
            if (rh, rw) != (h, w):
                x = F.interpolate(x.float(), size=(rh, rw), mode="bilinear", align_corners=False,
                                  antialias=rh < h or rw < w).round_().clamp_(0, 255).to(torch.uint8)
            if (rh, rw) != (side, side):
                x = x.index_select(2, _symmetric_index(rh, side, x.device))
                x = x.index_select(3, _symmetric_index(rw, side, x.device))
            out = nuclei_model.network_outputs(self.models, x.contiguous(), self.device, self.amp, crop=(rh, rw))
            fg = F.interpolate(out["foreground_prob"].float(), size=(h, w), mode="bilinear",
                               align_corners=False)[:, 0].clamp_(0, 1)
            hv = out.get("hv")
            if hv is not None:
                hv = F.interpolate(hv.float(), size=(h, w), mode="bilinear", align_corners=False)
        return fg, hv


def _symmetric_index(length: int, total: int, device):
    """Indices of numpy's "symmetric" padding of an axis of `length` to `total` (edge repeated, then mirrored)."""
    import torch

    i = np.arange(total) % (2 * length)
    return torch.from_numpy(np.where(i < length, i, 2 * length - 1 - i)).to(device)


def model_maps_fn(model_set, ensemble: bool = False, device=None, amp: bool = True) -> NetworkMaps:
    """A `maps_fn` for `stitch_maps` running the model set's network(s) on batches of tiles."""
    import nuclei_model

    models = [nuclei_model.prepare_for_inference(m) for m in select_models(model_set, ensemble)]
    device = utils.select_device(None) if device is None else device
    return NetworkMaps(models, network_scale(model_set), device, amp=amp)


# ----------------------------------------------------------------------------------------------
# Per-device defaults
# ----------------------------------------------------------------------------------------------
CPU_BATCH_SIZE = 1         # fastest per window on a CPU (measured: docs/benchmarks.md, "Issue 17: one engine")
OTHER_BATCH_SIZE = 8       # accelerators other than CUDA (MPS, ...), not probed
PROBE_LARGEST = 64         # the largest batch the CUDA probe tries
PROBE_GAIN = 1.05          # a larger batch is taken only if it raises windows per second by more than 5 %
MAX_DEFAULT_WORKERS = 16   # post-processing processes by default on an accelerator (memory: ~1 region each)
_probed: dict = {}


def default_batch_size(maps_fn, tile: int) -> int:
    """Windows per network call when `--batch_size` is not given: `CPU_BATCH_SIZE` on the CPU; on CUDA the
    probed best (`probe_batch_size`, once per process and maps function / window size); else 8."""
    device = maps_device(maps_fn)
    if device.type == "cpu":
        return CPU_BATCH_SIZE
    if device.type != "cuda":
        return OTHER_BATCH_SIZE
    key = (id(maps_fn), str(device), int(tile))
    if key not in _probed:
        _probed[key] = probe_batch_size(maps_fn, int(tile))
    return _probed[key]


def probe_batch_size(maps_fn, tile: int, largest: int = PROBE_LARGEST, gain: float = PROBE_GAIN,
                     repeats: int = 2) -> int:
    """The largest batch (1, 2, 4, ... `largest`) that still raises the windows per second of
    `maps_fn.device_maps` by more than `gain`, timed on the device (synchronised) on random tiles; stops
    at the first batch that does not, or that runs out of device memory."""
    import torch

    device = maps_device(maps_fn)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8)] * largest
    best, best_rate, size = 1, 0.0, 1
    rates = {}
    while size <= largest:
        try:
            maps_fn.device_maps(tiles[:size])  # warm-up (kernel choice, allocator)
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                maps_fn.device_maps(tiles[:size])
            _synchronize(device)
            rate = size * repeats / max(time.perf_counter() - start, 1e-9)
        except torch.cuda.OutOfMemoryError:
            _empty_cache(device)
            break
        rates[size] = round(rate, 1)
        if rate <= best_rate * gain:
            break
        best, best_rate = size, rate
        size *= 2
    _empty_cache(device)
    log.info("batch size %d on %s (windows/s by batch: %s)", best, device, rates)
    return best


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_num_workers(device) -> int:
    """Post-processing processes when `--num_workers` is not given: 0 on the CPU (they would compete with the
    network for the cores); on an accelerator every usable core but the one that drives the device, at most
    `MAX_DEFAULT_WORKERS`, so that the CPU side keeps up with the device (docs/benchmarks.md, Issue 17)."""
    import torch

    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, utils.usable_cores() - 1))


def worker_count(options, device) -> int:
    """The post-processing processes of a run: `--num_workers` if given, else `default_num_workers(device)`. Known
    before the model is loaded, so that a command can start them first (their start then overlaps the loading)."""
    return int(default_num_workers(device) if options.num_workers is None else options.num_workers)


def network_scale(model_set) -> float:
    """Network pixels per image pixel (at the model's pixel size) the model was trained at: its input size
    divided by its training tile (`model_tile_size`), e.g. 1024 / 512 = 2. `--tile_size` only chooses the
    window; every window is resized by this factor (and padded to a multiple of 64) for the network."""
    return float(model_set.input_size) / float(model_tile_size(model_set))


def image_maps(model_set, image: np.ndarray, tile_size: int | None = None, overlap: int | None = None, *,
               mpp: float | None = None, ensemble: bool = False, batch_size: int | None = None, device=None,
               amp: bool = True, maps_fn: MapsFn | None = None, postprocess: dict | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The network part of `predict_image`: (foreground probability, HV maps | None, post-processing
    settings) of a whole image, the maps at the model's pixel size (see `labels_from_maps`)."""
    import dataset

    image = image_io.to_rgb(image)
    height, width = image.shape[:2]
    if tile_size is None:
        tile_size = model_tile_size(model_set) if model_set is not None else DEFAULT_TILE_SIZE
    if overlap is None:
        overlap = int(tile_size) // 4
    if maps_fn is None:
        maps_fn = model_maps_fn(model_set, ensemble=ensemble, device=device, amp=amp)
    work = image
    if mpp is not None:
        if not mpp > 0:
            raise UserError(f"--mpp {mpp}: must be a positive number of micrometres per pixel")
        scale = float(mpp) / (model_mpp(model_set) if model_set is not None else float(dataset.NUINSSEG_MPP))
        size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        if size != (height, width):
            work = dataset.resize_image(image, size)
    fg, hv = stitch_maps(work, int(tile_size), int(overlap), maps_fn, batch_size=batch_size, progress=progress)
    settings = dict(postprocess if postprocess is not None else (getattr(model_set, "postprocess", None) or {}))
    if hv is None and settings.get("mode", "hv") == "hv":
        settings["mode"] = "binary"
    return fg, hv, settings


def labels_from_maps(fg: np.ndarray, hv: np.ndarray | None, settings: dict,
                     shape: tuple[int, int]) -> np.ndarray:
    """The post-processing part of `predict_image`: instance labels (int32) of `image_maps`' output,
    resized (nearest neighbour) to the input image's `shape` (H, W)."""
    import dataset
    import postprocess as pp

    labels = pp.postprocess(fg, hv, pp.PostprocessConfig.from_dict(settings))
    if labels.shape != tuple(shape):
        labels = dataset.resize_labels(labels, tuple(shape))
    return np.asarray(labels).astype(np.int32, copy=False)


def predict_image(model_set, image: np.ndarray, tile_size: int | None = None,
                  overlap: int | None = None, *, mpp: float | None = None, ensemble: bool = False,
                  batch_size: int | None = None, device=None, amp: bool = True, maps_fn: MapsFn | None = None,
                  postprocess: dict | None = None, progress: bool = False) -> np.ndarray:
    """Instance label map (int32, same H x W as `image`) of an RGB image of any size.

    `model_set` comes from `nuclei_model.load_model_set`; `tile_size` (default: the model's training
    tile) and `overlap` (default: a quarter of the tile) are in pixels at the model's resolution. `mpp` is the input's pixel size in
    µm (None: same as the model's). `maps_fn` replaces the network (tests, other back-ends);
    `postprocess` overrides the model set's post-processing settings.
    """
    image = image_io.to_rgb(image)
    fg, hv, settings = image_maps(model_set, image, tile_size, overlap, mpp=mpp, ensemble=ensemble,
                                  batch_size=batch_size, device=device, amp=amp, maps_fn=maps_fn,
                                  postprocess=postprocess, progress=progress)
    return labels_from_maps(fg, hv, settings, image.shape[:2])


# ----------------------------------------------------------------------------------------------
# One run: the loaded predictor and what happened to each input
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one input: `status` "ok" | "skipped" (a slide whose outputs were already complete)
    | "failed" (with the one-line `error`). `height`/`width` are the input's (level-0) size, `mpp` its pixel
    size when known, `tissue_area_mm2` / `nuclei_per_mm2` only for slides (None otherwise: empty in
    summary.csv); `windows` and the `*_seconds` split are filled for slides (read / network /
    post-processing / writing)."""
    input: str
    name: str
    status: str
    nuclei: int = 0
    height: int = 0
    width: int = 0
    seconds: float = 0.0
    error: str = ""
    kind: str = "image"
    mpp: float | None = None
    tissue_area_mm2: float | None = None
    nuclei_per_mm2: float | None = None
    windows: int = 0
    read_seconds: float = 0.0
    network_seconds: float = 0.0
    postprocess_seconds: float = 0.0
    write_seconds: float = 0.0
    dropped_low_confidence: int = 0

    def summary_row(self) -> dict:
        """One row of summary.csv (columns `SUMMARY_COLUMNS`)."""
        row = {k: v for k, v in vars(self).items()}
        row["image"] = self.input
        return {k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS}


SUMMARY_COLUMNS = ["image", "name", "kind", "status", "nuclei", "tissue_area_mm2", "nuclei_per_mm2", "mpp",
                   "height", "width", "seconds", "windows", "read_seconds", "network_seconds",
                   "postprocess_seconds", "write_seconds", "dropped_low_confidence", "error"]


@dataclass
class Predictor:
    """The loaded model set and its maps function (`load_predictor`), plus the window the run uses
    (`tile_size`, `overlap` at the model's pixel size), the model's pixel size and the post-processing
    worker count and the windows per network call (`batch_size`: `--batch_size`, else `default_batch_size`).
    Loaded once per process; not picklable (holds the networks)."""
    model_set: object
    maps_fn: MapsFn
    device: str
    tile_size: int
    overlap: int
    model_mpp: float
    num_workers: int
    postprocess: dict
    batch_size: int = CPU_BATCH_SIZE


def load_predictor(options, maps_fn: MapsFn | None = None, model_set=None) -> Predictor:
    """Load the model set of `options` (a `predict.PredictOptions`; expensive: once per process) and build its
    maps function.
    `maps_fn` / `model_set` replace the network (tests, other back-ends: `model_set` may then be None and the
    window defaults to 512/128 at NuInsSeg's pixel size)."""
    import nuclei_model

    device = utils.select_device(options.device)
    if model_set is None and maps_fn is None:
        model_set = nuclei_model.load_model_set(Path(options.model_path), device, pretrained=options.pretrained)
    tile_size = int(options.tile_size or (model_tile_size(model_set) if model_set is not None else DEFAULT_TILE_SIZE))
    overlap = tile_size // 4 if options.overlap is None else int(options.overlap)
    if 2 * overlap > tile_size or overlap < 0:
        raise UserError(f"--overlap {overlap}: must be between 0 and half the tile size ({tile_size // 2})")
    if maps_fn is None:
        maps_fn = model_maps_fn(model_set, ensemble=options.ensemble, device=device, amp=options.amp)
    num_workers = worker_count(options, device)
    batch_size = options.batch_size
    if batch_size is None:
        batch_size = default_batch_size(maps_fn, tile_size)
    import dataset

    mpp = model_mpp(model_set) if model_set is not None else float(dataset.NUINSSEG_MPP)
    settings = dict(getattr(model_set, "postprocess", None) or {}) if model_set is not None else {}
    return Predictor(model_set, maps_fn, str(device), tile_size, overlap, mpp, int(num_workers), settings,
                     int(batch_size))


def error_message(path: Path, error: Exception) -> str:
    """The one-line report of a failed input: a UserError's own message, else path + exception."""
    return str(error) if isinstance(error, UserError) else f"{path}: {type(error).__name__}: {error}"
