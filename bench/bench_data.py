"""Benchmark of the data pipeline: discover + decode the real NuInsSeg sample, then build training targets
(resize + foreground + HV maps) for every image at 512 and at the SAM input size 1024.

    python bench/bench_data.py [--data_dir /work/shared/data/nuinsseg_sample] [--sizes 512,1024]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
from utils import parse_list  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                  / "nuinsseg_sample"))
    parser.add_argument("--sizes", default="512,1024", help="input sizes to build targets at")
    args = parser.parse_args()
    sizes = parse_list(args.sizes, int, "--sizes")

    t0 = time.perf_counter()
    samples = dataset.discover_nuinsseg(args.data_dir)
    t_discover = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = [dataset.load_sample(s) for s in samples]
    t_load = time.perf_counter() - t0
    nuclei = sum(len(np.unique(lab)) - 1 for _, lab, _ in loaded)
    print(f"{len(samples)} images, {len({s.tissue for s in samples})} tissues, {nuclei} nuclei")
    print(f"discover: {t_discover * 1000:.0f} ms   decode all: {t_load:.2f} s")
    total = t_discover + t_load
    for size in sizes:
        t0 = time.perf_counter()
        t_hv = 0.0
        for image, labels, _ in loaded:
            dataset.resize_image(image, size)
            lab = dataset.resize_labels(labels, size)
            dataset.foreground_target(lab)
            t1 = time.perf_counter()
            dataset.hv_targets(lab)
            t_hv += time.perf_counter() - t1
        elapsed = time.perf_counter() - t0
        total += elapsed
        print(f"targets at {size}: {elapsed:.2f} s for all ({elapsed / len(loaded) * 1000:.1f} ms/image, "
              f"hv_targets {t_hv / len(loaded) * 1000:.1f} ms/image)")
    ds = dataset.NucleiDataset(samples, input_size=1024, augment=dataset.AugmentConfig())
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    elapsed = time.perf_counter() - t0
    print(f"NucleiDataset items at 1024 with augmentation: {elapsed / len(ds) * 1000:.1f} ms/item")
    print(f"TOTAL discover + decode + targets at {sizes}: {total:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
