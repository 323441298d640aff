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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

import image_io
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
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF file as uint8 RGB (H, W, 3): `image_io.read_image` (the reader train and evaluate
    use too); raises UserError naming the file if it cannot or the image is not 8-bit."""
    return image_io.read_image(path)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files and glob patterns (also `**`) -> list of paths in the given order, duplicates removed.

    A pattern that matches nothing and a path that does not exist are kept as they are, so the caller
    reports them as failed inputs instead of silently skipping them. Folders are expanded to the image
    and slide files they contain.
    """
    import slides

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
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + slides.SLIDE_SUFFIXES)
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
    scale = network_scale(model_set)
    device = utils.select_device(None) if device is None else device

    def maps_fn(tiles: list) -> list:
        # the magnification is the model's (input size / training tile), whatever the window size
        return nuclei_model.predict_maps_scaled(models, tiles, scale, device, amp=amp)

    return maps_fn


def network_scale(model_set) -> float:
    """Network pixels per image pixel (at the model's pixel size) the model was trained at: its input size
    divided by its training tile (`model_tile_size`), e.g. 1024 / 512 = 2. `--tile_size` only chooses the
    window; every window is resized by this factor (and padded to a multiple of 64) for the network."""
    return float(model_set.input_size) / float(model_tile_size(model_set))


def image_maps(model_set, image: np.ndarray, tile_size: int | None = None, overlap: int | None = None, *,
               mpp: float | None = None, ensemble: bool = False, batch_size: int = 8, device=None,
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
                  batch_size: int = 8, device=None, amp: bool = True, maps_fn: MapsFn | None = None,
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
# Command
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

    def summary_row(self) -> dict:
        """One row of summary.csv (columns `SUMMARY_COLUMNS`)."""
        row = {k: v for k, v in vars(self).items()}
        row["image"] = self.input
        return {k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS}


SUMMARY_COLUMNS = ["image", "name", "kind", "status", "nuclei", "tissue_area_mm2", "nuclei_per_mm2", "mpp",
                   "height", "width", "seconds", "windows", "read_seconds", "network_seconds",
                   "postprocess_seconds", "write_seconds", "error"]


@dataclass
class PredictOptions:
    """Every option of one `predict` run as plain JSON-able values (`options_from_args`); what
    `load_predictor` and `predict_one` need, in this process or in a Dask worker."""
    model_path: str
    pretrained: str | None = None
    device: str | None = None
    ensemble: bool = False
    amp: bool = True
    tile_size: int | None = None
    overlap: int | None = None
    mpp: float | None = None
    batch_size: int = 8
    tissue_mask: str = "auto"
    label_image: bool = False
    geojson_gzip: bool = False
    overlay: bool = True
    overwrite: bool = False
    num_workers: int | None = None
    region_size: int = 2048
    read_threads: int = 2

    def to_dict(self) -> dict:
        return dict(vars(self))


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """`PredictOptions` of parsed `predict` arguments, checked (UserError naming the option) before any work."""
    amp = getattr(args, "amp", True)
    options = PredictOptions(
        model_path=str(args.model_path), pretrained=args.pretrained, device=args.device,
        ensemble=bool(args.ensemble), amp=bool(amp), tile_size=args.tile_size, overlap=args.overlap,
        mpp=args.mpp, batch_size=int(args.batch_size), tissue_mask=str(getattr(args, "tissue_mask", "auto")),
        label_image=bool(getattr(args, "label_image", False)), geojson_gzip=bool(getattr(args, "geojson_gzip", False)),
        overlay=not getattr(args, "no_overlay", False), overwrite=bool(getattr(args, "overwrite", False)),
        num_workers=args.num_workers, region_size=int(getattr(args, "region_size", 2048)),
        read_threads=int(getattr(args, "read_threads", 2)))
    check_options(options)
    return options


def check_options(options: PredictOptions) -> None:
    """UserError for an option that can never work (before the model is loaded)."""
    if options.batch_size < 1:
        raise UserError(f"--batch_size {options.batch_size}: must be at least 1")
    if options.num_workers is not None and options.num_workers < 0:
        raise UserError(f"--num_workers {options.num_workers}: must be 0 or more")
    if options.tile_size is not None and options.tile_size < 16:
        raise UserError(f"--tile_size {options.tile_size}: must be at least 16 pixels")
    if options.overlap is not None and options.tile_size is not None and (
            options.overlap < 0 or 2 * options.overlap > options.tile_size):
        raise UserError(f"--overlap {options.overlap}: must be between 0 and half the tile size "
                        f"({options.tile_size // 2})")
    if options.mpp is not None and not options.mpp > 0:
        raise UserError(f"--mpp {options.mpp}: must be a positive number of micrometres per pixel")
    if options.mpp is not None and not math.isfinite(options.mpp):
        raise UserError(f"--mpp {options.mpp}: must be a finite number of micrometres per pixel")
    if options.mpp is not None:
        import dataset

        dataset.warn_if_implausible_mpp(options.mpp, "--mpp")
    if options.region_size < 256:
        raise UserError(f"--region_size {options.region_size}: must be at least 256 pixels")
    if options.read_threads < 1:
        raise UserError(f"--read_threads {options.read_threads}: must be at least 1")
    if options.tissue_mask not in ("auto", "none") and not Path(options.tissue_mask).is_file():
        raise UserError(f"--tissue_mask {options.tissue_mask}: file not found (or use auto / none)")
    if not Path(options.model_path).exists():
        raise UserError(f"--model_path {options.model_path}: not found")
    if options.pretrained is not None and not Path(options.pretrained).is_file():
        raise UserError(f"--pretrained {options.pretrained}: file not found")


@dataclass
class Predictor:
    """The loaded model set and its maps function (`load_predictor`), plus the window the run uses
    (`tile_size`, `overlap` at the model's pixel size), the model's pixel size and the post-processing
    worker count. Loaded once per process; not picklable (holds the networks)."""
    model_set: object
    maps_fn: MapsFn
    device: str
    tile_size: int
    overlap: int
    model_mpp: float
    num_workers: int
    postprocess: dict


def load_predictor(options: PredictOptions, maps_fn: MapsFn | None = None, model_set=None) -> Predictor:
    """Load the model set of `options` (expensive: once per process) and build its maps function.
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
    num_workers = options.num_workers
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(4, utils.usable_cores())
    import dataset

    mpp = model_mpp(model_set) if model_set is not None else float(dataset.NUINSSEG_MPP)
    settings = dict(getattr(model_set, "postprocess", None) or {}) if model_set is not None else {}
    return Predictor(model_set, maps_fn, str(device), tile_size, overlap, mpp, int(num_workers), settings)


# A slide whose target grid (level 0 resized by --mpp to the model's pixel size) holds more network windows
# than this is refused: the windows are planned and tested for tissue one by one and the outputs grow with
# them. 2^22 windows is about 60 times the grid of a 100,000 x 100,000-pixel slide at the model's pixel size.
MAX_SLIDE_WINDOWS = 2 ** 22


def _window_count(length: int, tile_size: int, overlap: int) -> int:
    """len(tile_starts(length, tile_size, overlap)) without building the list."""
    if length <= tile_size:
        return 1
    return 1 + -(-(length - tile_size) // (tile_size - overlap))


def check_input_scale(predictor: Predictor, path: Path, options: PredictOptions) -> None:
    """With --mpp, before an input is read: the size it is resized to, from its header (a plain image:
    `image_io.image_header`; a slide: level 0 of `slides.open_slide`). UserError naming --mpp and the sizes when
    a plain image would be resized beyond memory (`dataset.check_resize`) or a slide's grid at the model's
    pixel size would hold more than MAX_SLIDE_WINDOWS windows; a warning when the resize shrinks a plain image
    below one window (nuclei then become a few pixels wide: 0 nuclei is the likely result). Without --mpp
    nothing is resized and nothing is checked here."""
    if options.mpp is None:
        return
    import dataset
    import slides

    path = Path(path)
    if not path.is_file():
        return  # read_image / the slide reader report it
    scale = float(options.mpp) / float(predictor.model_mpp)
    option = f"--mpp {options.mpp:g}"
    tile, overlap = int(predictor.tile_size), int(predictor.overlap)
    if slides.is_slide_file(path):
        with slides.open_slide(path, mpp=options.mpp) as slide:
            width0, height0 = slide.dimensions
        height, width = dataset.scaled_shape((height0, width0), scale)
        windows = _window_count(height, tile, overlap) * _window_count(width, tile, overlap)
        if windows > MAX_SLIDE_WINDOWS:
            raise UserError(f"{path}: {option} scales this {width0} x {height0}-pixel slide by {scale:.4g} to the "
                            f"model's pixel size, {width:,} x {height:,} pixels = {windows:,} windows of {tile} "
                            f"pixels, more than the limit of {MAX_SLIDE_WINDOWS:,}; check --mpp")
        return
    info = image_io.image_header(path)
    height, width = dataset.check_resize(path, (info.height, info.width), scale, option)
    if height < tile and width < tile and (height, width) != (info.height, info.width) and scale < 1:
        log.warning("%s: %s shrinks it from %d x %d to %d x %d pixels, smaller than one window (%d pixels at the "
                    "model's %g um/px): nuclei shrink with it and few or none may be found; check --mpp", path,
                    option, info.width, info.height, width, height, tile, predictor.model_mpp)


def predict_one(predictor: Predictor, path: Path, name: str, output_dir: Path, options: PredictOptions) -> Outcome:
    """Segment one input (a plain image in memory, or a slide region by region through `wsi`) and write its
    outputs named `name` in `output_dir`. A failure of this input is returned as
    `Outcome(status="failed", error=<one line>)`, never raised (KeyboardInterrupt is)."""
    import slides

    path = Path(path)
    start = time.time()
    kind = "image"
    try:
        if path.is_file() and slides.is_slide_file(path):
            import wsi

            kind = "slide"
            check_input_scale(predictor, path, options)
            return wsi.predict_slide(predictor, path, name, Path(output_dir), options)
        check_input_scale(predictor, path, options)
        image = read_image(path)
        fg, hv, settings = image_maps(predictor.model_set, image, predictor.tile_size, predictor.overlap,
                                      mpp=options.mpp, batch_size=options.batch_size, maps_fn=predictor.maps_fn,
                                      postprocess=predictor.postprocess or None, progress=True)
        nuclei, _, error = finish_image(path, Path(output_dir), name, image, fg, hv, settings, mpp=options.mpp,
                                        overlay=options.overlay)
    except Exception as e:  # one bad input must not stop the others
        log.debug("failed on %s", path, exc_info=True)
        nuclei, error = 0, error_message(path, e)
        image = None
    if error:
        return Outcome(str(path), name, "failed", error=error, seconds=round(time.time() - start, 3), kind=kind)
    return Outcome(str(path), name, "ok", nuclei, image.shape[0], image.shape[1], round(time.time() - start, 3),
                   mpp=options.mpp)


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


def segment_images(predictor: Predictor, inputs: Sequence[Path], names: Sequence[str], output_dir: Path,
                   options: PredictOptions) -> list[Outcome]:
    """The in-process engine of `predict`: every input in order, one Outcome each; a failed input is
    reported on stderr in one line and the others go on.

    Slides go through `predict_one` (`wsi` has its own read-ahead threads and post-processing workers). For
    plain images with `predictor.num_workers` > 0 (the default on a GPU) the network segments image i+1 while
    spawned worker processes post-process image i and write its files (`finish_image`); at most
    `num_workers` images wait for a worker. With 0 workers, or a single input, everything runs here through
    `predict_one`. `Outcome.seconds` is the model time plus the post-processing and writing time of the input.
    """
    import slides

    output_dir = Path(output_dir)
    outcomes: list[Outcome | None] = [None] * len(inputs)
    workers = predictor.num_workers if len(inputs) > 1 else 0
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 0 else None)
    pending: deque[tuple[int, float, tuple, Future]] = deque()

    def record(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if outcome.status == "failed":
            tqdm.write(f"error: {outcome.error} (skipped)", file=sys.stderr)

    def collect_oldest() -> None:
        i, model_seconds, shape, future = pending.popleft()
        try:
            nuclei, seconds, error = future.result()
        except Exception as e:  # the worker process died (e.g. out of memory)
            nuclei, seconds, error = 0, 0.0, error_message(inputs[i], e)
        path, name = inputs[i], names[i]
        record(i, Outcome(str(path), name, "failed", error=error) if error else
               Outcome(str(path), name, "ok", nuclei, shape[0], shape[1], round(model_seconds + seconds, 3),
                       mpp=options.mpp))

    try:
        for i, (path, name) in enumerate(tqdm(list(zip(inputs, names)), desc="inputs", unit="input")):
            path = Path(path)
            if pool is None or not path.is_file() or slides.is_slide_file(path):
                record(i, predict_one(predictor, path, name, output_dir, options))
                continue
            start = time.time()
            try:
                check_input_scale(predictor, path, options)
                image = read_image(path)
                fg, hv, settings = image_maps(predictor.model_set, image, predictor.tile_size, predictor.overlap,
                                              mpp=options.mpp, batch_size=options.batch_size,
                                              maps_fn=predictor.maps_fn, postprocess=predictor.postprocess or None,
                                              progress=True)
            except Exception as e:  # one bad input must not stop the others
                log.debug("failed on %s", path, exc_info=True)
                record(i, Outcome(str(path), name, "failed", error=error_message(path, e)))
                continue
            job = (path, output_dir, name, image, fg, hv, settings, options.mpp, options.overlay)
            pending.append((i, time.time() - start, image.shape, pool.submit(finish_image, *job)))
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
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision on CUDA (the same flag as train's)")
    parser.add_argument("--pretrained", default=None,
                        help="MobileSAM weights, if the checkpoint stores only the LoRA/head weights")
    parser.add_argument("--no_overlay", action="store_true", help="do not write <stem>_overlay.png")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="processes that post-process and write the results of one image while the model "
                             "segments the next (0 = all in this process; default: min(4, CPU cores) when the "
                             "model runs on a GPU, 0 on CPU, where workers would compete with the network); "
                             "for slides: processes that post-process finished regions")
    slide = parser.add_argument_group("whole-slide images (SVS, NDPI, MRXS, SCN, tiled TIFF / OME-TIFF, ...)")
    slide.add_argument("--tissue_mask", default="auto", metavar="auto|none|FILE",
                       help="which windows run: auto = detected on a low-resolution level; none = everywhere; "
                            "FILE = a binary image (any size, scaled to the slide) or a QuPath GeoJSON of annotations")
    slide.add_argument("--label_image", action="store_true",
                       help="also write <stem>_labels.tif for slides (uint32 pyramidal OME-TIFF, written tile by tile)")
    slide.add_argument("--geojson_gzip", action="store_true",
                       help="for slides, write <stem>.geojson.gz instead of <stem>.geojson")
    slide.add_argument("--overwrite", action="store_true",
                       help="start slides again (default: skip complete slides, continue unfinished ones)")
    slide.add_argument("--region_size", type=int, default=2048,
                       help="side of the square regions a slide is processed in, pixels at the model's pixel "
                            "size (memory grows with its square)")
    slide.add_argument("--read_threads", type=int, default=2,
                       help="threads reading regions ahead of the network")
    many = parser.add_argument_group("many inputs on many GPUs / machines (Dask; see docs/predict.md)")
    many.add_argument("--workers", type=int, nargs="?", const=0, default=None, metavar="N",
                      help="run the inputs on a local Dask cluster of N worker processes (no N: one per visible "
                           "GPU, each pinned to its GPU; on a CPU machine one per 4 cores); default: in this process")
    many.add_argument("--scheduler", default=None, metavar="ADDRESS",
                      help="run the inputs on an existing Dask cluster: its scheduler's address (tcp://host:8786) "
                           "or scheduler file (JSON)")

    prompt = parser.add_argument_group("prompt mode (prompts.py; --model_path may then be the official mobile_sam.pt "
                                       "or a --head sam model)")
    prompt.add_argument("--points", default=None, metavar="CSV",
                        help="one mask per point: CSV rows 'x, y' in image pixels (one image as --input)")
    prompt.add_argument("--boxes", default=None, metavar="CSV",
                        help="one mask per box: CSV rows 'x0, y0, x1, y1' in image pixels")
    prompt.add_argument("--merge_into", default=None, metavar="LABELS.tif",
                        help="add the prompt masks to this label map (new ids; they win where they overlap it)")

def _mask_probe_size(path: Path) -> tuple[int, int]:
    """(width, height) of a mask image from its header, or (1024, 1024) for anything else (GeoJSON)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # not an image PIL reads: a TIFF tifffile reads, or GeoJSON / the wrong kind
        pass
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
            return int(shape[1]), int(shape[0])
    except Exception:
        return 1024, 1024


def run(args: argparse.Namespace) -> int:
    if getattr(args, "points", None) or getattr(args, "boxes", None) or getattr(args, "merge_into", None):
        import prompts

        return prompts.run(args)
    use_dask = args.workers is not None or args.scheduler is not None
    if args.workers is not None and (args.scheduler is not None or args.workers < 0):
        raise UserError(f"--workers {args.workers}: must be 1 or more (no number: one per GPU), and not given "
                        f"with --scheduler")
    options = options_from_args(args)
    if options.tissue_mask not in ("auto", "none"):
        import tissue

        # a mask file of the wrong kind fails here, in one line, before any work (probed at its own size, so
        # only its kind is checked; whether it fits a slide is checked per slide)
        tissue.read_tissue_mask(options.tissue_mask, _mask_probe_size(Path(options.tissue_mask)))
    inputs = expand_inputs(args.input)
    if not any(p.is_file() for p in inputs):  # nothing to do: a usage error, before the model is loaded
        raise UserError(f"--input {' '.join(args.input)}: no image file found (no file exists and no pattern "
                        f"or folder matches one)")
    names = output_stems(inputs)
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UserError(f"--output_dir {args.output_dir}: exists and is not a folder")
    # with Dask the model runs in the workers: here it is only checked, on the CPU
    predictor = load_predictor(replace(options, device="cpu") if use_dask else options)
    if not use_dask:
        utils.configure_threads(getattr(args, "threads", None), workers=predictor.num_workers)
    model_set = predictor.model_set
    output_dir = utils.make_output_dir(args.output_dir)  # only once every option is known to be good
    utils.write_json(output_dir / "predict_config.json", {
        "model_path": options.model_path, "inputs": [str(p) for p in inputs], "tile_size": predictor.tile_size,
        "overlap": predictor.overlap, "mpp": options.mpp, "model_mpp": predictor.model_mpp,
        "ensemble": options.ensemble, "batch_size": options.batch_size,
        "device": predictor.device if not use_dask else options.device or "auto (in each Dask worker)",
        "dask": {"workers": args.workers, "scheduler": args.scheduler} if use_dask else None,
        "amp": options.amp, "options": options.to_dict(), "postprocess": getattr(model_set, "postprocess", None),
        "model_config": getattr(model_set, "config", None), "environment": utils.environment_info(),
    })

    if use_dask:
        import dask_predict

        outcomes = dask_predict.run_inputs(inputs, names, output_dir, options, workers=args.workers,
                                           scheduler=args.scheduler, torch_threads=getattr(args, "threads", None))
    else:
        outcomes = segment_images(predictor, inputs, names, output_dir, options)
    utils.write_csv(output_dir / "summary.csv", [o.summary_row() for o in outcomes], columns=SUMMARY_COLUMNS)
    failed = [o for o in outcomes if o.status == "failed"]
    done = len(outcomes) - len(failed)
    print(f"predictions for {done} of {len(outcomes)} input(s) written to {output_dir.resolve()} "
          f"(summary.csv lists every input" + (f"; {len(failed)} failed, each reported above)" if failed else ")"))
    return 1 if failed else 0  # exit status 1: the batch finished, some inputs failed
