"""`postprocess.postprocess` alone, old tree vs this tree, CPU seconds on one thread (issue 17, point 4).

    OMP_NUM_THREADS=1 python bench/bench_postprocess.py --old /tmp/cpu3/base --maps /tmp/cpu/bs4096 [--repeats 5]

`--maps`: a folder made by `bench/bench_cpu_side.py` (`fg.npy`, `hv.npy`: realistic maps of real NuInsSeg nuclei
on a 4096² slide at 0.25 µm/px). The crops are those `predict` post-processes: regions of 2048 with the 128-px
margin (2176² inside the slide). Both trees' `postprocess` modules are loaded in this one process and called in
turn, old, new, old, new, ... on each crop (`time.process_time`, best of `--repeats`), with the default
`PostprocessConfig` and optionally `--noise` (Gaussian noise added to the foreground: specks, holes, nuclei without a
marker core); the label maps of the two trees are compared pixel for pixel. Prints per crop and in total (s per mm²
of the slide).

Sparse tissue: `--edge F` keeps the foreground only on the left F of the slide's width (a tissue edge: the crops
to the right are empty, the others partly); `--thin F` keeps each nucleus (connected region of foreground > 0.05)
with probability F (scattered nuclei, as in stroma: F = 0.1 gives about 450 nuclei/mm²).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.25


def load(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, tree / "postprocess.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the old tree (a checkout)")
    parser.add_argument("--maps", type=Path, required=True, help="folder with fg.npy and hv.npy (bench_cpu_side)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.0, help="sigma of noise added to the foreground")
    parser.add_argument("--edge", type=float, default=1.0, help="keep the foreground on this share of the width")
    parser.add_argument("--thin", type=float, default=1.0, help="keep each nucleus with this probability")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    new, old = load(ROOT, "postprocess_new"), load(args.old, "postprocess_old")
    fg_all = np.load(args.maps / "fg.npy", mmap_mode="r")
    hv_all = np.load(args.maps / "hv.npy", mmap_mode="r")
    side = fg_all.shape[0]
    region, margin = 2048, 128
    totals = {"old": 0.0, "new": 0.0}
    print("| crop | instances | old s | new s | old / new | identical |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for y in range(0, side, region):
        for x in range(0, side, region):
            box = (slice(max(y - margin, 0), min(y + region + margin, side)),
                   slice(max(x - margin, 0), min(x + region + margin, side)))
            fg = np.array(fg_all[box])
            fg[:, max(int(args.edge * side) - box[1].start, 0):] = 0
            if args.thin < 1:
                from scipy import ndimage as ndi
                nuclei, n = ndi.label(fg > 0.05)
                keep = np.random.default_rng(y * side + x).random(n + 1) < args.thin
                keep[0] = False
                fg = np.where(keep[nuclei], fg, 0).astype(np.float32)
            if args.noise > 0:
                fg = np.clip(fg + rng.normal(0, args.noise, fg.shape).astype(np.float32), 0, 1)
            hv = np.array(hv_all[(slice(None),) + box])
            best = {"old": np.inf, "new": np.inf}
            out = {}
            for _ in range(args.repeats):
                for label, module in (("old", old), ("new", new)):
                    t = time.process_time()
                    out[label] = module.postprocess(fg, hv, module.PostprocessConfig())
                    best[label] = min(best[label], time.process_time() - t)
            same = bool(np.array_equal(out["old"], out["new"]))
            for label in totals:
                totals[label] += best[label]
            print(f"| ({box[0].start}, {box[1].start}) {fg.shape[0]}x{fg.shape[1]} | {int(out['new'].max())} | "
                  f"{best['old']:.3f} | {best['new']:.3f} | {best['old'] / best['new']:.2f}x | {same} |", flush=True)
            if not same:
                print("label maps differ", file=sys.stderr)
                return 1
    mm2 = (side * MPP / 1000) ** 2
    print(f"| all ({mm2:.2f} mm²) | | {totals['old'] / mm2:.2f} s/mm² | {totals['new'] / mm2:.2f} s/mm² | "
          f"{totals['old'] / totals['new']:.2f}x | True |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
