"""Time `metrics.instance_metrics` on synthetic 512x512 tiles with about 150 nuclei.

Usage: python bench/bench_metrics.py [--repeats 50] [--nuclei 150] [--size 512]
Prints the median wall time per call (all metrics of one tile) and the mean CPU time (less sensitive to
other jobs sharing the cores), with and without an ambiguous-region mask.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402


def synthetic_tile(rng: np.random.Generator, size: int, nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    """A ground truth of random ellipses (some touching, later ids drawn on top) and a perturbed prediction."""
    yy, xx = np.mgrid[:size, :size]
    true = np.zeros((size, size), dtype=np.int32)
    ids = rng.choice(np.arange(1, 10 * nuclei), size=nuclei, replace=False)  # non-contiguous ids
    for k in ids:
        cy, cx = rng.uniform(0, size, 2)
        a, b = rng.uniform(5, 14, 2)
        t = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - 15, 0)), int(min(cy + 16, size))
        x0, x1 = int(max(cx - 15, 0)), int(min(cx + 16, size))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        true[y0:y1, x0:x1][(u / a) ** 2 + (v / b) ** 2 <= 1] = k
    # Prediction: shifted by a pixel, per-object grown or shrunk, some nuclei missed, some false positives.
    pred = np.roll(true, shift=(1, -1), axis=(0, 1))
    grown = ndi.grey_dilation(pred, size=3)
    pred = np.where((pred == 0) & (rng.random(pred.shape) < 0.5), grown, pred)
    drop = rng.choice(ids, size=nuclei // 10, replace=False)
    pred[np.isin(pred, drop)] = 0
    for k in range(nuclei // 10):
        cy, cx = rng.integers(8, size - 8, 2)
        pred[cy - 5:cy + 5, cx - 5:cx + 5] = 100_000 + k
    return true, pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--nuclei", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    tiles = [synthetic_tile(rng, args.size, args.nuclei) for _ in range(5)]
    ignore = np.zeros((args.size, args.size), dtype=bool)
    ignore[: args.size // 4, : args.size // 4] = True
    for label, mask in (("no ambiguous region", None), ("with ambiguous region", ignore)):
        times, cpu = [], []
        for r in range(args.repeats):
            true, pred = tiles[r % len(tiles)]
            t0, c0 = time.perf_counter(), time.process_time()
            result = metrics.instance_metrics(true, pred, mask)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(f"{args.size}x{args.size}, {result['num_true']} true / {result['num_pred']} predicted nuclei, "
              f"{label}: median {1000 * np.median(times):.2f} ms, min {1000 * np.min(times):.2f} ms "
              f"over {args.repeats} calls, CPU time mean {1000 * np.mean(cpu):.2f} ms "
              f"(PQ {result['pq']:.3f}, AJI {result['aji']:.3f})")


if __name__ == "__main__":
    main()
