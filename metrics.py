"""Segmentation scores for nuclei instance label maps, and how to aggregate them over images.

`instance_metrics(true, pred)` scores one image: binary foreground Dice and IoU, AJI, AJI+, PQ/SQ/RQ and
detection precision/recall/F1. The definitions are those of HoVer-Net's evaluation (the ones the NuInsSeg
authors used); `docs/metrics.md` states them precisely, with the conventions for empty maps and for
ambiguous ("vague") regions.

Every pairwise overlap between true and predicted nuclei comes from a single joint histogram of the
(compacted) label pairs over the pixels, so scoring a 512x512 tile with ~150 nuclei takes a few
milliseconds; no per-nucleus mask is ever built.

Aggregation follows the NuInsSeg convention: a score of a set of images is the mean over images of the
per-image score (`mean_over_images`, `group_means` per tissue or fold, `mean_sd` over folds); the
dataset-pooled PQ (`pooled_pq`, true/false positives and IoU sums added over images) is an extra column.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from utils import UserError

# Per-image scores (the columns averaged over images).
METRICS: tuple[str, ...] = ("dice", "iou", "aji", "aji_plus", "pq", "sq", "rq", "precision", "recall", "f1")
# Per-image counts (summed, not averaged, when pooling).
COUNTS: tuple[str, ...] = ("tp", "fp", "fn", "iou_sum", "num_true", "num_pred")

PQ_MATCH_IOU = 0.5          # a true/predicted pair counts for PQ when its IoU is strictly above this
IGNORE_MIN_FRACTION = 0.25  # a nucleus with at least this fraction of its area in an ambiguous region is dropped


# ----------------------------------------------------------------------------------------------
# Label compaction and the joint histogram
# ----------------------------------------------------------------------------------------------
def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the ids of `labels` to 0..n (0 stays background, ids in increasing order). Returns (idx, n)."""
    flat = labels.ravel()
    if flat.size == 0:
        return flat.astype(np.int64), 0
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0:
        raise UserError(f"label map: negative id {lo} (ids must be >= 0, 0 = background)")
    if hi <= max(4 * flat.size, 1 << 16):
        # Small ids: a lookup table built from one bincount (much faster than sorting the pixels).
        present = np.bincount(flat, minlength=hi + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)
        lut[0] = 0
        return np.take(lut, flat), int(lut[-1])
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if ids[0] != 0:
        inverse += 1
    return inverse, int(ids.size - (1 if ids[0] == 0 else 0))


def _check_pair(true: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None) -> tuple:
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.ndim != 2 or pred.ndim != 2:
        raise UserError(f"instance_metrics: label maps must be 2-D, got {true.shape} and {pred.shape}")
    if true.shape != pred.shape:
        raise UserError(f"instance_metrics: ground truth {true.shape} and prediction {pred.shape} differ in size")
    for name, arr in (("ground truth", true), ("prediction", pred)):
        if arr.dtype.kind not in "iub":
            raise UserError(f"instance_metrics: {name} labels must be integers, got {arr.dtype}")
    if ignore is not None:
        ignore = np.asarray(ignore).astype(bool, copy=False)
        if ignore.shape != true.shape:
            raise UserError(f"instance_metrics: ambiguous-region mask {ignore.shape} and labels {true.shape} "
                            "differ in size")
        if not ignore.any():
            ignore = None
    # np.bincount takes every integer type that casts safely to intp as it is (no copy); others go to int64.
    true = true if np.can_cast(true.dtype, np.intp) else true.astype(np.int64)
    pred = pred if np.can_cast(pred.dtype, np.intp) else pred.astype(np.int64)
    return true, pred, ignore


def _drop_ambiguous(idx: np.ndarray, n: int, ignore_flat: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove nuclei with >= 25% of their area inside the ambiguous region; recompact the rest."""
    area = np.bincount(idx, minlength=n + 1)
    inside = np.bincount(idx[ignore_flat], minlength=n + 1)
    keep = inside < IGNORE_MIN_FRACTION * area
    keep[0] = True
    lut = np.zeros(n + 1, dtype=np.int64)
    kept = np.flatnonzero(keep[1:]) + 1
    lut[kept] = np.arange(1, kept.size + 1)
    return np.take(lut, idx), int(kept.size)


def apply_ignore_region(labels: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """`labels` with every nucleus that has >= 25% of its area inside `ignore` set to 0 (ids kept)."""
    labels = np.asarray(labels)
    ignore = np.asarray(ignore, dtype=bool)
    if labels.dtype.kind not in "iub":
        raise UserError(f"apply_ignore_region: labels must be integers, got {labels.dtype}")
    idx, n = _compact(labels.astype(np.int64, copy=False))
    new_idx, _ = _drop_ambiguous(idx, n, ignore.ravel())
    out = labels.copy()
    out.ravel()[new_idx == 0] = 0
    return out


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------
def _empty_result(num_true: int, num_pred: int) -> dict[str, Any]:
    """Scores when at least one of the two maps has no nucleus (left): 1 if both are empty, else 0."""
    score = 1.0 if num_true == 0 and num_pred == 0 else 0.0
    result: dict[str, Any] = {name: score for name in METRICS}
    result.update(tp=0, fp=num_pred, fn=num_true, iou_sum=0.0, num_true=num_true, num_pred=num_pred)
    return result


def instance_metrics(true: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, Any]:
    """All scores of one predicted instance label map `pred` against the ground truth `true`.

    Both maps are integer arrays of the same shape, 0 = background, ids arbitrary (a nucleus may consist
    of several disconnected pieces). `ignore` is an optional boolean mask of ambiguous regions: a nucleus
    (true or predicted) with at least 25% of its area inside it is removed from its own map, and the
    remaining pixels inside it do not count for Dice/IoU.

    Returns a dict with the scores of `METRICS` (dice, iou, aji, aji_plus, pq, sq, rq, precision, recall,
    f1) and the counts tp, fp, fn, iou_sum (sum of the IoUs of the PQ pairs), num_true, num_pred.
    If both maps are empty every score is 1; if exactly one is empty every score is 0.
    """
    true, pred, ignore = _check_pair(true, pred, ignore)
    t_idx, n_true = _compact(true)
    p_idx, n_pred = _compact(pred)
    if ignore is not None:
        ignore_flat = ignore.ravel()
        t_idx, n_true = _drop_ambiguous(t_idx, n_true, ignore_flat)
        p_idx, n_pred = _drop_ambiguous(p_idx, n_pred, ignore_flat)
        valid = ~ignore_flat
    # The joint histogram: joint[i, j] = number of pixels with compacted true id i and predicted id j.
    joint = np.bincount(t_idx * (n_pred + 1) + p_idx,
                        minlength=(n_true + 1) * (n_pred + 1)).reshape(n_true + 1, n_pred + 1)

    # Binary foreground Dice / IoU. Pixels inside the ambiguous region are left out of them; the nuclei
    # kept have their whole area counted for the instance scores.
    if ignore is not None:
        t_fg, p_fg = (t_idx > 0) & valid, (p_idx > 0) & valid
        fg_true, fg_pred = int(np.count_nonzero(t_fg)), int(np.count_nonzero(p_fg))
        fg_inter = int(np.count_nonzero(t_fg & p_fg))
    else:
        fg_true = int(joint[1:, :].sum())
        fg_pred = int(joint[:, 1:].sum())
        fg_inter = int(joint[1:, 1:].sum())

    if n_true == 0 or n_pred == 0:
        return _empty_result(n_true, n_pred)

    dice = 2.0 * fg_inter / (fg_true + fg_pred) if fg_true + fg_pred else 1.0
    fg_union = fg_true + fg_pred - fg_inter
    iou_fg = fg_inter / fg_union if fg_union else 1.0

    inter = joint[1:, 1:].astype(np.float64)                 # (n_true, n_pred)
    area_true = joint[1:, :].sum(axis=1).astype(np.float64)
    area_pred = joint[:, 1:].sum(axis=0).astype(np.float64)
    union = area_true[:, None] + area_pred[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)
    rows = np.arange(n_true)

    # AJI: each true nucleus with the prediction of highest IoU among those it overlaps (first on ties).
    best = np.argmax(iou, axis=1)
    paired = iou[rows, best] > 0
    pt, pp = rows[paired], best[paired]
    used_pred = np.zeros(n_pred, dtype=bool)
    used_pred[pp] = True
    aji_inter = inter[pt, pp].sum()
    aji_union = union[pt, pp].sum() + area_true[~paired].sum() + area_pred[~used_pred].sum()
    aji = aji_inter / aji_union

    # AJI+: one-to-one pairing of maximal total IoU (Hungarian), pairs without overlap dropped.
    hr, hc = linear_sum_assignment(-iou)
    keep = iou[hr, hc] > 0
    hr, hc = hr[keep], hc[keep]
    t_used = np.zeros(n_true, dtype=bool)
    t_used[hr] = True
    p_used = np.zeros(n_pred, dtype=bool)
    p_used[hc] = True
    ajip_union = union[hr, hc].sum() + area_true[~t_used].sum() + area_pred[~p_used].sum()
    aji_plus = inter[hr, hc].sum() / ajip_union

    # PQ: pairs with IoU > 0.5 (necessarily one-to-one).
    match_t, match_p = np.nonzero(iou > PQ_MATCH_IOU)
    tp = int(match_t.size)
    fp = n_pred - tp
    fn = n_true - tp
    iou_sum = float(iou[match_t, match_p].sum())
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    precision = tp / n_pred
    recall = tp / n_true

    return {
        "dice": float(dice), "iou": float(iou_fg), "aji": float(aji), "aji_plus": float(aji_plus),
        "pq": float(rq * sq), "sq": float(sq), "rq": float(rq),
        "precision": float(precision), "recall": float(recall), "f1": float(rq),
        "tp": tp, "fp": fp, "fn": fn, "iou_sum": iou_sum, "num_true": n_true, "num_pred": n_pred,
    }


# ----------------------------------------------------------------------------------------------
# Aggregation over images
# ----------------------------------------------------------------------------------------------
def _finite_mean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if v is not None and v != "" and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def mean_over_images(rows: Sequence[Mapping[str, Any]], names: Sequence[str] = METRICS) -> dict[str, float]:
    """Mean over images of each per-image score (the NuInsSeg convention); NaN when there are no rows."""
    return {name: _finite_mean(row[name] for row in rows if name in row) for name in names}


def pooled_pq(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """PQ/SQ/RQ of the whole set with TP, FP, FN and matched-IoU sums pooled over images.

    Returns {"pooled_pq", "pooled_sq", "pooled_rq"}; 1.0 each when no image has any nucleus at all.
    """
    tp = sum(int(r["tp"]) for r in rows)
    fp = sum(int(r["fp"]) for r in rows)
    fn = sum(int(r["fn"]) for r in rows)
    iou_sum = sum(float(r["iou_sum"]) for r in rows)
    if tp + fp + fn == 0:
        return {"pooled_pq": 1.0 if rows else float("nan"), "pooled_sq": 1.0 if rows else float("nan"),
                "pooled_rq": 1.0 if rows else float("nan")}
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return {"pooled_pq": rq * sq, "pooled_sq": sq, "pooled_rq": rq}


def group_means(rows: Sequence[Mapping[str, Any]], key: str,
                names: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Per value of `rows[i][key]` (e.g. "tissue" or "fold"): {key: value, "n": images, <score>: mean, ...}.

    Groups come in sorted order of the key value; each also gets the pooled PQ columns when the rows
    carry the counts.
    """
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        if key not in row:
            raise UserError(f"group_means: a row has no {key!r} column")
        groups.setdefault(row[key], []).append(row)
    out = []
    for value in sorted(groups, key=lambda v: (str(type(v)), v)):
        members = groups[value]
        entry: dict[str, Any] = {key: value, "n": len(members)}
        entry.update(mean_over_images(members, names))
        if all(all(c in r for c in ("tp", "fp", "fn", "iou_sum")) for r in members):
            entry.update(pooled_pq(members))
        out.append(entry)
    return out


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1) of e.g. per-fold scores; sd is NaN for one value."""
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    if vals.size == 0:
        return float("nan"), float("nan")
    mean = float(vals.mean())
    sd = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
    return mean, sd
