"""Reading a slide at another pixel size than the model's: `SlideReader.read_scaled` (the resampling every region of
such a slide goes through) and `SlideReader.thumbnail` (a slide's first step), old tree against new tree.

    python bench/bench_resample.py [--trees /tmp/old_tree,.] [--repeats 3] [--places 3] [--box 2816]
                                   [--out /tmp/cpu/bs4096] [--thumbnail_slide SLIDE]

Input: the slide of `bench/bench_cpu_side.py` (a 4096² tiled TIFF of real NuInsSeg tiles at 0.25 µm/px, written
in `--out` first if it is not there) and, for the thumbnail, the 20480² synthetic slide of `bench/bench_wsi.py
--simulate` if `--thumbnail_slide` names it. For each scale (slide mpp / model mpp: 1.0108 = a 0.2527 µm/px scan for a
0.25 µm/px model, 0.9992 = 0.2498 µm/px, 0.5054 = a 0.2527 µm/px scan for a 0.5 µm/px model, 2.0 = a 0.5 µm/px scan
for a 0.25 µm/px model, 1.0 = no resampling, the control) a `--box`² box of the target grid (a region of 2048 with
its margin and windows) is read at `--places` places (the same in every process), CPU seconds of one thread, the
best read; `s_per_mm2` is that per mm² of the box at 0.25 µm/px. Each tree runs `--repeats` times, each time in a
fresh process, the trees interleaved; the table gives the best; `sha256` of all the pixels read shows whether the
trees read the same pixels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1.0, 0.2527 / 0.25, 0.2498 / 0.25, 0.5054, 2.0)


def one(args: argparse.Namespace) -> None:
    """The measured process: this tree's reads, one JSON line per scale (and one for the thumbnail)."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import numpy as np

    import slides

    rng = np.random.default_rng(0)
    with slides.open_slide(Path(args.out) / "slide.tif") as slide:
        width, height = slide.dimensions
        for scale in SCALES:
            side = int(args.box)
            limit = max(1, int(min(width, height) * scale) - side)
            places = [(int(rng.integers(0, limit)), int(rng.integers(0, limit))) for _ in range(args.places)]
            slide.read_scaled((0, 0, 64, 64), scale)   # the first read of a level (its handle, caches)
            digest, best = hashlib.sha256(), float("inf")
            for x, y in places:
                t = time.process_time()
                rgb = slide.read_scaled((x, y, side, side), scale)
                best = min(best, time.process_time() - t)
                digest.update(rgb.tobytes())
            print("READ " + json.dumps({"what": f"{side}² box at scale {scale:.4f}", "cpu_s": round(best, 3),
                                        "s_per_mm2": round(best / (side * side * 0.25 ** 2 / 1e6), 2),
                                        "sha256": digest.hexdigest()[:16]}), flush=True)
    if args.thumbnail_slide:
        with slides.open_slide(args.thumbnail_slide) as slide:
            slide.thumbnail(256)
            best, digest = float("inf"), ""
            for _ in range(args.places):
                t = time.process_time()
                thumb, _ = slide.thumbnail(2048, threads=1)
                best = min(best, time.process_time() - t)
                digest = hashlib.sha256(thumb.tobytes()).hexdigest()[:16]
            w, h = slide.dimensions
            print("READ " + json.dumps({"what": f"2048 thumbnail of a {w} x {h} slide", "cpu_s": round(best, 3),
                                        "s_per_mm2": None, "sha256": digest}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=str(ROOT), help="comma-separated project trees, old first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--places", type=int, default=3)
    parser.add_argument("--box", type=int, default=2816)
    parser.add_argument("--out", default="/tmp/cpu/bs4096", help="bench_cpu_side.py's input folder")
    parser.add_argument("--thumbnail_slide", default=None, help="a large slide for the thumbnail's time")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    if not (Path(args.out) / "slide.tif").is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_cpu_side

        bench_cpu_side.make_input(Path(args.out), 4096)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH="")
    rows: dict = {}
    trees = args.trees.split(",")
    for _ in range(args.repeats):
        for tree in trees:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--tree", tree, "--out", args.out,
                   "--places", str(args.places), "--box", str(args.box)] \
                + (["--thumbnail_slide", args.thumbnail_slide] if args.thumbnail_slide else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, check=True)
            for line in proc.stdout.splitlines():
                if line.startswith("READ "):
                    row = json.loads(line[5:])
                    key = (row["what"], tree)
                    if key not in rows or row["cpu_s"] < rows[key]["cpu_s"]:
                        rows[key] = dict(row, tree=tree)
    print(f"one thread, CPU seconds, best of {args.places} places x {args.repeats} processes per tree\n")
    print("| read | tree | CPU s | s per mm² of the box | sha256 of the pixels |\n| --- | --- | --- | --- | --- |")
    for what in dict.fromkeys(w for w, _ in rows):
        for tree in trees:
            r = rows[(what, tree)]
            per = "-" if r["s_per_mm2"] is None else f"{r['s_per_mm2']:.2f}"
            print(f"| {what} | {tree} | {r['cpu_s']:.3f} | {per} | {r['sha256']} |")


if __name__ == "__main__":
    main()
