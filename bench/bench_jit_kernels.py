"""Each compiled kernel of `jit_kernels` against the library path it stands in for, on the post-processing's real
inputs: the three 2176² region crops of bench_cpu_side.py's slide (real NuInsSeg nuclei, about 4,500 per mm²).

    python bench/bench_jit_kernels.py [--work /tmp/cpu/bs4096] [--repeats 5]

One process, one thread (set OMP_NUM_THREADS=1 for a figure per core); the two paths alternate and each figure is
the best of `--repeats`, in ms per crop. Rows: the edge energy (`postprocess.edge_energy`, scipy's banded path vs
the fused kernel), the bounding boxes of the components and of the holes (`ndi.find_objects` vs
`jit_kernels.find_objects`), the watershed mosaics' Gaussian (`ndi.gaussian_filter` vs `jit_kernels.gaussian_filter`
on the mosaics the crop's post-processing smooths), the measurements' per-nucleus sums (`export.measure_nuclei` of
the crop's instances with the crop's maps, numpy's `bincount`s vs `jit_kernels.instance_sums`) and the whole
`postprocess.postprocess`. Every row also checks that the two paths give the same result (bits, boxes, values).
Also printed: what the first use costs in a fresh process (compiling, or loading numba's cache).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/cpu/bs4096", help="bench_cpu_side.py's input folder (made if empty)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from scipy import ndimage as ndi

    import bench_cpu_side as side
    import export
    import jit_kernels
    import postprocess as pp

    if not jit_kernels.AVAILABLE:
        sys.exit("numba is not installed: nothing to compare (pip install -r requirements.txt)")
    first = subprocess.run([sys.executable, "-c", "import time, numpy as np; t = time.perf_counter(); "
                            "import jit_kernels, postprocess as pp; "
                            "jit_kernels.edge_energy(np.ones((9, 9), np.float32), np.ones((9, 9), np.float32), "
                            "np.ones((9, 9), bool), *pp._sobel_kernels(7)); "
                            "print(f'{time.perf_counter() - t:.2f}')"], capture_output=True, text=True, cwd=ROOT)
    work = side.bench_input(args.work)
    fg_all = np.load(work / "fg.npy", mmap_mode="r")
    hv_all = np.load(work / "hv.npy", mmap_mode="r")
    s, rows = side.CROP_SIDE, {}

    def both(name, library, compiled, same):
        a, b = library(), compiled()
        assert same(a, b), name
        lib_ms, jit_ms = [], []
        for _ in range(args.repeats):   # alternating
            lib_ms.append(best(library, 1))
            jit_ms.append(best(compiled, 1))
        rows.setdefault(name, []).append((min(lib_ms), min(jit_ms)))

    def without_numba(fn):
        def call():
            jit_kernels.AVAILABLE = False
            try:
                return fn()
            finally:
                jit_kernels.AVAILABLE = True
        return call

    bits = lambda a, b: a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))  # noqa: E731
    for y0, x0 in side.CROP_ORIGINS:
        fg = np.array(fg_all[y0:y0 + s, x0:x0 + s])
        hv = np.array(hv_all[:, y0:y0 + s, x0:x0 + s])
        mask = fg > 0.5
        both("edge energy", without_numba(lambda: pp.edge_energy(hv, mask)), lambda: pp.edge_energy(hv, mask), bits)
        for name, lab_mask in (("boxes of the components", mask), ("boxes of the holes", ~mask)):
            labels, n = pp._label4(lab_mask)
            both(name, lambda: ndi.find_objects(labels, max_label=n), lambda: jit_kernels.find_objects(labels, n),
                 lambda a, b: a == b)
        # the mosaics this crop's watershed smooths: recorded from one post-processing
        mosaics, real = [], jit_kernels.gaussian_filter
        jit_kernels.gaussian_filter = lambda image, sigma, **k: (mosaics.append(image.copy()), real(image, sigma))[1]
        try:
            labels = pp.postprocess(fg, hv)
        finally:
            jit_kernels.gaussian_filter = real
        rows.setdefault("mosaics", []).append(len(mosaics))
        both("Gaussian of the watershed mosaics", lambda: [ndi.gaussian_filter(m, 1.0) for m in mosaics],
             lambda: [real(m, 1.0) for m in mosaics], lambda a, b: all(bits(x, y) for x, y in zip(a, b)))
        rgb = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
        both("export.measure_nuclei (its per-nucleus sums compiled)", without_numba(lambda: export.measure_nuclei(labels, rgb, 0.25, fg)),
             lambda: export.measure_nuclei(labels, rgb, 0.25, fg), lambda a, b: a == b)
        both("postprocess (whole)", without_numba(lambda: pp.postprocess(fg, hv)), lambda: pp.postprocess(fg, hv),
             np.array_equal)
    print(f"{len(side.CROP_ORIGINS)} crops of {s}², best of {args.repeats} alternating runs, ms per crop "
          f"(mean over the crops); the same results on every crop\n")
    print("| step | library / numpy | compiled | speed-up |\n| --- | --- | --- | --- |")
    mosaics = rows.pop("mosaics")
    for name, pairs in rows.items():
        lib, jit = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
        print(f"| {name} | {lib:.1f} | {jit:.1f} | {lib / jit:.2f}x |")
    print(f"\nwatershed mosaics per crop: {mosaics}")
    print(f"first use in a fresh process (import + compile or cache load): {first.stdout.strip() or first.stderr} s")


if __name__ == "__main__":
    main()
