"""Tests of metrics.py: hand-worked cases, empty maps, ambiguous regions, a slow reference, aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import metrics
from utils import UserError


# ----------------------------------------------------------------------------------------------
# Slow reference written straight from the definitions (one mask per nucleus, plain loops)
# ----------------------------------------------------------------------------------------------
def reference_metrics(true: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    true = true.copy()
    pred = pred.copy()
    valid = np.ones(true.shape, dtype=bool)
    if ignore is not None:
        for labels in (true, pred):
            for k in [k for k in np.unique(labels) if k != 0]:
                mask = labels == k
                if (mask & ignore).sum() >= 0.25 * mask.sum():
                    labels[mask] = 0
        valid = ~ignore
    t_ids = [k for k in np.unique(true) if k != 0]
    p_ids = [k for k in np.unique(pred) if k != 0]
    t_masks = [true == k for k in t_ids]
    p_masks = [pred == k for k in p_ids]
    if not t_ids or not p_ids:
        s = 1.0 if not t_ids and not p_ids else 0.0
        return {"pq": s, "aji": s, "aji_plus": s, "dice": s, "tp": 0, "fp": len(p_ids), "fn": len(t_ids)}

    tf, pf = (true > 0) & valid, (pred > 0) & valid
    dice = 2 * (tf & pf).sum() / (tf.sum() + pf.sum())
    iou_fg = (tf & pf).sum() / (tf | pf).sum()

    nt, npr = len(t_ids), len(p_ids)
    inter = np.zeros((nt, npr))
    union = np.zeros((nt, npr))
    for i, tm in enumerate(t_masks):
        for j, pm in enumerate(p_masks):
            inter[i, j] = (tm & pm).sum()
            union[i, j] = (tm | pm).sum()
    iou = inter / union

    # AJI (Kumar): best prediction per true nucleus among those it overlaps, first (lowest id) on ties.
    c = u = 0.0
    used = set()
    for i in range(nt):
        best_j, best_iou = None, 0.0
        for j in range(npr):
            if iou[i, j] > best_iou:
                best_j, best_iou = j, iou[i, j]
        if best_j is None:
            u += t_masks[i].sum()
        else:
            c += inter[i, best_j]
            u += union[i, best_j]
            used.add(best_j)
    for j in range(npr):
        if j not in used:
            u += p_masks[j].sum()
    aji = c / u

    # AJI+: Hungarian pairing of maximal total IoU; pairs with no overlap are not pairs.
    rows, cols = linear_sum_assignment(-iou)
    c = u = 0.0
    t_done, p_done = set(), set()
    for i, j in zip(rows, cols):
        if iou[i, j] > 0:
            c += inter[i, j]
            u += union[i, j]
            t_done.add(i)
            p_done.add(j)
    u += sum(t_masks[i].sum() for i in range(nt) if i not in t_done)
    u += sum(p_masks[j].sum() for j in range(npr) if j not in p_done)
    aji_plus = c / u

    # PQ
    pairs = [(i, j) for i in range(nt) for j in range(npr) if iou[i, j] > 0.5]
    tp = len(pairs)
    fp, fn = npr - tp, nt - tp
    rq = tp / (tp + fp / 2 + fn / 2)
    sq = sum(iou[i, j] for i, j in pairs) / tp if tp else 0.0
    return {"dice": dice, "iou": iou_fg, "aji": aji, "aji_plus": aji_plus, "pq": rq * sq, "sq": sq, "rq": rq,
            "tp": tp, "fp": fp, "fn": fn, "precision": tp / npr, "recall": tp / nt}


def random_labels(rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """Small label map of random rectangles and discs (touching/overlapping, later ones on top),
    non-contiguous ids, and sometimes one id reused for two separate pieces."""
    labels = np.zeros((size, size), dtype=np.int32)
    yy, xx = np.mgrid[:size, :size]
    n = rng.integers(0, 8)
    ids = rng.choice(np.arange(1, 60), size=max(n, 1), replace=False)
    for k in ids[:n]:
        if rng.random() < 0.5:
            y, x = rng.integers(0, size, 2)
            h, w = rng.integers(2, 9, 2)
            labels[y:y + h, x:x + w] = k
        else:
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(1.5, 6)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    if n >= 2 and rng.random() < 0.3:  # a multi-piece id: give another nucleus the same id as the first
        labels[labels == ids[1]] = ids[0]
    return labels


def perturb(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """A plausible prediction: shift, relabel with other ids, drop/merge some, add noise blobs."""
    pred = np.roll(labels, shift=tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.int64)
    ids = np.unique(pred[pred > 0])
    new = {k: int(v) for k, v in zip(ids, rng.choice(np.arange(1, 500), size=ids.size, replace=False))}
    for k, v in new.items():
        pred[pred == k] = v + 1000  # ids of the prediction unrelated to the truth's
    pred[pred > 0] -= 1000
    if ids.size >= 2 and rng.random() < 0.3:
        pred[pred == new[ids[1]]] = new[ids[0]]  # a merge
    if ids.size and rng.random() < 0.3:
        pred[pred == new[ids[-1]]] = 0  # a miss
    if rng.random() < 0.5:
        y, x = rng.integers(0, labels.shape[0] - 3, 2)
        pred[y:y + 3, x:x + 4] = 777  # a false positive or a split
    return pred


def assert_matches(result: dict, ref: dict) -> None:
    for key, value in ref.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


# ----------------------------------------------------------------------------------------------
# Hand-worked cases
# ----------------------------------------------------------------------------------------------
def test_identical_maps_with_noncontiguous_ids_score_one():
    true = np.zeros((10, 10), dtype=np.int32)
    true[1:4, 1:4] = 7
    true[5:9, 5:9] = 300
    pred = np.where(true == 7, 2, np.where(true == 300, 9, 0))  # same nuclei, other ids
    r = metrics.instance_metrics(true, pred)
    for name in metrics.METRICS:
        assert r[name] == pytest.approx(1.0), name
    assert (r["tp"], r["fp"], r["fn"], r["num_true"], r["num_pred"]) == (2, 0, 0, 2, 2)
    assert r["iou_sum"] == pytest.approx(2.0)


def test_touching_nuclei_predicted_merged():
    # Truth: two touching 4x4 squares A (cols 0-3) and B (cols 4-7) in rows 0-3 -> areas 16 and 16.
    # Prediction: one 4x8 blob P covering both (area 32).
    true = np.zeros((6, 10), dtype=np.int32)
    true[0:4, 0:4] = 1
    true[0:4, 4:8] = 2
    pred = np.zeros_like(true)
    pred[0:4, 0:8] = 5
    r = metrics.instance_metrics(true, pred)
    # Foreground identical: Dice = IoU = 1.
    assert r["dice"] == pytest.approx(1.0) and r["iou"] == pytest.approx(1.0)
    # IoU(A,P) = 16/32 = 0.5, IoU(B,P) = 0.5: not > 0.5, so no PQ pair. TP=0, FP=1, FN=2.
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)
    assert r["pq"] == 0.0 and r["sq"] == 0.0 and r["rq"] == 0.0
    # AJI: both true nuclei pair with P: C = 16 + 16 = 32, U = 32 + 32 = 64 -> 0.5.
    assert r["aji"] == pytest.approx(0.5)
    # AJI+: P goes to one of them (A): C = 16, U = 32 + area(B)=16 -> 16/48 = 1/3.
    assert r["aji_plus"] == pytest.approx(1 / 3)
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0


def test_split_miss_and_false_positive():
    # Truth: A = 4x6 block (area 24) at rows 0-3, cols 0-5; B = 3x3 (area 9) at rows 6-8, cols 6-8.
    # Prediction: A split into P1 (rows 0-3, cols 0-3, area 16) and P2 (rows 0-3, cols 4-5, area 8);
    # B missed; a false positive F = 2x2 (area 4) at rows 8-9, cols 0-1.
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:4, 0:6] = 10
    true[6:9, 6:9] = 20
    pred = np.zeros_like(true)
    pred[0:4, 0:4] = 3
    pred[0:4, 4:6] = 4
    pred[8:10, 0:2] = 8
    r = metrics.instance_metrics(true, pred)
    # Foreground: |T| = 33, |P| = 28, |T and P| = 24 -> Dice = 48/61, IoU = 24/37.
    assert r["dice"] == pytest.approx(48 / 61)
    assert r["iou"] == pytest.approx(24 / 37)
    # IoU(A,P1) = 16/24 = 2/3 > 0.5 -> TP=1 (P1); FP = P2, F = 2; FN = B = 1.
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)
    # RQ = 1/(1 + 1 + 0.5) = 0.4, SQ = 2/3, PQ = 4/15.
    assert r["rq"] == pytest.approx(0.4)
    assert r["sq"] == pytest.approx(2 / 3)
    assert r["pq"] == pytest.approx(4 / 15)
    assert r["iou_sum"] == pytest.approx(2 / 3)
    # AJI: A-P1: C=16, U=24; B unpaired: U += 9; unused P2 (8) and F (4): U += 12 -> 16/45.
    assert r["aji"] == pytest.approx(16 / 45)
    # AJI+ same pairing here.
    assert r["aji_plus"] == pytest.approx(16 / 45)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 2)
    assert r["f1"] == pytest.approx(0.4)


def test_partial_overlaps_pick_best_prediction():
    # Truth: A = rows 0-3, cols 0-3 (16); B = rows 0-3, cols 4-5 (8).
    # Prediction: P = rows 0-3, cols 0-4 (20), Q = rows 0-3, cols 5-6 (8).
    true = np.zeros((5, 8), dtype=np.int32)
    true[0:4, 0:4] = 1
    true[0:4, 4:6] = 2
    pred = np.zeros_like(true)
    pred[0:4, 0:5] = 1
    pred[0:4, 5:7] = 2
    r = metrics.instance_metrics(true, pred)
    # IoU(A,P) = 16/20 = 0.8; IoU(B,P) = 4/24 = 1/6; IoU(B,Q) = 4/12 = 1/3.
    # AJI: A->P (16/20), B->Q (4/12): C = 20, U = 32 -> 0.625; nothing unused.
    assert r["aji"] == pytest.approx(20 / 32)
    # AJI+: same one-to-one pairing (total IoU 0.8 + 1/3) -> 0.625.
    assert r["aji_plus"] == pytest.approx(20 / 32)
    # PQ: only A-P is above 0.5: TP=1, FP=1 (Q), FN=1 (B): RQ = 0.5, SQ = 0.8 -> PQ = 0.4.
    assert r["pq"] == pytest.approx(0.4)


def test_aji_tie_takes_lowest_prediction_id():
    # True A = 1x4 (cols 0-3). P (id 5) covers cols 0-1, Q (id 9) covers cols 2-3 -> both IoU 0.5.
    true = np.zeros((1, 6), dtype=np.int32)
    true[0, 0:4] = 1
    pred = np.zeros_like(true)
    pred[0, 2:4] = 9
    pred[0, 0:2] = 5
    r = metrics.instance_metrics(true, pred)
    # Pairs with id 5: C = 2, U = 4, plus unused Q (2) -> 2/6.
    assert r["aji"] == pytest.approx(1 / 3)


def test_empty_maps():
    empty = np.zeros((8, 8), dtype=np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 4
    both = metrics.instance_metrics(empty, empty)
    assert all(both[name] == 1.0 for name in metrics.METRICS)
    assert (both["tp"], both["fp"], both["fn"], both["num_true"], both["num_pred"]) == (0, 0, 0, 0, 0)
    no_pred = metrics.instance_metrics(one, empty)
    assert all(no_pred[name] == 0.0 for name in metrics.METRICS)
    assert (no_pred["tp"], no_pred["fp"], no_pred["fn"]) == (0, 0, 1)
    no_true = metrics.instance_metrics(empty, one)
    assert all(no_true[name] == 0.0 for name in metrics.METRICS)
    assert (no_true["tp"], no_true["fp"], no_true["fn"], no_true["num_pred"]) == (0, 1, 0, 1)


def test_ambiguous_region():
    # Truth: A = rows 0-3, cols 0-3 (16); B = rows 0-3, cols 6-9 (16).
    # Ambiguous region: cols 5-9 of rows 0-9 -> B is wholly inside (dropped); A has 0 px inside (kept).
    # Prediction: P = A exactly; R = rows 0-3, cols 4-7 (16 px, 12 inside the region = 75% -> dropped);
    # S = rows 6-9, cols 0-5 (24 px, 4 inside = 1/6 < 25% -> kept, a false positive).
    true = np.zeros((10, 10), dtype=np.int32)
    true[0:4, 0:4] = 1
    true[0:4, 6:10] = 2
    pred = np.zeros_like(true)
    pred[0:4, 0:4] = 1
    pred[0:4, 4:8] = 2
    pred[6:10, 0:6] = 3
    ignore = np.zeros(true.shape, dtype=bool)
    ignore[:, 6:10] = True
    ignore[:, 5] = True
    r = metrics.instance_metrics(true, pred, ignore)
    assert (r["num_true"], r["num_pred"], r["tp"], r["fp"], r["fn"]) == (1, 2, 1, 1, 0)
    # Dice/IoU outside the region: T = A (16); P = A + S minus its 4 px in the region = 16 + 20 = 36.
    assert r["dice"] == pytest.approx(2 * 16 / (16 + 36))
    assert r["iou"] == pytest.approx(16 / 36)
    # PQ: RQ = 1/(1 + 0.5) = 2/3, SQ = 1. AJI: C = 16, U = 16 + 24 (S whole area) = 40.
    assert r["pq"] == pytest.approx(2 / 3)
    assert r["aji"] == pytest.approx(16 / 40)
    # Exactly 25% inside counts as inside: S' with 6 of 24 px in the region is dropped.
    ignore2 = np.zeros(true.shape, dtype=bool)
    ignore2[6:10, 0:6][:1, :] = True  # first row of S: 6 px of 24
    r2 = metrics.instance_metrics(np.zeros_like(true), np.where(pred == 3, 3, 0), ignore2)
    assert r2["num_pred"] == 0 and r2["pq"] == 1.0
    assert metrics.apply_ignore_region(pred, ignore2).max() == 2


def test_bad_input():
    with pytest.raises(UserError):
        metrics.instance_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(UserError):
        metrics.instance_metrics(np.zeros((4, 4), int), np.zeros((4, 4), float))
    with pytest.raises(UserError):
        metrics.instance_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), np.zeros((3, 3), bool))
    with pytest.raises(UserError):
        metrics.instance_metrics(-np.ones((4, 4), int), np.zeros((4, 4), int))


# ----------------------------------------------------------------------------------------------
# Against the slow reference
# ----------------------------------------------------------------------------------------------
def test_matches_reference_on_random_cases():
    rng = np.random.default_rng(1234)
    checked = 0
    for case in range(200):
        true = random_labels(rng)
        pred = perturb(rng, true) if rng.random() < 0.7 else random_labels(rng)
        if case % 40 == 0:  # huge ids take the np.unique path of the id compaction
            pred = np.where(pred > 0, pred.astype(np.int64) + 10**9, 0)
        ignore = None
        if case % 3 == 0:
            ignore = np.zeros(true.shape, dtype=bool)
            y, x = rng.integers(0, 20, 2)
            ignore[y:y + 8, x:x + 10] = True
        assert_matches(metrics.instance_metrics(true, pred, ignore), reference_metrics(true, pred, ignore))
        checked += 1
    assert checked == 200


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def test_aggregation():
    rows = [
        {"tissue": "liver", "fold": 0, "pq": 0.5, "dice": 0.8, "tp": 2, "fp": 1, "fn": 1, "iou_sum": 1.5},
        {"tissue": "liver", "fold": 1, "pq": 0.7, "dice": 0.6, "tp": 0, "fp": 0, "fn": 2, "iou_sum": 0.0},
        {"tissue": "brain", "fold": 1, "pq": 0.9, "dice": 1.0, "tp": 1, "fp": 0, "fn": 0, "iou_sum": 0.9},
    ]
    means = metrics.mean_over_images(rows, names=("pq", "dice"))
    assert means["pq"] == pytest.approx(0.7) and means["dice"] == pytest.approx(0.8)
    groups = metrics.group_means(rows, "tissue", names=("pq",))
    assert [g["tissue"] for g in groups] == ["brain", "liver"]
    assert groups[1]["n"] == 2 and groups[1]["pq"] == pytest.approx(0.6)
    # Pooled over liver: TP=2, FP=1, FN=3, IoU sum 1.5 -> RQ = 2/(2+2) = 0.5, SQ = 0.75, PQ = 0.375.
    assert groups[1]["pooled_pq"] == pytest.approx(0.375)
    pooled = metrics.pooled_pq(rows)
    # All: TP=3, FP=1, FN=3, sum 2.4 -> RQ = 3/5, SQ = 0.8, PQ = 0.48.
    assert pooled["pooled_rq"] == pytest.approx(0.6)
    assert pooled["pooled_sq"] == pytest.approx(0.8)
    assert pooled["pooled_pq"] == pytest.approx(0.48)
    mean, sd = metrics.mean_sd([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and sd == pytest.approx(0.2)  # ddof=1
    assert math.isnan(metrics.mean_sd([0.4])[1])
    assert metrics.group_means(rows, "fold", names=("pq",))[1]["n"] == 2


def test_rows_from_instance_metrics_aggregate():
    true = np.zeros((8, 8), dtype=np.int32)
    true[1:4, 1:4] = 1
    r1 = metrics.instance_metrics(true, true)
    r2 = metrics.instance_metrics(true, np.zeros_like(true))
    means = metrics.mean_over_images([r1, r2])
    assert set(means) == set(metrics.METRICS)
    assert means["pq"] == pytest.approx(0.5)
    # Pooled: TP=1, FP=0, FN=1, sum 1 -> RQ = 2/3, SQ = 1.
    assert metrics.pooled_pq([r1, r2])["pooled_pq"] == pytest.approx(2 / 3)
