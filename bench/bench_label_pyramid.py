"""Peak memory and time of `label_pyramid.write_label_pyramid` against image size (bounded-memory check).

Each size runs in a fresh process; the label tiles come from a cheap synthetic `read_tile` (a grid of
square "nuclei" with ids from their position, every tile full: the most work for the reduced levels), so the
figures are those of the writer itself. `tail_s` is the time from the last level-0 tile to the finished file,
which a slide spends after its last region; `sha256` shows whether two trees write the same bytes.

    python bench/bench_label_pyramid.py [--sizes 4096,16384] [--tile_size 512] [--output_dir /tmp]
    python bench/bench_label_pyramid.py --sizes 20480 --trees /tmp/old_tree,. --repeats 2   # old vs new, interleaved
"""
from __future__ import annotations

import argparse
import hashlib
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


def one(size: int, tile_size: int, output_dir: str, tree: str) -> None:
    sys.path.insert(0, str(Path(tree).resolve()))
    import label_pyramid

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = Path(output_dir) / f"labels_{size}.ome.tif"
    last = [0.0]

    def read_tile(y, x, h, w):
        tile = synthetic_tile(y, x, h, w)
        last[0] = time.perf_counter()
        return tile

    t0, c0 = time.perf_counter(), time.process_time()
    label_pyramid.write_label_pyramid(path, (size, size), read_tile, mpp=0.25, tile_size=tile_size,
                                      show_progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(json.dumps({"tree": tree, "size": size, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                      "tail_s": round(t0 + seconds - last[0], 2),
                      "peak_rss_mb": round(peak, 1),
                      "rss_before_mb": round(before, 1), "growth_mb": round(peak - before, 1),
                      "file_mb": round(path.stat().st_size / 2**20, 1),
                      "uint32_image_mb": round(size * size * 4 / 2**20, 1), "sha256": digest}))
    path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--tile_size", type=int, default=512)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--trees", default=str(Path(__file__).resolve().parents[1]),
                        help="comma-separated project trees to compare, run interleaved (default: this one)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_label_pyramid_")
    if args.one:
        one(args.one, args.tile_size, output_dir, args.trees)
        return 0
    for size in [int(s) for s in args.sizes.split(",")]:
        for _ in range(args.repeats):
            for tree in args.trees.split(","):
                subprocess.run([sys.executable, __file__, "--one", str(size), "--tile_size", str(args.tile_size),
                                "--output_dir", output_dir, "--trees", tree], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
