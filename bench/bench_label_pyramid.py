"""Peak memory and time of `label_pyramid.write_label_pyramid` against image size (bounded-memory check).

Each size runs in a fresh process; the label tiles come from a cheap synthetic `read_tile` (a grid of
square "nuclei" with ids from their position), so the figures are those of the writer itself.

    python bench/bench_label_pyramid.py [--sizes 4096,16384] [--tile_size 512] [--output_dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
    """Squares of 12 x 12 px on a 16-px grid, id = 1 + cell row * 100000 + cell column."""
    yy = np.arange(y, y + h)[:, None]
    xx = np.arange(x, x + w)[None, :]
    inside = ((yy % 16) < 12) & ((xx % 16) < 12)
    ids = 1 + (yy // 16) * 100_000 + (xx // 16)
    return np.where(inside, ids, 0).astype(np.uint32)


def one(size: int, tile_size: int, output_dir: str) -> None:
    import label_pyramid

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = Path(output_dir) / f"labels_{size}.ome.tif"
    t0 = time.perf_counter()
    label_pyramid.write_label_pyramid(path, (size, size), synthetic_tile, mpp=0.25, tile_size=tile_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": size, "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
                      "rss_before_mb": round(before, 1), "growth_mb": round(peak - before, 1),
                      "file_mb": round(path.stat().st_size / 2**20, 1),
                      "uint32_image_mb": round(size * size * 4 / 2**20, 1)}))
    path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--tile_size", type=int, default=512)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_label_pyramid_")
    if args.one:
        one(args.one, args.tile_size, output_dir)
        return 0
    for size in [int(s) for s in args.sizes.split(",")]:
        subprocess.run([sys.executable, __file__, "--one", str(size), "--tile_size", str(args.tile_size),
                        "--output_dir", output_dir], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
