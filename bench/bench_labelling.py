"""The post-processing's 4-connected labellings: scipy's `ndi.label` against `postprocess._label4` (cc3d).

    python bench/bench_labelling.py [--work /tmp/cpu/bs4096] [--repeats 7]

Input: the realistic maps of `bench/bench_cpu_side.py` (real NuInsSeg nuclei, about 4,500 per mm²; written there
first if `--work` has none). Three 2176² crops (a slide region with its margin) go through `postprocess.postprocess`
with `ndi.label` watched, which gives the masks it labels (per crop: the foreground, its background, the marker
cores); each mask is then labelled by both, one thread, CPU seconds, best of `--repeats`, and the two labellings
are compared (ids and count).
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

    if pp.cc3d is None:
        raise SystemExit("connected-components-3d is not installed (pip install -r requirements.txt)")
    work = bench_cpu_side.bench_input(args.work)
    masks, label = [], ndi.label

    def watched(mask, *rest, **options):
        masks.append(np.array(mask, bool))
        return label(mask, *rest, **options)

    saved = pp.cc3d
    pp.cc3d = None   # every labelling through ndi.label, watched
    pp.ndi.label = watched
    try:
        crops = bench_cpu_side.postprocess_crops(work)
    finally:
        pp.ndi.label, pp.cc3d = label, saved
    clock = time.process_time
    print("| mask | share of pixels set | components | ndi.label ms | _label4 (cc3d) ms | same |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for i, mask in enumerate(masks):
        best = [1e9, 1e9]
        for _ in range(args.repeats):
            t = clock()
            ref, n = label(mask)
            best[0] = min(best[0], clock() - t)
            t = clock()
            ours, m = pp._label4(mask)
            best[1] = min(best[1], clock() - t)
        totals = [a + b for a, b in zip(totals, best)]
        print(f"| {i} | {mask.mean():.2f} | {n} | {best[0] * 1e3:.1f} | {best[1] * 1e3:.1f} | "
              f"{'yes' if n == m and np.array_equal(ref, ours) else 'NO'} |")
    print(f"\nper 2176² crop: ndi.label {totals[0] / crops * 1e3:.0f} ms, _label4 {totals[1] / crops * 1e3:.0f} ms "
          f"({totals[0] / max(totals[1], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
