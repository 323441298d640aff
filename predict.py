"""Segment nuclei in new H&E images of any size: `python main.py predict --model_path ... --input ...`.

A trained model sees one tile of `tile_size` source pixels (NuInsSeg images: 512 x 512) resized to its
input size. Larger images are cut into overlapping tiles of exactly that size, the network's foreground
probability and horizontal/vertical (HV) maps of every tile are blended into full-size maps with a
smooth weight window, and the stitched maps are post-processed once. Because instances are only formed
after stitching, a nucleus cut by a tile border comes out as one instance, never two and never twice.

The window grid, the blend weights, batching and the device are the inference engine's (`inference.py`:
`image_maps`, `stitch_maps`, `load_predictor`); this module is the command on top of it: arguments, inputs,
dispatch of each input (`predict_one`: a plain image here, a slide through `wsi`, many inputs through
`dask_predict`, prompts through `prompts`) and the summary.

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
import os
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

import image_io
import utils
from inference import (SUMMARY_COLUMNS, Outcome, Predictor, error_message, image_maps, labels_from_maps,
                       load_predictor)
from utils import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


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
# Command
# ----------------------------------------------------------------------------------------------

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
    batch_size: int | None = None
    tissue_mask: str = "auto"
    label_image: bool = False
    geojson_gzip: bool = False
    overlay: bool = True
    overwrite: bool = False
    num_workers: int | None = None
    region_size: int = 2048
    read_threads: int = 2
    min_confidence: float = 0.0

    def to_dict(self) -> dict:
        return dict(vars(self))


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """`PredictOptions` of parsed `predict` arguments, checked (UserError naming the option) before any work."""
    amp = getattr(args, "amp", True)
    options = PredictOptions(
        model_path=str(args.model_path), pretrained=args.pretrained, device=args.device,
        ensemble=bool(args.ensemble), amp=bool(amp), tile_size=args.tile_size, overlap=args.overlap,
        mpp=args.mpp, batch_size=args.batch_size, tissue_mask=str(getattr(args, "tissue_mask", "auto")),
        label_image=bool(getattr(args, "label_image", False)), geojson_gzip=bool(getattr(args, "geojson_gzip", False)),
        overlay=not getattr(args, "no_overlay", False), overwrite=bool(getattr(args, "overwrite", False)),
        num_workers=args.num_workers, region_size=int(getattr(args, "region_size", 2048)),
        read_threads=int(getattr(args, "read_threads", 2)),
        min_confidence=float(getattr(args, "min_confidence", 0.0) or 0.0))
    check_options(options)
    return options


def check_options(options: PredictOptions) -> None:
    """UserError for an option that can never work (before the model is loaded)."""
    if options.batch_size is not None and options.batch_size < 1:
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
    if not 0.0 <= float(options.min_confidence) <= 1.0:  # also refuses NaN
        raise UserError(f"--min_confidence {options.min_confidence}: must lie in [0, 1] (0 keeps every nucleus)")
    if options.tissue_mask not in ("auto", "none") and not Path(options.tissue_mask).is_file():
        raise UserError(f"--tissue_mask {options.tissue_mask}: file not found (or use auto / none)")
    if not Path(options.model_path).exists():
        raise UserError(f"--model_path {options.model_path}: not found")
    if options.pretrained is not None:
        utils.check_input_file(options.pretrained, "--pretrained")
    # upper bounds of the values that set the memory a run takes
    utils.check_at_most("--tile_size", options.tile_size, utils.MAX_TILE_SIZE,
                        "pixels of one window, which is resized to the network input")
    utils.check_at_most("--region_size", options.region_size, utils.MAX_REGION_SIZE,
                        "pixels of one slide region held in memory with its maps and labels")
    utils.check_at_most("--batch_size", options.batch_size, utils.MAX_BATCH_SIZE, "tiles per network call")
    utils.check_at_most("--num_workers", options.num_workers, utils.MAX_WORKERS, "worker processes")
    utils.check_at_most("--read_threads", options.read_threads, utils.MAX_WORKERS, "reading threads")



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


def predict_one(predictor: Predictor, path: Path, name: str, output_dir: Path, options: PredictOptions,
                workers=None) -> Outcome:
    """Segment one input (a plain image in memory, or a slide region by region through `wsi`) and write its
    outputs named `name` in `output_dir`. A failure of this input is returned as
    `Outcome(status="failed", error=<one line>)`, never raised (KeyboardInterrupt is). `workers`: the run's
    post-processing processes (`wsi.Workers`) for a slide; without them a slide starts its own."""
    import slides

    path = Path(path)
    start = time.time()
    kind = "image"
    try:
        if path.is_file() and slides.is_slide_file(path):
            import wsi

            kind = "slide"
            check_input_scale(predictor, path, options)
            return wsi.predict_slide(predictor, path, name, Path(output_dir), options, workers=workers)
        check_input_scale(predictor, path, options)
        image = read_image(path)
        fg, hv, settings = image_maps(predictor.model_set, image, predictor.tile_size, predictor.overlap,
                                      mpp=options.mpp, batch_size=predictor.batch_size, maps_fn=predictor.maps_fn,
                                      postprocess=predictor.postprocess or None, progress=True)
        nuclei, _, error, dropped = finish_image(path, Path(output_dir), name, image, fg, hv, settings,
                                                 mpp=options.mpp, overlay=options.overlay,
                                                 min_confidence=options.min_confidence)
    except Exception as e:  # one bad input must not stop the others
        log.debug("failed on %s", path, exc_info=True)
        nuclei, error, dropped = 0, error_message(path, e), 0
        image = None
    if error:
        return Outcome(str(path), name, "failed", error=error, seconds=round(time.time() - start, 3), kind=kind)
    return Outcome(str(path), name, "ok", nuclei, image.shape[0], image.shape[1], round(time.time() - start, 3),
                   mpp=options.mpp, dropped_low_confidence=dropped)


def write_outputs(output_dir: Path, name: str, image: np.ndarray, labels: np.ndarray,
                  mpp: float | None = None, overlay: bool = True,
                  confidence: dict | None = None) -> list[Path]:
    """The per-image result files (see the module docstring); returns their paths. `confidence` (id -> mean
    foreground probability, `nucleus_confidence`) adds the `confidence` column to the CSV and the GeoJSON
    measurements."""
    import export

    rows = export.measure_nuclei(labels, image, mpp=mpp, confidence=confidence)
    paths = [export.save_label_tiff(output_dir / f"{name}_labels.tif", labels.astype(np.uint32)),
             export.save_geojson(output_dir / f"{name}.geojson", labels,
                                 properties={int(r["id"]): r for r in rows}),
             export.save_measurements_csv(output_dir / f"{name}_nuclei.csv", rows,
                                          columns=export.measurement_columns(mpp, confidence=confidence is not None))]
    if overlay:
        import visualize

        paths.append(visualize.save_png(output_dir / f"{name}_overlay.png",
                                        visualize.draw_contours(image, labels, (0, 255, 0))))
    return paths


def nucleus_confidence(labels: np.ndarray, fg: np.ndarray, min_confidence: float = 0.0
                       ) -> tuple[np.ndarray, dict, int]:
    """(labels, {id: confidence}, dropped): each nucleus' confidence is the mean foreground probability `fg`
    over its pixels (same grid as `labels`); nuclei below `min_confidence` are removed and the others renumbered
    1..N in their order (ids are assigned after the drop)."""
    labels = np.asarray(labels)
    flat = labels.ravel()
    top = int(flat.max(initial=0))
    if top == 0:
        return labels, {}, 0
    area = np.bincount(flat, minlength=top + 1).astype(np.float64)
    sums = np.bincount(flat, weights=np.asarray(fg, np.float64).ravel(), minlength=top + 1)
    present = area > 0
    present[0] = False
    confidence = np.divide(sums, area, out=np.zeros_like(sums), where=area > 0)
    low = present & (confidence < float(min_confidence))
    dropped = int(low.sum())
    if dropped:
        keep = present & ~low
        lut = np.zeros(top + 1, labels.dtype)
        lut[keep] = np.arange(1, int(keep.sum()) + 1)
        labels = lut[labels]
        return labels, {i + 1: float(v) for i, v in enumerate(confidence[keep].tolist())}, dropped
    return labels, {int(i): float(confidence[i]) for i in np.flatnonzero(present).tolist()}, 0


def finish_image(path: Path, output_dir: Path, name: str, image: np.ndarray, fg: np.ndarray,
                 hv: np.ndarray | None, settings: dict, mpp: float | None = None,
                 overlay: bool = True, min_confidence: float = 0.0) -> tuple[int, float, str, int]:
    """Post-processing and result files of one image, from `image_maps`' output; runs in a worker process
    while the model works on the next image. The nuclei's confidences are computed on the maps' grid (the
    model's pixel size), nuclei below `min_confidence` dropped, then the labels resized to the image.
    Returns (nuclei, seconds, error message or "", nuclei dropped for low confidence)."""
    import dataset

    start = time.time()
    try:
        labels = labels_from_maps(fg, hv, settings, np.asarray(fg).shape)
        labels, confidence, dropped = nucleus_confidence(labels, fg, min_confidence)
        if labels.shape != tuple(image.shape[:2]):
            labels = dataset.resize_labels(labels, tuple(image.shape[:2]))
        labels = np.asarray(labels).astype(np.int32, copy=False)
        write_outputs(output_dir, name, image, labels, mpp=mpp, overlay=overlay, confidence=confidence)
        if dropped:
            log.info("%s: %d nuclei below --min_confidence %g dropped", path, dropped, min_confidence)
    except Exception as e:  # reported by the caller like a failure in the main process
        log.debug("failed on %s", path, exc_info=True)
        return 0, time.time() - start, error_message(path, e), 0
    return int(len(np.unique(labels[labels > 0]))), time.time() - start, "", dropped


def segment_images(predictor: Predictor, inputs: Sequence[Path], names: Sequence[str], output_dir: Path,
                   options: PredictOptions, workers=None) -> list[Outcome]:
    """The in-process engine of `predict`: every input in order, one Outcome each; a failed input is
    reported on stderr in one line and the others go on.

    `workers`: the run's post-processing processes (`wsi.Workers`, started by the caller; else `predictor.num_workers`
    of them, started when first needed), kept from input to input and shut down by whoever started them. Slides go
    through `predict_one` (`wsi` has its own read-ahead threads and uses these workers). For plain images with
    workers (the default on a GPU) the network segments image i+1 while the workers post-process image i and write
    its files (`finish_image`); at most as many images as workers wait for one. With 0 workers, or a single input,
    plain images run here through `predict_one`. `Outcome.seconds` is the model time plus the post-processing and
    writing time of the input.
    """
    import slides
    import wsi

    output_dir = Path(output_dir)
    outcomes: list[Outcome | None] = [None] * len(inputs)
    own_workers = workers is None
    if own_workers:
        workers = wsi.Workers(predictor.num_workers)
    images_in_workers = workers.count > 0 and len(inputs) > 1
    pending: deque[tuple[int, float, tuple, Future]] = deque()

    def record(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if outcome.status == "failed":
            tqdm.write(f"error: {outcome.error} (skipped)", file=sys.stderr)

    def collect_oldest() -> None:
        i, model_seconds, shape, future = pending.popleft()
        try:
            nuclei, seconds, error, dropped = future.result()
        except Exception as e:  # the worker process died (e.g. out of memory; `workers.pool()` replaces them)
            nuclei, seconds, error, dropped = 0, 0.0, error_message(inputs[i], e), 0
        path, name = inputs[i], names[i]
        record(i, Outcome(str(path), name, "failed", error=error) if error else
               Outcome(str(path), name, "ok", nuclei, shape[0], shape[1], round(model_seconds + seconds, 3),
                       mpp=options.mpp, dropped_low_confidence=dropped))

    try:
        for i, (path, name) in enumerate(tqdm(list(zip(inputs, names)), desc="inputs", unit="input")):
            path = Path(path)
            if not images_in_workers or not path.is_file() or slides.is_slide_file(path):
                record(i, predict_one(predictor, path, name, output_dir, options, workers=workers))
                continue
            start = time.time()
            try:
                check_input_scale(predictor, path, options)
                image = read_image(path)
                fg, hv, settings = image_maps(predictor.model_set, image, predictor.tile_size, predictor.overlap,
                                              mpp=options.mpp, batch_size=predictor.batch_size,
                                              maps_fn=predictor.maps_fn, postprocess=predictor.postprocess or None,
                                              progress=True)
            except Exception as e:  # one bad input must not stop the others
                log.debug("failed on %s", path, exc_info=True)
                record(i, Outcome(str(path), name, "failed", error=error_message(path, e)))
                continue
            job = (path, output_dir, name, image, fg, hv, settings, options.mpp, options.overlay,
                   options.min_confidence)
            pending.append((i, time.time() - start, image.shape, workers.submit(finish_image, *job)))
            while len(pending) > workers.count:
                collect_oldest()
        while pending:
            collect_oldest()
    finally:
        if own_workers:
            workers.close()
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
    parser.add_argument("--batch_size", type=int, default=None,
                        help="windows per network call (default: the fastest per window on the device: 1 on a "
                             "CPU; on CUDA the largest batch that still raises throughput, probed once)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision on CUDA (the same flag as train's)")
    parser.add_argument("--pretrained", default=None,
                        help="MobileSAM weights, if the checkpoint stores only the LoRA/head weights")
    parser.add_argument("--no_overlay", action="store_true", help="do not write <stem>_overlay.png")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="processes that post-process and write the results of one image while the model "
                             "segments the next (0 = all in this process; default: every usable core but one, "
                             "at most 16, when the model runs on a GPU, 0 on CPU, where workers would compete "
                             "with the network); "
                             "for slides: processes that post-process finished regions; started once, before "
                             "the model loads, and kept for every input of the run")
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
    parser.add_argument("--min_confidence", type=float, default=0.0, metavar="X",
                        help="drop nuclei whose confidence (mean foreground probability over the nucleus, "
                             "0..1) is below X before ids are assigned; the count is in summary.csv "
                             "(default 0: keep all)")
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

def run_prompts(args: argparse.Namespace) -> int:
    """Prompt mode (`--points` / `--boxes` / `--merge_into`): one mask per prompt with `prompts`' decoder."""
    import prompts as prompt_mode

    if not (args.points or args.boxes):
        raise UserError("--merge_into: give the prompts with --points and/or --boxes")
    if getattr(args, "mpp", None) is not None:
        raise UserError("--mpp: not used in prompt mode (prompts are in the image's own pixels)")
    if getattr(args, "ensemble", False):
        raise UserError("--ensemble: not used in prompt mode (the fold model with the best validation score runs)")
    if args.tile_size is not None and args.tile_size < 16:
        raise UserError(f"--tile_size {args.tile_size}: must be at least 16 pixels")
    inputs = expand_inputs(args.input)
    if len(inputs) != 1:
        raise UserError(f"--input: prompt mode takes exactly one image (got {len(inputs)})")
    image_path = inputs[0]
    image = read_image(image_path)
    shape = image.shape[:2]
    prompts = prompt_mode.load_prompts(args.points, args.boxes, shape)
    base = prompt_mode.read_merge_labels(args.merge_into, shape) if args.merge_into else None
    device = utils.select_device(args.device)
    net = prompt_mode.load_prompt_net(args.model_path, device, pretrained=args.pretrained, tile_size=args.tile_size)
    overlap = net.window // 4 if args.overlap is None else args.overlap
    if overlap < 0 or 2 * overlap > net.window:
        raise UserError(f"--overlap {overlap}: must be between 0 and half the window ({net.window // 2})")
    output_dir = utils.make_output_dir(args.output_dir)
    name = output_stems([image_path])[0]

    labels, assigned = prompt_mode.compose(prompt_mode.segment_prompts(net, image, prompts, overlap, progress=True),
                                           shape, base)
    write_outputs(output_dir, name, image, labels, overlay=not args.no_overlay)
    ids, counts = np.unique(labels[labels > (int(base.max()) if base is not None and base.size else 0)],
                            return_counts=True)
    area_of = dict(zip(ids.tolist(), counts.tolist()))
    rows = []
    for k, (pm, new_id) in enumerate(assigned, 1):
        p = pm.prompt
        c = [float(v) for v in p.coords]
        rows.append({"prompt": k, "source": p.source, "kind": p.kind,
                     "x": c[0] if p.kind == "point" else "", "y": c[1] if p.kind == "point" else "",
                     "x0": c[0] if p.kind == "box" else "", "y0": c[1] if p.kind == "box" else "",
                     "x1": c[2] if p.kind == "box" else "", "y1": c[3] if p.kind == "box" else "",
                     "id": new_id, "area": int(area_of.get(new_id, 0)),
                     "mask_area": pm.area, "iou_prediction": round(pm.iou, 6),
                     "window_x": pm.window[1], "window_y": pm.window[0], "window_size": pm.window[3]})
        if not new_id:
            log.warning("%s: the decoder gave an empty mask for this %s (no instance written)", p.source, p.kind)
    utils.write_csv(output_dir / f"{name}_prompts.csv", rows)
    made = sum(1 for _, i in assigned if i)
    print(f"{made} of {len(prompts)} prompt mask(s) written as instances"
          f"{' merged into ' + str(args.merge_into) if base is not None else ''}: "
          f"{(output_dir / (name + '_labels.tif')).resolve()} (per-prompt table: {name}_prompts.csv)")
    return 0


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
        return run_prompts(args)
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
    workers = None
    if not use_dask:
        import inference
        import slides
        import wsi

        # the run's post-processing processes (slides, or several images): started before the model is loaded, so
        # that their spawn and imports overlap the loading, and kept for every input (`wsi.Workers`)
        count = inference.worker_count(options, utils.select_device(options.device))
        utils.configure_threads(getattr(args, "threads", None), workers=count)   # before they spawn: they inherit it
        uses_workers = len(inputs) > 1 or any(p.is_file() and slides.is_slide_file(p) for p in inputs)
        workers = wsi.Workers(count if uses_workers else 0)
        workers.start()
    try:
        return _run(args, options, inputs, names, use_dask, workers)
    finally:
        if workers is not None:
            workers.close()


def _run(args, options: PredictOptions, inputs: list[Path], names: list[str], use_dask: bool, workers) -> int:
    # with Dask the model runs in the workers: here it is only checked, on the CPU
    predictor = load_predictor(replace(options, device="cpu") if use_dask else options)
    utils.freeze_startup_objects()   # torch's and the model's objects: out of the collector's later passes
    model_set = predictor.model_set
    output_dir = utils.make_output_dir(args.output_dir)  # only once every option is known to be good
    utils.write_json(output_dir / "predict_config.json", {
        "model_path": options.model_path, "inputs": [str(p) for p in inputs], "tile_size": predictor.tile_size,
        "overlap": predictor.overlap, "mpp": options.mpp, "model_mpp": predictor.model_mpp,
        "ensemble": options.ensemble, "batch_size": predictor.batch_size if not use_dask else options.batch_size,
        "device": predictor.device if not use_dask else options.device or "auto (in each Dask worker)",
        "dask": {"workers": args.workers, "scheduler": args.scheduler} if use_dask else None,
        "amp": options.amp, "options": options.to_dict(), "postprocess": getattr(model_set, "postprocess", None),
        "model_config": getattr(model_set, "config", None), "environment": utils.environment_info(),
    })

    if use_dask:
        import dask_predict

        outcomes = dask_predict.run_inputs(inputs, names, output_dir, options, predict_one, workers=args.workers,
                                           scheduler=args.scheduler, torch_threads=getattr(args, "threads", None))
    else:
        outcomes = segment_images(predictor, inputs, names, output_dir, options, workers=workers)
    utils.write_csv(output_dir / "summary.csv", [o.summary_row() for o in outcomes], columns=SUMMARY_COLUMNS)
    failed = [o for o in outcomes if o.status == "failed"]
    done = len(outcomes) - len(failed)
    print(f"predictions for {done} of {len(outcomes)} input(s) written to {output_dir.resolve()} "
          f"(summary.csv lists every input" + (f"; {len(failed)} failed, each reported above)" if failed else ")"))
    return 1 if failed else 0  # exit status 1: the batch finished, some inputs failed
