"""Segment nuclei in new H&E images of any size: `python main.py predict --model_path ... --input ...`.

A trained model sees one tile of `tile_size` source pixels (NuInsSeg images: 512 x 512) resized to its
input size. Larger images are cut into overlapping tiles of exactly that size, the network's foreground
probability and horizontal/vertical (HV) maps of every tile are blended into full-size maps with a
smooth weight window, and the stitched maps are post-processed once. Because instances are only formed
after stitching, a nucleus cut by a tile border comes out as one instance, never two and never twice.

Window: along an edge shared with a neighbouring tile the weight is 0 on the outer quarter of the
overlap (where the network sees only part of a nucleus and its HV map is unreliable), then rises as a
smooth sin² ramp to 1; along an image border it is 1 up to the edge. Every pixel is covered by a
positive weight of at least one tile.

Scale: with `--mpp` (micrometres per pixel of the input) the image is resized so its pixel size matches
the model's training pixel size (the checkpoint's `mpp`, NuInsSeg's value by default); tiles and overlap
are counted in pixels of that resized image, and the label map is resized back (nearest neighbour) so
every output has the input's size.

Outputs per input image, named after its file stem (see docs/predict.md): `<stem>_labels.tif` (uint32
label map), `<stem>.geojson` (QuPath detections with measurements), `<stem>_nuclei.csv` (one row per
nucleus) and `<stem>_overlay.png` (contours on the image), plus `summary.csv` and `predict_config.json`.
With several inputs, post-processing and file writing of one image run in worker processes
(`--num_workers`) while the network segments the next image (`segment_images`).
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

import utils
from utils import UserError

log = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 512   # source pixels per tile when the checkpoint does not say (NuInsSeg image size)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# maps_fn(list of uint8 RGB tiles) -> list of (foreground probability (h, w), hv (2, h, w) or None)
MapsFn = Callable[[list], list]


# ----------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------
def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype.kind in "ui":
        top = 65535 if array.dtype.itemsize >= 2 and array.max(initial=0) > 255 else 255
        if array.dtype.itemsize > 2 and array.max(initial=0) > 65535:
            top = float(array.max())
        return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    data = np.nan_to_num(array.astype(np.float64))
    scale = 255.0 if data.size and data.max() <= 1.0 else 1.0
    return np.clip(np.round(data * scale), 0, 255).astype(np.uint8)


def to_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) or channel-first (1|3|4, H, W) array -> uint8 RGB (H, W, 3).

    Grey images are repeated to three channels; an alpha channel is dropped (RGBA -> RGB, grey+alpha ->
    grey). 16-bit and float images are scaled to 0..255.
    """
    array = np.asarray(array)
    array = np.squeeze(array) if array.ndim > 3 else array
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise UserError(f"{name}: unsupported image shape {array.shape} (expected H x W grey, RGB or RGBA)")
    channels = array.shape[2]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    elif channels == 4:
        array = array[..., :3]
    return np.ascontiguousarray(_to_uint8(array))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF file as uint8 RGB (H, W, 3); raises UserError naming the file if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                array = tif.series[0].levels[0].asarray() if tif.series else tif.asarray()
        else:
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
                array = np.asarray(img)
    except UserError:
        raise
    except Exception as e:  # any decoder error: one readable line naming the file
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return to_rgb(array, str(path))


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files and glob patterns (also `**`) -> list of paths in the given order, duplicates removed.

    A pattern that matches nothing and a path that does not exist are kept as they are, so the caller
    reports them as failed inputs instead of silently skipping them. Folders are expanded to the image
    files they contain.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            out.append(path)

    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                add(Path(pattern))
            for f in files:
                add(f)
        elif Path(pattern).is_dir():
            files = sorted(p for p in Path(pattern).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                add(Path(pattern))
            for f in files:
                add(f)
        else:
            add(Path(pattern))
    return out


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A unique output name per input: the file stem, or `<parent folder>_<stem>` for stems that occur
    more than once (case-insensitively), with `_2`, `_3`, ... added if that still collides."""
    stems = [p.stem for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    names = []
    for p, s in zip(paths, stems):
        if counts[s.lower()] > 1:
            parent = p.resolve().parent.name or "root"
            s = f"{parent}_{s}"
        names.append(s)
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, k = name, 2
        while candidate.lower() in used:
            candidate, k = f"{name}_{k}", k + 1
        used.add(candidate.lower())
        unique.append(candidate)
    return unique


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


def stitch_maps(image: np.ndarray, tile_size: int, overlap: int, maps_fn: MapsFn, batch_size: int = 8,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Foreground probability (H, W) and HV maps (2, H, W) (None for a binary model) of a whole image
    from overlapping tiles blended with `tile_weights`.

    `maps_fn` receives a list of at most `batch_size` uint8 RGB tiles of `tile_size` x `tile_size`
    and returns one (foreground probability, hv | None) pair per tile at the tile's size. An image
    smaller than a tile is padded (mirrored) to a full tile so the network always sees the same scale.
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

    fg_sum = np.zeros((full_h, full_w), dtype=np.float32)
    hv_sum: np.ndarray | None = None
    w_sum = np.zeros((full_h, full_w), dtype=np.float32)
    has_hv: bool | None = None
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False, disable=not progress)
    for first in range(0, len(boxes), max(batch_size, 1)):
        batch = boxes[first:first + max(batch_size, 1)]
        tiles = [np.ascontiguousarray(padded[y:y + tile_size, x:x + tile_size]) for y, x in batch]
        results = maps_fn(tiles)
        if len(results) != len(tiles):
            raise RuntimeError(f"maps function returned {len(results)} results for {len(tiles)} tiles")
        for (y, x), (fg, hv) in zip(batch, results):
            fg = np.asarray(fg, dtype=np.float32)
            if fg.shape != (tile_size, tile_size):
                raise RuntimeError(f"maps function returned a {fg.shape} map for a {tile_size}-pixel tile")
            if has_hv is None:
                has_hv = hv is not None
                if has_hv:
                    hv_sum = np.zeros((2, full_h, full_w), dtype=np.float32)
            w = np.outer(tile_weights(tile_size, y, tile_size, overlap, full_h),
                         tile_weights(tile_size, x, tile_size, overlap, full_w))
            fg_sum[y:y + tile_size, x:x + tile_size] += w * fg
            w_sum[y:y + tile_size, x:x + tile_size] += w
            if hv_sum is not None:
                hv_sum[:, y:y + tile_size, x:x + tile_size] += w[None] * np.asarray(hv, dtype=np.float32)
        bar.update(len(batch))
    bar.close()
    w_sum = np.maximum(w_sum, 1e-12)
    fg_map = (fg_sum / w_sum)[:height, :width]
    hv_map = None if hv_sum is None else (hv_sum / w_sum[None])[:, :height, :width]
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


def model_maps_fn(model_set, ensemble: bool = False, device=None, amp: bool = True) -> MapsFn:
    """A `maps_fn` for `stitch_maps` running the model set's network(s) on batches of tiles."""
    import nuclei_model

    models = [nuclei_model.prepare_for_inference(m) for m in select_models(model_set, ensemble)]
    input_size = int(model_set.input_size)
    device = utils.select_device(None) if device is None else device

    def maps_fn(tiles: list) -> list:
        return nuclei_model.predict_maps_batch(models, tiles, input_size, device, amp=amp)

    return maps_fn


def image_maps(model_set, image: np.ndarray, tile_size: int | None = None, overlap: int | None = None, *,
               mpp: float | None = None, ensemble: bool = False, batch_size: int = 8, device=None,
               amp: bool = True, maps_fn: MapsFn | None = None, postprocess: dict | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The network part of `predict_image`: (foreground probability, HV maps | None, post-processing
    settings) of a whole image, the maps at the model's pixel size (see `labels_from_maps`)."""
    import dataset

    image = to_rgb(image)
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
                  batch_size: int = 8, device=None, amp: bool = True, maps_fn: MapsFn | None = None,
                  postprocess: dict | None = None, progress: bool = False) -> np.ndarray:
    """Instance label map (int32, same H x W as `image`) of an RGB image of any size.

    `model_set` comes from `nuclei_model.load_model_set`; `tile_size` (default: the model's training
    tile) and `overlap` (default: a quarter of the tile) are in pixels at the model's resolution. `mpp` is the input's pixel size in
    µm (None: same as the model's). `maps_fn` replaces the network (tests, other back-ends);
    `postprocess` overrides the model set's post-processing settings.
    """
    image = to_rgb(image)
    fg, hv, settings = image_maps(model_set, image, tile_size, overlap, mpp=mpp, ensemble=ensemble,
                                  batch_size=batch_size, device=device, amp=amp, maps_fn=maps_fn,
                                  postprocess=postprocess, progress=progress)
    return labels_from_maps(fg, hv, settings, image.shape[:2])


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    input: str
    name: str
    status: str
    nuclei: int = 0
    height: int = 0
    width: int = 0
    seconds: float = 0.0
    error: str = ""


def write_outputs(output_dir: Path, name: str, image: np.ndarray, labels: np.ndarray,
                  mpp: float | None = None, overlay: bool = True) -> list[Path]:
    """The per-image result files (see the module docstring); returns their paths."""
    import export

    rows = export.measure_nuclei(labels, image, mpp=mpp)
    paths = [export.save_label_tiff(output_dir / f"{name}_labels.tif", labels.astype(np.uint32)),
             export.save_geojson(output_dir / f"{name}.geojson", labels,
                                 properties={int(r["id"]): r for r in rows}),
             export.save_measurements_csv(output_dir / f"{name}_nuclei.csv", rows,
                                          columns=export.measurement_columns(mpp))]
    if overlay:
        import visualize

        paths.append(visualize.save_png(output_dir / f"{name}_overlay.png",
                                        visualize.draw_contours(image, labels, (0, 255, 0))))
    return paths


def error_message(path: Path, error: Exception) -> str:
    """The one-line report of a failed input: a UserError's own message, else path + exception."""
    return str(error) if isinstance(error, UserError) else f"{path}: {type(error).__name__}: {error}"


def finish_image(path: Path, output_dir: Path, name: str, image: np.ndarray, fg: np.ndarray,
                 hv: np.ndarray | None, settings: dict, mpp: float | None = None,
                 overlay: bool = True) -> tuple[int, float, str]:
    """Post-processing and result files of one image, from `image_maps`' output; runs in a worker process
    while the model works on the next image. Returns (nuclei, seconds, error message or "")."""
    start = time.time()
    try:
        labels = labels_from_maps(fg, hv, settings, image.shape[:2])
        write_outputs(output_dir, name, image, labels, mpp=mpp, overlay=overlay)
    except Exception as e:  # reported by the caller like a failure in the main process
        log.debug("failed on %s", path, exc_info=True)
        return 0, time.time() - start, error_message(path, e)
    return int(len(np.unique(labels[labels > 0]))), time.time() - start, ""


def segment_images(model_set, inputs: Sequence[Path], names: Sequence[str], output_dir: Path, maps_fn: MapsFn,
                   *, tile_size: int, overlap: int | None = None, mpp: float | None = None,
                   batch_size: int = 8, overlay: bool = True, num_workers: int = 0) -> list[Outcome]:
    """Segment every input and write its result files (`write_outputs`); one Outcome per input, in order.

    An input that fails (unreadable file, any error) is reported on stderr and recorded as failed; the
    others go on. The model segments image i+1 while `num_workers` spawned processes post-process image i
    and write its files (a single image, or `num_workers=0`, runs everything in this process); at most
    `num_workers` images wait for a worker. `Outcome.seconds` is the model time plus the post-processing
    and writing time of that image.
    """
    outcomes: list[Outcome | None] = [None] * len(inputs)
    workers = num_workers if len(inputs) > 1 else 0
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 0 else None)
    pending: deque[tuple[int, float, tuple, Future]] = deque()

    def record(i: int, model_seconds: float, shape: tuple, result: tuple[int, float, str]) -> None:
        nuclei, seconds, error = result
        path, name = inputs[i], names[i]
        if error:
            tqdm.write(f"error: {error} (skipped)", file=sys.stderr)
            outcomes[i] = Outcome(str(path), name, "failed", error=error)
            return
        outcomes[i] = Outcome(str(path), name, "ok", nuclei, shape[0], shape[1],
                              round(model_seconds + seconds, 3))
        log.info("%s: %d nuclei -> %s", path, nuclei, output_dir / f"{name}_labels.tif")

    def collect_oldest() -> None:
        i, model_seconds, shape, future = pending.popleft()
        try:
            result = future.result()
        except Exception as e:  # the worker process died (e.g. out of memory)
            result = (0, 0.0, error_message(inputs[i], e))
        record(i, model_seconds, shape, result)

    try:
        for i, (path, name) in enumerate(tqdm(list(zip(inputs, names)), desc="images", unit="image")):
            start = time.time()
            try:
                image = read_image(path)
                fg, hv, settings = image_maps(model_set, image, tile_size, overlap, mpp=mpp,
                                              batch_size=batch_size, maps_fn=maps_fn, progress=True)
                job = (path, output_dir, name, image, fg, hv, settings, mpp, overlay)
                model_seconds = time.time() - start
                if pool is not None:
                    pending.append((i, model_seconds, image.shape, pool.submit(finish_image, *job)))
            except Exception as e:  # one bad input must not stop the others
                log.debug("failed on %s", path, exc_info=True)
                record(i, 0.0, (0, 0), (0, 0.0, error_message(path, e)))
                continue
            if pool is None:
                record(i, model_seconds, image.shape, finish_image(*job))
            while len(pending) > workers:
                collect_oldest()
        while pending:
            collect_oldest()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True,
                        help="trained model: a checkpoint (.pth) or a cross-validation output folder / its best_model.pth")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help="images (PNG/JPEG/TIFF), folders or glob patterns such as 'slides/*.tif'")
    parser.add_argument("--output_dir", default="predictions", help="folder for the result files")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="tile size in pixels at the model's resolution (default: the model's training tile, 512)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="pixels shared by neighbouring tiles, at most half the tile size "
                             "(default: a quarter of the tile size, 128 for 512 tiles)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="micrometres per pixel of the inputs; they are rescaled to the model's pixel size "
                             "(default: assume the model's pixel size)")
    parser.add_argument("--ensemble", action="store_true",
                        help="average the maps of all fold models of a cross-validation model "
                             "(default: the fold model with the best validation score)")
    parser.add_argument("--batch_size", type=int, default=8, help="tiles per network call")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--no_amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--pretrained", default=None,
                        help="MobileSAM weights, if the checkpoint stores only the LoRA/head weights")
    parser.add_argument("--no_overlay", action="store_true", help="do not write <stem>_overlay.png")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="processes that post-process and write the results of one image while the model "
                             "segments the next (0 = all in this process; default: min(4, CPU cores) when the "
                             "model runs on a GPU, 0 on CPU, where workers would compete with the network)")
    prompt = parser.add_argument_group("prompt mode (prompts.py; --model_path may then be the official mobile_sam.pt "
                                       "or a --head sam model)")
    prompt.add_argument("--points", default=None, metavar="CSV",
                        help="one mask per point: CSV rows 'x, y' in image pixels (one image as --input)")
    prompt.add_argument("--boxes", default=None, metavar="CSV",
                        help="one mask per box: CSV rows 'x0, y0, x1, y1' in image pixels")
    prompt.add_argument("--merge_into", default=None, metavar="LABELS.tif",
                        help="add the prompt masks to this label map (new ids; they win where they overlap it)")


def run(args: argparse.Namespace) -> int:
    import nuclei_model

    if getattr(args, "points", None) or getattr(args, "boxes", None) or getattr(args, "merge_into", None):
        import prompts

        return prompts.run(args)

    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: must be 0 or more")
    if args.tile_size is not None and args.tile_size < 16:
        raise UserError(f"--tile_size {args.tile_size}: must be at least 16 pixels")
    if args.mpp is not None and not args.mpp > 0:
        raise UserError(f"--mpp {args.mpp}: must be a positive number of micrometres per pixel")
    model_path = Path(args.model_path)
    if not model_path.exists():
        raise UserError(f"--model_path {model_path}: not found")
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        raise UserError(f"--pretrained {args.pretrained}: file not found")
    inputs = expand_inputs(args.input)
    names = output_stems(inputs)
    output_dir = utils.make_output_dir(args.output_dir)

    device = utils.select_device(args.device)
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    model_set = nuclei_model.load_model_set(model_path, device, pretrained=args.pretrained)
    tile_size = args.tile_size or model_tile_size(model_set)
    overlap = tile_size // 4 if args.overlap is None else args.overlap
    if 2 * overlap > tile_size or overlap < 0:
        raise UserError(f"--overlap {overlap}: must be between 0 and half the tile size ({tile_size // 2})")
    maps_fn = model_maps_fn(model_set, ensemble=args.ensemble, device=device, amp=not args.no_amp)
    utils.write_json(output_dir / "predict_config.json", {
        "model_path": str(model_path), "inputs": [str(p) for p in inputs], "tile_size": tile_size,
        "overlap": overlap, "mpp": args.mpp, "model_mpp": model_mpp(model_set),
        "ensemble": bool(args.ensemble), "batch_size": args.batch_size, "device": str(device),
        "amp": not args.no_amp, "postprocess": getattr(model_set, "postprocess", None),
        "model_config": getattr(model_set, "config", None), "environment": utils.environment_info(),
    })

    outcomes = segment_images(model_set, inputs, names, output_dir, maps_fn, tile_size=tile_size,
                              overlap=overlap, mpp=args.mpp, batch_size=args.batch_size,
                              overlay=not args.no_overlay, num_workers=num_workers)
    utils.write_csv(output_dir / "summary.csv", [vars(o) for o in outcomes],
                    columns=["input", "name", "status", "nuclei", "height", "width", "seconds", "error"])
    failed = [o for o in outcomes if o.status != "ok"]
    done = len(outcomes) - len(failed)
    print(f"predictions for {done} of {len(outcomes)} image(s) written to {output_dir.resolve()} "
          f"(summary.csv lists every input)")
    if failed:
        print(f"error: {len(failed)} input(s) failed: " + ", ".join(o.input for o in failed), file=sys.stderr)
        return 1
    return 0
