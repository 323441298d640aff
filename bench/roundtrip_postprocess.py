"""Round trip of the HV post-processing on real ground truth.

For every label map of a NuInsSeg folder, the ideal network outputs are built from the labels themselves
(foreground = labels > 0, HV maps = `dataset.hv_targets(labels)`), turned back into instances with
`postprocess.hv_to_instances` (default `PostprocessConfig`) and scored against the labels. A perfect
post-processing would give PQ = AJI = 1; what it loses shows what the watershed cannot recover.

Usage: python bench/roundtrip_postprocess.py [DATA_DIR] [--threshold 0.95]
(DATA_DIR defaults to ../shared/data/nuinsseg_sample). Prints mean PQ/AJI over images, the median time
per image, and every image below the threshold with the reasons: true nuclei in several disconnected
pieces (one id, several pieces: watershed gives one instance per piece), nuclei smaller than `min_area`,
true nuclei merged into a neighbour's instance, others, and recovered instances that match nothing
(pieces split off a nucleus).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))
import dataset  # noqa: E402
import metrics  # noqa: E402
import postprocess  # noqa: E402


def roundtrip(labels: np.ndarray, config: postprocess.PostprocessConfig) -> tuple[np.ndarray, float, float]:
    """Instances recovered from the ideal maps of `labels`, and the wall and CPU seconds the
    post-processing took."""
    foreground = (labels > 0).astype(np.float32)
    hv = dataset.hv_targets(labels)
    t0, c0 = time.perf_counter(), time.process_time()
    pred = postprocess.postprocess(foreground, hv, config)
    return pred, time.perf_counter() - t0, time.process_time() - c0


def diagnose(labels: np.ndarray, pred: np.ndarray, min_area: int) -> dict[str, int]:
    """Count the true nuclei a round trip cannot or did not recover, by cause."""
    ids = np.unique(labels[labels > 0])
    multi_piece = tiny = merged = other = 0
    for k in ids:
        mask = labels == k
        _, pieces = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
        if pieces > 1:
            multi_piece += 1
            continue
        if mask.sum() < min_area:
            tiny += 1
            continue
        # The prediction that covers most of this nucleus: is it a match (IoU > 0.5)?
        hit = np.bincount(pred[mask]).astype(np.float64)
        hit[0] = 0
        j = int(hit.argmax())
        if j == 0:
            other += 1
            continue
        union = mask.sum() + (pred == j).sum() - hit[j]
        if hit[j] / union > 0.5:
            continue
        if len(np.unique(labels[(pred == j) & (labels > 0)])) > 1:
            merged += 1
        else:
            other += 1
    return {"multi_piece": multi_piece, "tiny": tiny, "merged": merged, "other": other}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", default=str(PROJECT_DIR.parent / "shared" / "data" / "nuinsseg_sample"))
    parser.add_argument("--threshold", type=float, default=0.95, help="report images with PQ or AJI below this")
    args = parser.parse_args(argv)
    config = postprocess.PostprocessConfig()
    samples = dataset.discover_nuinsseg(args.data_dir)
    rows, times, cpu = [], [], []
    for sample in samples:
        _, labels, _ = dataset.load_sample(sample)
        pred, seconds, cpu_seconds = roundtrip(labels, config)
        times.append(seconds)
        cpu.append(cpu_seconds)
        row = metrics.instance_metrics(labels, pred)
        row["image"] = sample.rel_path
        row["labels"], row["pred"] = labels, pred
        rows.append(row)
    means = metrics.mean_over_images(rows)
    pooled = metrics.pooled_pq(rows)
    print(f"{len(rows)} images, default PostprocessConfig: {config.to_dict()}")
    print(f"mean PQ {means['pq']:.4f}  mean AJI {means['aji']:.4f}  mean AJI+ {means['aji_plus']:.4f}  "
          f"mean Dice {means['dice']:.4f}  pooled PQ {pooled['pooled_pq']:.4f}")
    print(f"post-processing time per image: median {1000 * np.median(times):.1f} ms, "
          f"max {1000 * np.max(times):.1f} ms; CPU time median {1000 * np.median(cpu):.1f} ms")
    short = [r for r in rows if r["pq"] < args.threshold or r["aji"] < args.threshold]
    print(f"{len(short)} image(s) with PQ or AJI below {args.threshold}:")
    for r in short:
        why = diagnose(r["labels"], r["pred"], config.min_area)
        reasons = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in why.items() if v) or "none"
        extra = f"; {r['fp']} unmatched recovered instance(s): split-off pieces" if r["fp"] else ""
        print(f"  {r['image']}: PQ {r['pq']:.3f} AJI {r['aji']:.3f} ({r['num_true']} true, {r['num_pred']} "
              f"recovered, {r['tp']} matched; unrecovered true nuclei: {reasons}{extra})")
    return {"pq": means["pq"], "aji": means["aji"]}


if __name__ == "__main__":
    main()
