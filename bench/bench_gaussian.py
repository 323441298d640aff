"""The watershed mosaics' Gaussian: scipy's `ndi.gaussian_filter` against the same two passes with the one along the
columns in bands of rows (as `postprocess._correlate1d` makes the edge energy's).

    python bench/bench_gaussian.py [--work /tmp/cpu/bs4096] [--repeats 7]

Input: the realistic maps of `bench/bench_cpu_side.py` (real NuInsSeg nuclei, about 4,500 per mm²; written there
first if `--work` has none). Three 2176² crops (a slide region with its margin) go through `postprocess.postprocess`
with `ndi.gaussian_filter` watched, which gives the surfaces it smooths (the watershed's mosaics of component boxes,
2**17 pixels at most each); each is then smoothed both ways, and a whole 2176² crop of energy-like values too, one
thread, CPU seconds, best of `--repeats` (the two alternate), and the results are compared bit for bit. (Measured,
2026-12-02: banded, 43-48 instead of 60-72 ms on the whole crop, but 19.4 instead of 17.9 ms per crop on the mosaics,
which are small enough for scipy's column pass to stay in the caches: not taken.)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_cpu_side  # noqa: E402  (the input and crops shared by the benches of single steps)


def main() -> None:
    args = bench_cpu_side.single_step_arguments(__doc__.splitlines()[0], repeats=7)
    from scipy import ndimage as ndi

    import postprocess as pp

    work = bench_cpu_side.bench_input(args.work)
    surfaces, gaussian = [], ndi.gaussian_filter

    def watched(image, sigma, *rest, **options):
        surfaces.append((np.array(image), float(sigma)))
        return gaussian(image, sigma, *rest, **options)

    pp.ndi.gaussian_filter = watched
    try:
        crops = bench_cpu_side.postprocess_crops(work)
    finally:
        pp.ndi.gaussian_filter = gaussian
    side = bench_cpu_side.CROP_SIDE
    band = 48

    def ours(image, sigma):
        """`ndi.gaussian_filter(image, sigma)`: its pass along the columns on bands of `band` rows, each with the
        Gaussian's reach of rows around it (only the band's own rows kept), then the pass along the rows."""
        reach = max(int(4.0 * sigma + 0.5), 1)
        h = image.shape[0]
        if h <= 2 * band:
            smoothed = ndi.gaussian_filter1d(image, sigma, axis=0)
        else:
            smoothed = np.empty_like(image)
            for start in range(0, h, band):
                stop = min(start + band, h)
                y0, y1 = max(start - reach, 0), min(stop + reach, h)
                smoothed[start:stop] = ndi.gaussian_filter1d(image[y0:y1], sigma, axis=0)[start - y0:stop - y0]
        return ndi.gaussian_filter1d(smoothed, sigma, axis=1)

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
    fg_all = np.load(work / "fg.npy", mmap_mode="r")
    hv_all = np.load(work / "hv.npy", mmap_mode="r")
    whole = np.array(pp.edge_energy(np.array(hv_all[:, :side, :side]), np.array(fg_all[:side, :side]) > 0.5))
    best_whole = [1e9, 1e9]
    for _ in range(args.repeats):
        for i, f in enumerate((lambda: ndi.gaussian_filter(whole, 1.0), lambda: ours(whole, 1.0))):
            t = clock()
            f()
            best_whole[i] = min(best_whole[i], clock() - t)
    same &= bool(np.array_equal(ndi.gaussian_filter(whole, 1.0), ours(whole, 1.0)))
    print(f"{len(surfaces)} mosaics on {crops} crops of {side}², {pixels / crops / side ** 2:.2f} crop areas per crop; "
          f"best of {args.repeats}, one thread")
    print(f"mosaics per crop: ndi.gaussian_filter {best[0] / crops * 1e3:.1f} ms, banded {best[1] / crops * 1e3:.1f} ms "
          f"({best[0] / max(best[1], 1e-9):.2f}x); per pixel {best[0] / pixels * 1e9:.2f} and {best[1] / pixels * 1e9:.2f} ns; "
          f"identical: {'yes' if same else 'NO'}")
    print(f"a whole {side}² crop: ndi.gaussian_filter {best_whole[0] * 1e3:.1f} ms, banded {best_whole[1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
