"""Score a trained model on NuInsSeg: Dice/IoU/AJI/AJI+/PQ/SQ/RQ per image, per tissue and across folds.

Given the `best_model.pth` at the top of a cross-validation output folder (a model set), every fold's model
scores the test images of its own fold, so every image is scored exactly once by a model that never saw it
(out-of-fold evaluation, the number comparable with published NuInsSeg results). A single checkpoint scores
the test images of one fold (`--fold k`, taken from the training run's `folds.json`) or every image.

Post-processing and scoring run in worker processes (`--num_workers`) while the model predicts the next
images. Results go to `--output_dir`: per_image.csv, per_tissue.csv, summary.json and summary.md, plus
optional predicted label TIFFs (`--save_predictions`), error overlays (`--visualize`) and plots (`--plot`).
See docs/evaluation.md for every option and output.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

import export
import metrics
import postprocess
import utils
import visualize
from utils import UserError

log = logging.getLogger(__name__)

# Published out-of-fold PQ on NuInsSeg (5-fold CV, mean over images) for comparison in summary.md.
# 0.534 is not the official HoVer-Net: it is the NuInsSeg authors' own simplified HoVer-style network (a small
# residual U-Net encoder with foreground and HV branches, `hovernet.py`), the mean row of
# `cross_validation_results.csv` in their evaluation repository github.com/masih4/nuc_eval; the same
# repository holds other HoVer-Net runs at 0.376 (`hover_net/cross_validation_results.csv`) and 0.478
# (`models_main/Models/hover_net/cross_validation_results.csv`).
PUBLISHED_PQ: dict[str, float] = {"simplified HoVer-style CNN of the NuInsSeg authors (masih4/nuc_eval)": 0.534,
                                  "HoVer-NeXt": 0.542, "CellViT-256": 0.564}

# Columns of per_image.csv, in this order.
PER_IMAGE_COLUMNS: tuple[str, ...] = (("image",) + tuple(metrics.METRICS)
                                      + ("tissue", "fold", "num_true", "num_pred", "tp", "fp", "fn", "iou_sum"))
# Scores shown in the Markdown tables and plots.
TABLE_METRICS: tuple[str, ...] = ("pq", "sq", "rq", "aji", "aji_plus", "dice", "iou", "f1")
SD_METRICS: tuple[str, ...] = ("pq", "aji", "dice")
DISPLAY_NAMES = visualize.METRIC_LABELS
VAGUE_COLOR = (255, 255, 255)   # outline of the ambiguous regions in the overlays (with --ignore_vague)


# ----------------------------------------------------------------------------------------------
# Which model scores which image
# ----------------------------------------------------------------------------------------------
def find_folds_json(model_path: str | os.PathLike | None, model_set: Any = None) -> Path | None:
    """The training run's folds.json: in the model set's output folder, next to the checkpoint, or one
    folder up (fold_k/best_model.pth)."""
    folders = []
    if model_set is not None and getattr(model_set, "output_dir", None) is not None:
        folders.append(Path(model_set.output_dir))
    if model_path is not None:
        model_path = Path(model_path)
        folders += [model_path.parent, model_path.parent.parent]
    for folder in folders:
        candidate = folder / "folds.json"
        if candidate.is_file():
            return candidate
    return None


def _fold_test_paths(folds_info: Mapping[str, Any], fold: int, folds_path: Path) -> list[str] | None:
    """Relative image paths of a fold's test set from `dataset.read_folds_json`'s result (None: no such fold)."""
    entry = next((f for f in folds_info.get("folds", []) if int(f["fold"]) == int(fold)), None)
    if entry is None:
        return None
    return _as_paths(entry.get("test", []), folds_info, folds_path)


def _as_paths(items: Sequence[Any], folds_info: Mapping[str, Any] | None, folds_path: Path | None) -> list[str]:
    """Test-set entries as relative image paths (folds.json stores indices into its `images` list)."""
    items = list(items)
    if not items or all(isinstance(i, str) for i in items):
        return items
    if folds_info is None:
        raise UserError("model set: its test images are given as indices but no folds.json was found")
    images = folds_info["images"]
    try:
        return [images[int(i)] for i in items]
    except (IndexError, ValueError, TypeError):
        raise UserError(f"{folds_path}: fold test indices out of range of its image list") from None


def member_test_images(member: Any, model_set: Any = None,
                       model_path: str | os.PathLike | None = None) -> list[str] | None:
    """The relative paths of the images a member's model was tested on (never trained on), or None."""
    items = getattr(member, "test_images", None)
    if items is None:
        return None
    items = list(items)
    if items and not all(isinstance(i, str) for i in items):
        import dataset

        folds_path = find_folds_json(model_path, model_set)
        info = dataset.read_folds_json(folds_path) if folds_path is not None else None
        return _as_paths(items, info, folds_path)
    return items


def _describe_missing(missing: Sequence[str], data_dir: Any) -> str:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{len(missing)} image(s) listed in the model's folds are missing from {data_dir}: {shown}"


def assign_samples(model_set: Any, samples: Sequence[Any], fold: int | None = None,
                   model_path: str | os.PathLike | None = None,
                   data_dir: str | os.PathLike | None = None) -> list[tuple[Any, int | None, list[Any]]]:
    """Pair each image with the model that scores it: a list of (member, fold, samples).

    - A CV model set: each fold's member gets the images of its own test fold (out-of-fold). Images the
      folds list but that are missing from `samples` raise UserError naming them; images in `samples`
      that no fold lists are left out with a warning. `fold` restricts to that one fold.
    - A single model with `fold`: that fold's test images from the training run's folds.json.
    - A single model without `fold`: every image (fold column left empty).
    """
    by_path = {s.rel_path: s for s in samples}
    where = data_dir or "--data_dir"
    members = list(model_set.members)
    if getattr(model_set, "is_cv", False):
        folds = [m.fold for m in members]
        if fold is not None:
            if fold not in folds:
                raise UserError(f"--fold {fold}: out of range, the model set has folds "
                                f"{', '.join(str(f) for f in folds)}")
            members = [m for m in members if m.fold == fold]
        out, missing, seen = [], [], set()
        for member in members:
            test = member_test_images(member, model_set, model_path)
            if test is None:
                raise UserError(f"{model_path or 'model set'}: fold {member.fold} does not say which images it "
                                "was tested on (folds.json missing from the training folder?)")
            chosen = []
            for rel in test:
                if rel not in by_path:
                    missing.append(rel)
                elif rel in seen:
                    raise UserError(f"{model_path or 'model set'}: image {rel} is in the test set of more than "
                                    "one fold")
                else:
                    seen.add(rel)
                    chosen.append(by_path[rel])
            out.append((member, member.fold, sorted(chosen, key=lambda s: s.rel_path)))
        if missing:
            raise UserError(_describe_missing(missing, where)
                            + " (evaluate on the data folder the model was trained on)")
        if fold is None:
            extra = [rel for rel in by_path if rel not in seen]
            if extra:
                log.warning("%d image(s) in %s belong to no fold of this model set and are not scored "
                            "(e.g. %s)", len(extra), where, extra[0])
        return out

    if len(members) != 1:
        raise UserError(f"{model_path or 'model set'}: expected one model, found {len(members)}")
    member = members[0]
    if fold is None:
        test = member_test_images(member, model_set, model_path)
        if test is not None and len(test) < len(samples):
            log.warning("scoring all %d images with one model: images it was trained on are included "
                        "(use --fold %s for its own test images)", len(samples), member.fold)
        return [(member, None, list(samples))]

    if fold < 0:
        raise UserError(f"--fold {fold}: must be 0 or more")
    test = member_test_images(member, model_set, model_path) if member.fold == fold else None
    if test is None:
        import dataset

        folds_path = find_folds_json(model_path, model_set)
        if folds_path is None:
            raise UserError(f"--fold {fold}: no folds.json found next to {model_path} or one folder up "
                            "(the training run's folds define the test images)")
        info = dataset.read_folds_json(folds_path)
        test = _fold_test_paths(info, fold, folds_path)
        if test is None:
            raise UserError(f"--fold {fold}: out of range, {folds_path} has folds "
                            f"{', '.join(str(f['fold']) for f in info['folds'])}")
        if member.fold is not None and member.fold != fold:
            log.warning("--fold %d: this checkpoint was trained as fold %d, so fold %d's test images may "
                        "include images it was trained on", fold, member.fold, fold)
    missing = [rel for rel in test if rel not in by_path]
    if missing:
        raise UserError(_describe_missing(missing, where))
    return [(member, fold, sorted((by_path[rel] for rel in test), key=lambda s: s.rel_path))]


def output_stems(samples: Sequence[Any]) -> dict[str, str]:
    """File stem for each image's outputs: its own stem, or `<tissue>_<stem>` where stems collide."""
    counts = Counter(s.name for s in samples)
    stems = {}
    for s in samples:
        stem = s.name if counts[s.name] == 1 else f"{s.tissue}_{s.name}"
        stems[s.rel_path] = stem.replace("/", "_").replace(os.sep, "_")
    return stems


@dataclasses.dataclass
class Ensemble:
    """Stands in for a member in an assignment: all fold models of a CV set, their maps averaged."""

    members: list[Any]
    fold: int | None = None
    test_images: list[str] | None = None
    postprocess: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def models(self) -> list[Any]:
        return [m.model for m in self.members]


def member_models(member: Any) -> list[Any]:
    """The networks of an assignment's member: one model, or every fold model of an `Ensemble`."""
    return list(member.models) if isinstance(member, Ensemble) else [member.model]


def training_overlap(samples: Sequence[Any], model_set: Any,
                     model_path: str | os.PathLike | None = None) -> list[str] | None:
    """File names of `samples` that the training run's folds.json also lists (compared by file name, so a copy
    of the training images in another layout counts); None when no folds.json is found (unknown)."""
    import dataset

    folds_path = find_folds_json(model_path, model_set)
    if folds_path is None:
        return None
    names = {Path(p).name for p in dataset.read_folds_json(folds_path)["images"]}
    return [Path(s.rel_path).name for s in samples if Path(s.rel_path).name in names]


def is_cross_dataset(model_set: Any, samples: Sequence[Any], fold: int | None = None,
                     model_path: str | os.PathLike | None = None) -> bool:
    """True for a CV model set (no --fold) and data none of whose images (by relative path) is in any fold's
    test set: another dataset, scored whole by the ensemble or the best fold model."""
    if not getattr(model_set, "is_cv", False) or fold is not None:
        return False
    listed: set[str] = set()
    for member in model_set.members:
        test = member_test_images(member, model_set, model_path)
        if test is None:  # no folds.json: nothing to compare with (assign_samples says so)
            return False
        listed.update(test)
    return not any(s.rel_path in listed for s in samples)


def cross_dataset_assignments(model_set: Any, samples: Sequence[Any], ensemble: bool
                              ) -> tuple[list[tuple[Any, int | None, list[Any]]], str]:
    """Every image to the fold-model ensemble (`ensemble`) or to the fold model with the best validation
    score (`inference.select_models`); returns (assignments, which model in words)."""
    import inference

    members = list(model_set.members)
    if ensemble and len(members) > 1:
        return ([(Ensemble(members), None, sorted(samples, key=lambda s: s.rel_path))],
                f"ensemble of the {len(members)} fold models (maps averaged)")
    best = inference.select_models(model_set, ensemble=False)[0]
    member = next(m for m in members if m.model is best)
    which = (f"best fold model (fold {member.fold}, highest validation "
             f"{(model_set.config or {}).get('monitor', 'pq')})" if len(members) > 1 else "the model")
    return [(member, None, sorted(samples, key=lambda s: s.rel_path))], which


def needs_tiling(model_set: Any, shape: Sequence[int], mpp: float | None = None) -> bool:
    """True when an image of `shape` (H, W) at `mpp` µm/px is not exactly one training tile at the model's
    pixel size: it is then segmented whole through the tiled engine (inference.py) instead of resized as one input.
    (A model whose config records no `tile_size` is tiled only for another pixel size.)"""
    import inference

    same_scale = mpp is None or abs(float(mpp) / inference.model_mpp(model_set) - 1.0) < 1e-6
    if not (getattr(model_set, "config", None) or {}).get("tile_size"):
        return not same_scale  # a model that records no tile size: images go whole, as they always did
    tile = inference.model_tile_size(model_set)
    return not same_scale or tuple(int(v) for v in shape[:2]) != (tile, tile)


def segment_maps(model_set: Any, models: Sequence[Any], images: Sequence[np.ndarray], device: Any,
                 mpp: float | None = None, batch_size: int = 1) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(foreground probability, HV maps | None) of each image, averaged over `models`: an image of the model's
    tile size and pixel size goes through the network whole (maps at its size, the NuInsSeg path); any other
    image through `inference.image_maps`, the tiled engine (maps at the model's pixel size, so the
    post-processed labels must be resized back to the image: `labels_to_image`)."""
    import inference
    import nuclei_model

    input_size = _model_input_size(model_set)
    out: list[Any] = [None] * len(images)
    direct = [i for i, im in enumerate(images) if not needs_tiling(model_set, im.shape, mpp)]
    if direct:
        maps = nuclei_model.predict_maps_batch(list(models), [images[i] for i in direct], input_size, device)
        for i, m in zip(direct, maps):
            out[i] = m

    def maps_fn(tiles: list) -> list:
        return nuclei_model.predict_maps_batch(list(models), tiles, input_size, device)

    for i, image in enumerate(images):
        if out[i] is None:
            fg, hv, _ = inference.image_maps(model_set, image, mpp=mpp, maps_fn=maps_fn, batch_size=max(1, batch_size))
            out[i] = (fg, hv)
    return out


def labels_to_image(pred: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Predicted labels at the model's pixel size back to the image's (H, W) (nearest neighbour)."""
    import dataset

    shape = (int(shape[0]), int(shape[1]))
    return pred if pred.shape == shape else dataset.resize_labels(pred, shape)


# ----------------------------------------------------------------------------------------------
# Scoring one image (runs in a worker process: only plain arrays and strings come in)
# ----------------------------------------------------------------------------------------------
def score_image(task: Mapping[str, Any]) -> dict[str, Any]:
    """Post-process one image's network maps, score the instances and write the optional files.

    `task` keys: image (rel path), tissue, fold, stem, foreground (H,W), hv (2,H,W)|None, postprocess
    (dict), labels (true instances), vague (bool mask or None), ignore_vague, rgb (the image, needed for
    overlays), predictions_dir, overlays_dir. Returns the per_image.csv row.
    """
    config = postprocess.PostprocessConfig.from_dict(task["postprocess"])
    labels = task["labels"]
    pred = labels_to_image(postprocess.postprocess(task["foreground"], task["hv"], config), labels.shape)
    ignore = task["vague"] if task["ignore_vague"] else None
    scores = metrics.instance_metrics(labels, pred, ignore=ignore)
    row: dict[str, Any] = {"image": task["image"]}
    row.update({name: scores[name] for name in metrics.METRICS})
    row.update(tissue=task["tissue"], fold="" if task["fold"] is None else task["fold"])
    row.update({k: scores[k] for k in ("num_true", "num_pred", "tp", "fp", "fn", "iou_sum")})
    if task.get("predictions_dir"):
        export.save_label_tiff(Path(task["predictions_dir"]) / f"{task['stem']}.tif", pred, smallest=True)
    if task.get("overlays_dir"):
        shown_true, shown_pred = labels, pred
        if ignore is not None and ignore.any():
            # the nuclei the scores left out are not drawn either (counts then match the scores)
            shown_true = metrics.apply_ignore_region(labels, ignore)
            shown_pred = metrics.apply_ignore_region(pred, ignore)
        factor = visualize.overlay_zoom(labels.shape)   # small images enlarged: outlines thinner than nuclei
        picture, counts = visualize.error_overlay(task["rgb"], shown_true, shown_pred, zoom_factor=factor)
        entries = visualize.error_legend_entries(counts)
        if ignore is not None and ignore.any():
            picture[visualize.boundaries(visualize.zoom(ignore.astype(np.int32), factor))] = VAGUE_COLOR
            entries.append(("ambiguous region (ignored)", VAGUE_COLOR))
        picture = visualize.add_legend(picture, entries)
        visualize.save_png(Path(task["overlays_dir"]) / f"{task['stem']}.png", picture)
    return row


# ----------------------------------------------------------------------------------------------
# Evaluating a model set
# ----------------------------------------------------------------------------------------------
def _model_input_size(model_set: Any) -> int:
    config = getattr(model_set, "config", None) or {}
    size = config.get("input_size", getattr(model_set, "input_size", None))
    if size is None:
        raise UserError("model checkpoint: its config has no input_size")
    return int(size)


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def _load_batch(batch: Sequence[Any]) -> list[tuple]:
    import dataset

    return [dataset.load_sample(s) for s in batch]


def member_postprocess(model_set: Any, member: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The post-processing settings of one member: its own (tuned on its fold's validation images when
    training used --tune_postprocess), else the model set's, with `overrides` on top; validated."""
    pp = dict(getattr(member, "postprocess", None) or getattr(model_set, "postprocess", None) or {})
    pp.update(overrides or {})
    return postprocess.PostprocessConfig.from_dict(pp).to_dict()


def evaluate_model_set(model_set: Any, samples: Sequence[Any] | None = None, *,
                       assignments: Sequence[tuple[Any, int | None, Sequence[Any]]] | None = None,
                       device: Any = None, batch_size: int = 1, num_workers: int = 0,
                       postprocess_overrides: Mapping[str, Any] | None = None, ignore_vague: bool = False,
                       fold: int | None = None, predictions_dir: str | os.PathLike | None = None,
                       overlays_dir: str | os.PathLike | None = None, progress: bool = True,
                       mpp: float | None = None) -> list[dict]:
    """Score `model_set` on `samples`; returns the per-image rows (columns `PER_IMAGE_COLUMNS`) sorted by image.

    Images are paired with models by `assign_samples` (out-of-fold for a CV set; `fold` restricts to one
    fold) unless `assignments` is given. Each member post-processes with its own saved settings
    (`member_postprocess`) plus `postprocess_overrides`. Post-processing, scoring and file writing run in
    `num_workers` spawned processes (0 = in this process) while the model predicts the next batch; images
    are read by a background thread. `predictions_dir`/`overlays_dir` turn on the label TIFFs / overlays.
    `mpp` is the images' pixel size (None: the model's); images that are not one training tile at the model's
    pixel size are segmented whole through the inference engine's tiling (`segment_maps`) and scored at their own size.
    """
    import nuclei_model

    if assignments is None:
        if samples is None:
            raise ValueError("evaluate_model_set: give samples or assignments")
        assignments = assign_samples(model_set, samples, fold=fold)
    if device is None:
        device = utils.select_device(None)
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    if num_workers < 0:
        raise UserError(f"--num_workers {num_workers}: must be 0 or more")
    pp_of = {id(member): member_postprocess(model_set, member, postprocess_overrides)
             for member, _, _ in assignments}
    head = (getattr(model_set, "config", None) or {}).get("head")
    if head == "binary" and any(pp["mode"] == "hv" for pp in pp_of.values()):
        raise UserError("--mode hv: this model has a binary head (no HV maps); use --mode binary")
    _model_input_size(model_set)   # a checkpoint whose config has no input_size stops here
    # LoRA merged and Conv+BN folded once per model: same outputs, faster inference
    nets = {id(member): [nuclei_model.prepare_for_inference(m) for m in member_models(member)]
            for member, _, group in assignments if group}
    all_samples = [s for _, _, group in assignments for s in group]
    stems = output_stems(all_samples)
    for folder in (predictions_dir, overlays_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)

    jobs = [(member, fold_id, batch) for member, fold_id, group in assignments
            for batch in _batches(list(group), batch_size)]
    rows: list[dict] = []
    pool = None
    if num_workers > 0:
        pool = utils.process_pool(num_workers)
    reader = ThreadPoolExecutor(max_workers=1)
    pending: set[Future] = set()
    max_pending = 2 * num_workers + batch_size
    from tqdm import tqdm

    bar = tqdm(total=len(all_samples), desc="evaluate", unit="img", disable=not progress)

    def collect(block: bool) -> None:
        nonlocal pending
        if not pending:
            return
        done, pending = wait(pending, return_when=FIRST_COMPLETED, timeout=None if block else 0)
        for fut in done:
            rows.append(fut.result())
            bar.update(1)

    try:
        next_load = reader.submit(_load_batch, jobs[0][2]) if jobs else None
        for j, (member, fold_id, batch) in enumerate(jobs):
            loaded = next_load.result()
            next_load = reader.submit(_load_batch, jobs[j + 1][2]) if j + 1 < len(jobs) else None
            maps = segment_maps(model_set, nets[id(member)], [item[0] for item in loaded], device, mpp=mpp,
                                batch_size=batch_size)
            for sample, (rgb, labels, vague), (fg, hv) in zip(batch, loaded, maps):
                task = {
                    "image": sample.rel_path, "tissue": sample.tissue, "fold": fold_id,
                    "stem": stems[sample.rel_path], "foreground": fg, "hv": hv, "postprocess": pp_of[id(member)],
                    "labels": labels, "vague": vague, "ignore_vague": ignore_vague,
                    "rgb": rgb if overlays_dir is not None else None,
                    "predictions_dir": str(predictions_dir) if predictions_dir is not None else None,
                    "overlays_dir": str(overlays_dir) if overlays_dir is not None else None,
                }
                if pool is None:
                    rows.append(score_image(task))
                    bar.update(1)
                else:
                    pending.add(pool.submit(score_image, task))
            collect(block=False)
            while len(pending) > max_pending:
                collect(block=True)
        while pending:
            collect(block=True)
    finally:
        bar.close()
        reader.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    rows.sort(key=lambda r: r["image"])
    return rows


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """NaN/inf -> None (valid JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _sd_over_images(rows: Sequence[Mapping[str, Any]], name: str) -> float:
    vals = [float(r[name]) for r in rows if math.isfinite(float(r[name]))]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")


def per_tissue_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """per_tissue.csv rows: tissue, n, the mean of every metric, sd over images of PQ/AJI/Dice, pooled PQ."""
    out = []
    for entry in metrics.group_means(rows, "tissue"):
        members = [r for r in rows if r["tissue"] == entry["tissue"]]
        for name in SD_METRICS:
            entry[f"{name}_sd"] = _sd_over_images(members, name)
        out.append(entry)
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall mean over images, pooled PQ, per-fold means and mean ± sd across folds, per-tissue means."""
    summary: dict[str, Any] = {"num_images": len(rows), "overall": metrics.mean_over_images(rows)}
    summary["overall_sd_over_images"] = {name: _sd_over_images(rows, name) for name in metrics.METRICS}
    summary["pooled"] = metrics.pooled_pq(rows)
    fold_rows = [r for r in rows if r["fold"] not in ("", None)]
    summary["per_fold"] = metrics.group_means(fold_rows, "fold") if fold_rows else []
    if len(summary["per_fold"]) >= 2:
        across = {}
        for name in metrics.METRICS:
            mean, sd = metrics.mean_sd(f[name] for f in summary["per_fold"])
            across[name] = {"mean": mean, "sd": sd}
        summary["across_folds"] = across
    else:
        summary["across_folds"] = None
    summary["per_tissue"] = per_tissue_rows(rows)
    return summary


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def summary_markdown(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The readable report (summary.md)."""
    names = TABLE_METRICS
    overall = summary["overall"]
    lines = ["# Evaluation", ""]
    lines += [f"- model: `{meta.get('model_path')}`", f"- data: `{meta.get('data_dir')}`",
              f"- protocol: {meta.get('protocol')}",
              *([f"- scored by: {meta['scored_by']}"] if meta.get("scored_by") else []),
              *([f"- training images: {meta['training_overlap']}"] if meta.get("training_overlap") else []),
              f"- images scored: {summary['num_images']}",
              f"- ambiguous (vague) regions: {vague_protocol(bool(meta.get('ignore_vague')))}",
              ""]
    lines += ["## Overall (mean over images)", ""]
    header = [DISPLAY_NAMES.get(n, n) for n in names]
    lines.append(_table(["scope"] + header + ["pooled PQ"],
                        [["all images"] + [_fmt(overall[n]) for n in names]
                         + [_fmt(summary["pooled"]["pooled_pq"])]]))
    lines.append("")
    pq = overall.get("pq")
    if pq is not None and math.isfinite(pq):
        published = ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED_PQ.items())
        lines += [f"PQ {pq:.3f} (mean over images). Published out-of-fold PQ on NuInsSeg: {published}. "
                  + ("Comparable: the paper's protocol (out-of-fold over the full NuInsSeg file list, 5 folds, "
                     "seed 19, ambiguous regions ignored)."
                     if meta.get("comparable") else
                     f"Not comparable: {meta.get('comparable_reason', 'not the paper protocol')}."), ""]
    if summary["per_fold"]:
        lines += ["## Per fold (each fold's model on its own test images)", ""]
        body = [[str(f["fold"]), str(f["n"])] + [_fmt(f[n]) for n in names] + [_fmt(f.get("pooled_pq"))]
                for f in summary["per_fold"]]
        across = summary.get("across_folds")
        if across:
            body.append(["**mean ± sd**", str(sum(f["n"] for f in summary["per_fold"]))]
                        + [f"{_fmt(across[n]['mean'])} ± {_fmt(across[n]['sd'])}" for n in names] + [""])
        lines.append(_table(["fold", "images"] + header + ["pooled PQ"], body))
        lines.append("")
    scope = "group" if meta.get("data_format") == "folders" else "tissue"  # folders layout: groups.csv
    lines += [f"## Per {scope} (mean over images; ± sd over images for PQ)", ""]
    body = [[t["tissue"], str(t["n"]), f"{_fmt(t['pq'])} ± {_fmt(t['pq_sd'])}"]
            + [_fmt(t[n]) for n in names if n != "pq"] for t in summary["per_tissue"]]
    lines.append(_table([scope, "images", "PQ"] + [DISPLAY_NAMES.get(n, n) for n in names if n != "pq"],
                        body))
    lines.append("")
    lines += ["Scores: PQ = SQ × RQ (pairs with IoU > 0.5), AJI/AJI+ aggregated Jaccard index, Dice/IoU of the "
              "binary foreground, F1 = detection F1 at IoU > 0.5. Pooled PQ adds TP/FP/FN and IoUs over all "
              "images before computing PQ. See docs/evaluation.md.", ""]
    return "\n".join(lines)


def write_reports(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                  meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write per_image.csv, per_tissue.csv, summary.json and summary.md; returns the summary dict."""
    output_dir = Path(output_dir)
    utils.write_csv(output_dir / "per_image.csv", rows, PER_IMAGE_COLUMNS)
    summary = summarize(rows)
    tissue_cols = (["tissue", "n"] + list(metrics.METRICS) + [f"{n}_sd" for n in SD_METRICS]
                   + ["pooled_pq", "pooled_sq", "pooled_rq"])
    utils.write_csv(output_dir / "per_tissue.csv", summary["per_tissue"], tissue_cols)
    document = dict(summary)
    document.update({k: v for k, v in meta.items()})
    document["published_pq"] = PUBLISHED_PQ
    document["environment"] = utils.environment_info()
    utils.write_json(output_dir / "summary.json", _finite(document))
    utils.atomic_write_text(output_dir / "summary.md", summary_markdown(summary, meta))
    return summary


def training_histories(model_path: str | os.PathLike) -> dict[str, list[dict[str, str]]]:
    """The training run's history.csv files: `fold_*/history.csv` next to the model, or its own."""
    folder = Path(model_path).parent
    found = sorted(folder.glob("fold_*/history.csv"))
    if not found and (folder / "history.csv").is_file():
        found = [folder / "history.csv"]
    histories = {}
    for path in found:
        name = path.parent.name if path.parent != folder else "model"
        try:
            rows = utils.read_csv(path)
        except (UserError, OSError, UnicodeDecodeError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if rows:
            histories[name.replace("_", " ")] = rows
    return histories


def write_plots(rows: Sequence[Mapping[str, Any]], plots_dir: str | os.PathLike,
                model_path: str | os.PathLike | None = None) -> list[Path]:
    """plots/: per-tissue bars (PQ/AJI/Dice ± sd over images), score distributions, CV learning curves."""
    plots_dir = Path(plots_dir)
    written = [visualize.plot_tissue_bars(rows, plots_dir / "per_tissue.png", metrics=SD_METRICS),
               visualize.plot_distributions(rows, plots_dir / "distributions.png")]
    if model_path is not None:
        histories = training_histories(model_path)
        if histories:
            try:
                written.append(visualize.plot_learning_curves(histories, plots_dir / "learning_curves.png"))
            except ValueError as e:
                log.warning("no learning curves: %s", e)
        else:
            log.info("no history.csv next to %s: no learning curves", model_path)
    return written


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _postprocess_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(postprocess.PostprocessConfig)
            if f.type in (bool, int, float, str, "bool", "int", "float", "str")]


def _field_type(field: dataclasses.Field) -> type:
    return {"bool": bool, "int": int, "float": float, "str": str}.get(field.type, field.type) \
        if isinstance(field.type, str) else field.type


def _postprocess_help() -> dict[str, str]:
    """Field descriptions from PostprocessConfig's docstring ("name: text" paragraphs)."""
    helps: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(postprocess.PostprocessConfig)}
    current = None
    for line in (postprocess.PostprocessConfig.__doc__ or "").splitlines():
        text = line.strip()
        head, sep, rest = text.partition(":")
        if sep and head in names:
            current = head
            helps[current] = rest.strip()
        elif current and text:
            helps[current] += " " + text
        else:
            current = None
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """`--<field>` for every PostprocessConfig setting (default: the value stored with the model)."""
    group = parser.add_argument_group("post-processing overrides (default: the settings saved with the model)")
    helps = _postprocess_help()
    for field in _postprocess_fields():
        kind = _field_type(field)
        flag = f"--{field.name}"
        text = helps.get(field.name, f"override {field.name}")
        if kind is bool:
            group.add_argument(flag, type=_parse_bool, default=None, metavar="{true,false}", help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def postprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The post-processing settings given on the command line."""
    return {f.name: getattr(args, f.name) for f in _postprocess_fields()
            if getattr(args, f.name, None) is not None}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `evaluate` and `demo`: data, model, device, base weights, vague protocol."""
    parser.add_argument("--data_dir", default=None,
                        help="dataset folder (NuInsSeg or folders layout, see --data_format); when omitted, the data "
                             "folder recorded in the model's config")
    parser.add_argument("--model_path", required=True,
                        help="a CV output folder's best_model.pth (all fold models) or one checkpoint")
    import dataset

    dataset.add_data_format_argument(parser)
    parser.add_argument("--mpp", type=float, default=None,
                        help="micrometres per pixel of the data's images; they are segmented at the model's pixel "
                             "size (default: the folders layout's dataset.json mpp, else the model's)")
    parser.add_argument("--ensemble", action="store_true",
                        help="data the CV model was not trained on: average all fold models (default: the fold "
                             "model with the best validation score)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps; when omitted, the best available")
    parser.add_argument("--pretrained", default=None,
                        help="MobileSAM base weights (mobile_sam.pt) when they moved; when omitted, the path "
                             "recorded in the checkpoint")
    parser.add_argument("--ignore_vague", action=argparse.BooleanOptionalAction, default=True,
                        help="the NuInsSeg authors' ambiguous-region protocol, also used by train's cv_summary "
                             "(default): nuclei (true or predicted) with >= 25%% of their area inside a 'vague "
                             "areas' mask are dropped, and the masked pixels do not count for Dice/IoU; "
                             "--no-ignore_vague scores those regions like any other pixel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--output_dir", default="evaluation", help="folder for the reports")
    parser.add_argument("--fold", type=int, default=None,
                        help="score only this fold's test images (with a single checkpoint: from the "
                             "training run's folds.json)")
    parser.add_argument("--batch_size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=min(4, max(1, utils.usable_cores() - 1)),
                        help="processes for post-processing and scoring (0 = in the main process)")
    parser.add_argument("--save_predictions", action="store_true",
                        help="write predicted label maps as TIFF into <output_dir>/predictions/")
    parser.add_argument("--visualize", action="store_true",
                        help="write error overlays into <output_dir>/overlays/")
    parser.add_argument("--plot", action="store_true", help="write plots into <output_dir>/plots/")
    add_postprocess_arguments(parser)


def recorded_data_dir(config: Mapping[str, Any], model_path: str | Path) -> Path:
    """The data folder recorded in a model's config when --data_dir is not given. Models trained by this
    version record it absolute; an older relative one was relative to the folder `train` ran in, which is the
    model folder's parent or an ancestor of it: the nearest ancestor where it exists is taken."""
    recorded = config.get("data_dir")
    if not recorded:
        raise UserError("--data_dir: not given and the model's config records no data folder")
    data_dir = Path(recorded).expanduser()
    if data_dir.is_absolute():
        if not data_dir.is_dir():
            raise UserError(f"--data_dir: not given, and the model's data folder {data_dir} does not exist; "
                            f"give --data_dir")
        return data_dir
    model_dir = Path(os.path.abspath(model_path)).parent
    for base in model_dir.parents:
        if (base / data_dir).is_dir():
            return base / data_dir
    raise UserError(f"--data_dir: not given, and the model's config records the data folder {recorded!r} "
                    f"relative to where train ran, which is not in any folder above {model_dir}; give --data_dir")


def load_for_evaluation(args: argparse.Namespace) -> tuple[Any, list[Any], Path, Any]:
    """Check paths, load the model set and discover the images: (model_set, samples, data_dir, device)."""
    import dataset
    import nuclei_model

    model_path = Path(args.model_path)
    if not model_path.exists():
        raise UserError(f"--model_path {model_path}: file not found")
    if model_path.is_dir():
        if (model_path / "best_model.pth").is_file():
            model_path = model_path / "best_model.pth"
            args.model_path = str(model_path)
        else:
            raise UserError(f"--model_path {model_path}: a folder without best_model.pth")
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data_dir {data_dir}: folder not found")
    device = utils.select_device(args.device)
    if args.pretrained is not None:
        utils.check_input_file(args.pretrained, "--pretrained")
    utils.check_mpp_range("--mpp", getattr(args, "mpp", None))
    utils.check_at_most("--batch_size", getattr(args, "batch_size", None), utils.MAX_BATCH_SIZE, "images per forward pass")
    utils.check_at_most("--num_workers", getattr(args, "num_workers", None), utils.MAX_WORKERS, "worker processes")
    try:
        model_set = nuclei_model.load_model_set(model_path, device, pretrained=args.pretrained)
    except UserError:
        raise
    except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model_path {model_path}: not a compatible checkpoint ({first})") from None
    if args.data_dir is None:
        data_dir = recorded_data_dir(model_set.config or {}, model_path)
        log.info("data folder from the model's config: %s", data_dir)
    data_format = getattr(args, "data_format", "auto")
    samples = dataset.discover(data_dir, data_format)
    if getattr(args, "mpp", None) is not None and not args.mpp > 0:
        raise UserError(f"--mpp {args.mpp}: must be a positive number of micrometres per pixel")
    args.data_mpp = args.mpp if getattr(args, "mpp", None) is not None else dataset.dataset_mpp(data_dir, data_format)
    args.data_format = dataset.detect_format(data_dir, data_format)
    if not samples:
        raise UserError(f"--data_dir {data_dir}: no NuInsSeg images found (expected "
                        "<organ>/tissue images/*.png with matching label masks)")
    where = "--mpp" if getattr(args, "mpp", None) is not None else f"{data_dir / dataset.FOLDERS_INFO} mpp"
    check_data_scale(model_set, samples, args.data_mpp, where)
    return model_set, samples, data_dir, device


def check_data_scale(model_set: Any, samples: Sequence[Any], data_mpp: float | None, where: str = "--mpp") -> None:
    """Before any image is read: with a data pixel size (`where`: --mpp or dataset.json), every image's
    resized size (from its header) must fit (`dataset.check_resize`: UserError naming `where` and the sizes,
    exit 2); a warning for a pixel size outside the brightfield range and for images the resize shrinks below
    one training tile."""
    import dataset
    import inference

    if data_mpp is None:
        return
    if not math.isfinite(float(data_mpp)):
        raise UserError(f"{where} {data_mpp}: must be a finite number of micrometres per pixel")
    dataset.warn_if_implausible_mpp(data_mpp, where)
    scale = float(data_mpp) / inference.model_mpp(model_set)
    if abs(scale - 1.0) < 1e-6:
        return
    tile = inference.model_tile_size(model_set)
    small = []
    for sample in samples:
        shape = dataset.image_shape(sample.image_path)
        resized = dataset.check_resize(sample.image_path, shape, scale, f"{where} {float(data_mpp):g}")
        if scale < 1 and max(resized) < tile:
            small.append(sample.image_path)
    if small:
        log.warning("%s %g shrinks %d of %d image(s) (e.g. %s) below one window (%d pixels at the model's %g um/px): "
                    "nuclei shrink with them and few or none may be found", where, float(data_mpp), len(small),
                    len(samples), small[0], tile, inference.model_mpp(model_set))


def _shared_or_per_fold(pp_by_fold: Mapping[str, dict]) -> Any:
    """One settings dict when every fold uses the same, else {fold: settings}."""
    values = list(pp_by_fold.values())
    return values[0] if values and all(v == values[0] for v in values) else dict(pp_by_fold)


def vague_protocol(ignore_vague: bool) -> str:
    """How ambiguous regions were scored, in the words both evaluate's and train's reports use."""
    return ("ignored (NuInsSeg authors' protocol; the default of evaluate and train)" if ignore_vague else
            "scored like any other pixel (--no-ignore_vague)")


def paper_protocol(model_set: Any, samples: Sequence[Any], fold: int | None, ignore_vague: bool) -> tuple[bool, str]:
    """(comparable, reason): True only for the paper's protocol: a cross-validation model set of 5 folds with
    fold seed 19, scored out-of-fold (no --fold) over the real NuInsSeg file list
    (`dataset.is_nuinsseg_file_list`) with ambiguous regions ignored."""
    import dataset

    config = getattr(model_set, "config", None) or {}
    folds = config.get("num_folds", len(getattr(model_set, "members", [])))
    checks = [
        (bool(getattr(model_set, "is_cv", False)), "a single model, not a cross-validation model set"),
        (fold is None, f"only fold {fold} scored"),
        (folds == dataset.PAPER_NUM_FOLDS and config.get("fold_seed") == dataset.PAPER_FOLD_SEED,
         f"{folds} folds with fold seed {config.get('fold_seed')} (the paper: 5 folds, seed 19)"),
        (dataset.is_nuinsseg_file_list(samples),
         f"{len(samples)} images that are not the NuInsSeg file list (665 images in its 31 organ folders)"),
        (ignore_vague, "ambiguous regions scored (--no-ignore_vague)"),
    ]
    for ok, reason in checks:
        if not ok:
            return False, reason
    return True, "the paper's protocol"


def check_output_dir(output_dir: Path) -> None:
    """Refuse a file, and a training run's folder: its own summary.json would be replaced by the report."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if (output_dir / "folds.json").is_file() or (output_dir / "best_model.pth").is_file():
        raise UserError(f"--output_dir {output_dir}: holds a training run, whose summary.json would be "
                        f"replaced; choose another folder (e.g. {output_dir / 'evaluation'})")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    utils.configure_threads(getattr(args, "threads", None), workers=max(0, args.num_workers))
    model_set, samples, data_dir, device = load_for_evaluation(args)
    cross = is_cross_dataset(model_set, samples, args.fold, args.model_path)
    if cross:
        assignments, scored_by = cross_dataset_assignments(model_set, samples, getattr(args, "ensemble", False))
    else:
        assignments = assign_samples(model_set, samples, fold=args.fold, model_path=args.model_path,
                                     data_dir=data_dir)
        scored_by = None
    num_images = sum(len(group) for _, _, group in assignments)
    if num_images == 0:
        raise UserError(f"--data_dir {data_dir}: no image to score with this model"
                        + (f" in fold {args.fold}" if args.fold is not None else ""))
    utils.make_output_dir(output_dir)  # every check passed: a folder that cannot be made fails before the work
    overrides = postprocess_overrides(args)
    pp_by_fold = {str(fold_id): member_postprocess(model_set, member, overrides)
                  for member, fold_id, _ in assignments}
    is_cv = bool(getattr(model_set, "is_cv", False))
    # out-of-fold pairing guarantees unseen test images; otherwise say what folds.json tells
    seen = (training_overlap([s for _, _, group in assignments for s in group], model_set, args.model_path)
            if cross or not is_cv else None)
    if cross:
        protocol = "cross-dataset: every image segmented whole by the same model (out-of-fold does not apply)"
    elif is_cv and args.fold is None:
        protocol = f"out-of-fold: each of the {len(assignments)} fold models scores its own test fold"
    elif args.fold is not None:
        protocol = f"fold {args.fold}: the fold's test images only"
    else:
        protocol = "single model on every image (images it was trained on may be included)"
    if seen is None:
        overlap_text = ("unknown: no folds.json of the training run found, so nothing says whether the model saw "
                        "these images" if (cross or not is_cv) else None)
    elif not seen:
        overlap_text = "the model never saw these images (none of their file names is in the training run's folds.json)"
    else:
        overlap_text = (f"{len(seen)} of these {num_images} images (by file name, e.g. {seen[0]}) are in the training "
                        "run's folds.json: the model may have been trained on them")
    comparable, reason = paper_protocol(model_set, samples, args.fold, bool(args.ignore_vague))
    log.info("scoring %d images (%s)", num_images, protocol)
    if scored_by:
        log.info("scored by: %s", scored_by)
    rows = evaluate_model_set(
        model_set, assignments=assignments, device=device, batch_size=args.batch_size,
        num_workers=args.num_workers, postprocess_overrides=overrides, ignore_vague=args.ignore_vague,
        predictions_dir=output_dir / "predictions" if args.save_predictions else None,
        overlays_dir=output_dir / "overlays" if args.visualize else None,
        progress=not getattr(args, "quiet", False), mpp=getattr(args, "data_mpp", None))
    meta = {
        "model_path": str(args.model_path), "data_dir": str(data_dir), "protocol": protocol,
        "comparable": comparable and not cross, "comparable_reason": reason, "fold": args.fold,
        "ignore_vague": bool(args.ignore_vague), "ambiguous_regions": vague_protocol(bool(args.ignore_vague)),
        "postprocess": _shared_or_per_fold(pp_by_fold), "postprocess_overrides": overrides,
        "model_config": getattr(model_set, "config", None),
        "folds": [m.fold for m in model_set.members], "seconds": round(time.perf_counter() - start, 1),
        "data_format": getattr(args, "data_format", "auto"), "mpp": getattr(args, "data_mpp", None),
        "cross_dataset": cross, "scored_by": scored_by, "training_overlap": overlap_text,
        "never_seen": None if seen is None else not seen,
    }
    summary = write_reports(rows, output_dir, meta)
    if args.plot:
        write_plots(rows, output_dir / "plots", args.model_path)
    overall = summary["overall"]
    across = summary.get("across_folds")
    line = (f"{len(rows)} images: PQ {_fmt(overall['pq'])}, AJI {_fmt(overall['aji'])}, "
            f"Dice {_fmt(overall['dice'])} (mean over images), pooled PQ {_fmt(summary['pooled']['pooled_pq'])}")
    if across:
        line += f"; across folds PQ {_fmt(across['pq']['mean'])} ± {_fmt(across['pq']['sd'])}"
    print(line)
    extras = [name for name, on in (("predictions/", args.save_predictions), ("overlays/", args.visualize),
                                    ("plots/", args.plot)) if on]
    print(f"results in {output_dir}: per_image.csv, per_tissue.csv, summary.json, summary.md"
          + (", " + ", ".join(extras) if extras else ""))
    return 0
