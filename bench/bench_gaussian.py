"""The watershed mosaics' Gaussian: scipy's `ndi.gaussian_filter` against `postprocess._gaussian_filter`.

    python bench/bench_gaussian.py [--work /tmp/cpu/bs4096] [--repeats 7]

Input: the realistic maps of `bench/bench_cpu_side.py` (real NuInsSeg nuclei, about 4,500 per mm²; written there
first if `--work` has none). Three 2176² crops (a slide region with its margin) go through `postprocess.postprocess`
with `_gaussian_filter` watched, which gives the surfaces it smooths (the watershed's mosaics of component boxes);
each is then smoothed by both, one thread, CPU seconds, best of `--repeats` (the two alternate), and the results
are compared bit for bit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/cpu/bs4096", help="folder of bench_cpu_side.py's input")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from scipy import ndimage as ndi

    import postprocess as pp

    work = Path(args.work)
    if not (work / "fg.npy").is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_cpu_side

        work.mkdir(parents=True, exist_ok=True)
        bench_cpu_side.make_input(work, 4096)
    fg_all = np.load(work / "fg.npy", mmap_mode="r")
    hv_all = np.load(work / "hv.npy", mmap_mode="r")
    surfaces, ours = [], pp._gaussian_filter

    def watched(image, sigma):
        surfaces.append((np.array(image), float(sigma)))
        return ours(image, sigma)

    side, origins = 2176, ((960, 960), (0, 0), (1900, 1500))
    pp._gaussian_filter = watched
    try:
        for y0, x0 in origins:
            pp.postprocess(np.array(fg_all[y0:y0 + side, x0:x0 + side]),
                           np.array(hv_all[:, y0:y0 + side, x0:x0 + side]), pp.PostprocessConfig())
    finally:
        pp._gaussian_filter = ours
    clock = time.process_time
    best = [1e9, 1e9]
    same = True
    for _ in range(args.repeats):
        times = [0.0, 0.0]
        for image, sigma in surfaces:
            t = clock()
            ref = ndi.gaussian_filter(image, sigma)
            times[0] += clock() - t
            t = clock()
            got = ours(image, sigma)
            times[1] += clock() - t
            same &= bool(np.array_equal(ref, got))
        best = [min(a, b) for a, b in zip(best, times)]
    pixels = sum(image.size for image, _ in surfaces)
    crops = len(origins)
    print(f"{len(surfaces)} mosaics on {crops} crops of {side}², {pixels / crops / side ** 2:.2f} crop areas per crop; "
          f"best of {args.repeats}, one thread")
    print(f"per crop: ndi.gaussian_filter {best[0] / crops * 1e3:.1f} ms, _gaussian_filter {best[1] / crops * 1e3:.1f} ms "
          f"({best[0] / max(best[1], 1e-9):.2f}x); per pixel {best[0] / pixels * 1e9:.2f} and {best[1] / pixels * 1e9:.2f} ns; "
          f"identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
