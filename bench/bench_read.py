"""Reading slide regions: OpenSlide alone vs the reader `slides.open_slide` gives (OpenSlide + its tiffslide twin).

    python bench/bench_read.py [--side 4096] [--box 2176] [--repeats 5] [--out DIR]

Input: a `--side`² slide of real NuInsSeg tiles (as `bench/bench_cpu_side.py`: /work/shared/data/nuinsseg_sample,
rotated at random) written three ways: a generic tiled TIFF with zlib tiles, one with JPEG tiles (quality 90,
tifffile's default encoder) and an Aperio SVS with JPEG tiles. For each file and reader: CPU seconds of one thread
per `--box`² level-0 region (`read_scaled` at scale 1, the read of a region's crop), best of `--repeats` reads at
different places, as ns per pixel and seconds per mm² at 0.25 µm/px (1.12-1.24 pixels are read per slide pixel,
`bench_cpu_side.py`); the pixels of the two readers are compared (they must be equal), and so is the time to open
the slide (the twin's check included; its first open in a process also imports tiffslide).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--box", type=int, default=2176)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/bench_read")
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_cpu_side
    import sample_data
    import slides
    import tifffile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "slide.tif").is_file():
        bench_cpu_side.make_input(out, args.side)
    rgb = tifffile.imread(out / "slide.tif")
    files = {"zlib TIFF": out / "slide.tif", "JPEG TIFF": out / "slide_jpeg.tif", "JPEG SVS": out / "slide_jpeg.svs"}
    if not files["JPEG TIFF"].is_file():
        sample_data.write_pyramidal_tiff(files["JPEG TIFF"], rgb, 0.25, compression="jpeg")
    if not files["JPEG SVS"].is_file():
        sample_data.write_pyramidal_tiff(files["JPEG SVS"], rgb, 0.25, compression="jpeg",
                                         description=sample_data.aperio_description(args.side, args.side, 0.25, 256))
    rng = np.random.default_rng(0)
    places = [(int(rng.integers(0, args.side - args.box)), int(rng.integers(0, args.side - args.box)))
              for _ in range(args.repeats)]
    print(f"{args.box}² level-0 regions of a {args.side}² slide, one thread, CPU seconds, best of {args.repeats}\n")
    print("| file | reader | open s | read ns/px | read s/mm² (x1.2 read) | pixels equal to OpenSlide's |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, path in files.items():
        reference = None
        for reader, backend in (("OpenSlide", "openslide"), ("open_slide (twin)", None)):
            t = time.perf_counter()
            slide = slides.open_slide(path, backend=backend)
            opened = time.perf_counter() - t
            with slide:
                times, pixels = [], []
                for x, y in places:
                    t = time.process_time()
                    pixels.append(slide.read_scaled((x, y, args.box, args.box), 1.0))
                    times.append(time.process_time() - t)
                twin = f" (levels {', '.join(map(str, slide.twin_levels))} by tiffslide)" if slide.twin_levels else ""
            if reference is None:
                reference, equal = pixels, "-"
            else:
                equal = str(all(np.array_equal(a, b) for a, b in zip(reference, pixels)))
            ns = min(times) / args.box ** 2 * 1e9
            print(f"| {label} | {reader}{twin} | {opened:.3f} | {ns:.1f} | {ns * 16e6 * 1.2 / 1e9:.2f} | {equal} |")


if __name__ == "__main__":
    main()
