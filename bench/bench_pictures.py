"""Time of a slide's two overview pictures (`wsi.save_pictures`: the nuclei-density overview with the tissue PNG, and
the confidence overview), the work a slide's post-processing workers do after its last region.

A whole slide's picture inputs, made here: a 2048 x 2048 RGB thumbnail (the size `wsi` reads) of a `--side`-pixel
slide at 0.25 µm/px, a tissue mask of the same size (an ellipse with holes and a few islands, so the outline has
many pieces), and `--nuclei` nuclei at random places in the tissue with random confidences. Each tree (`--trees`,
interleaved, `--repeats` rounds) runs in a fresh process: one untimed drawing (imports, caches), then the two
pictures `--draws` times; the table gives the mean time of each and the PNGs' sha256 (whether two trees draw the
same bytes).

    python bench/bench_pictures.py [--side 20480] [--nuclei 100000] [--trees OLD_TREE,NEW_TREE] [--repeats 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def inputs(side: int, nuclei: int, thumb_side: int = 2048):
    """(thumbnail, downsample, mask (bool), centroids level 0, confidences)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:thumb_side, :thumb_side].astype(np.float32) / thumb_side
    mask = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.35) ** 2 <= 1.0
    for cy, cx, r in rng.uniform((0.2, 0.2, 0.005), (0.8, 0.8, 0.03), (40, 3)):   # holes
        mask &= (yy - cy) ** 2 + (xx - cx) ** 2 > r * r
    for cy, cx, r in rng.uniform((0.02, 0.02, 0.003), (0.98, 0.98, 0.01), (30, 3)):   # islands
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    thumb = np.where(mask[..., None], rng.integers(120, 220, (thumb_side, thumb_side, 3)), 242).astype(np.uint8)
    downsample = side / thumb_side
    ty, tx = np.nonzero(mask)
    pick = rng.integers(0, len(ty), nuclei)
    centroids = np.stack([(tx[pick] + rng.random(nuclei)) * downsample, (ty[pick] + rng.random(nuclei)) * downsample],
                         axis=1)
    return thumb, downsample, mask, centroids, rng.uniform(0.5, 1.0, nuclei)


def one(tree: str, side: int, nuclei: int, draws: int) -> None:
    sys.path.insert(0, str(Path(tree).resolve()))
    import tissue
    import wsi

    thumb, downsample, mask, centroids, confidence = inputs(side, nuclei)
    tissue_mask = tissue.TissueMask(mask, downsample, "auto", (side, side))
    out_dir = Path(tempfile.mkdtemp(prefix="bench_pictures_"))
    outputs = {k: out_dir / f"slide_{k}.png" for k in ("tissue", "overview", "confidence")}
    jobs = {"overview": ("tissue", "overview"), "confidence": ("confidence",)}
    times: dict = {name: [] for name in jobs}
    for k in range(draws + 1):   # the first drawing is untimed: imports and caches
        for name, kinds in jobs.items():
            t = time.perf_counter()
            wsi.save_pictures(kinds, outputs, (thumb, downsample), tissue_mask, centroids, confidence, 0.25, 0.75)
            if k:
                times[name].append(time.perf_counter() - t)
    best = {name: float(np.mean(t)) for name, t in times.items()}
    sha = {k: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for k, p in outputs.items()}
    print("PICTURES " + json.dumps({"tree": tree, "overview_s": round(best["overview"], 3),
                                    "confidence_s": round(best["confidence"], 3), "sha256": sha}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=20480)
    parser.add_argument("--nuclei", type=int, default=100_000)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--trees", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.side, args.nuclei, args.draws)
        return
    print("| round | tree | overview + tissue s | confidence s | sha256 overview / confidence / tissue |")
    print("| --- | --- | --- | --- | --- |")
    for repeat in range(args.repeats):
        for tree in args.trees.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", tree, "--side", str(args.side), "--nuclei",
                                   str(args.nuclei), "--draws", str(args.draws)], check=True, capture_output=True,
                                  text=True)
            row = json.loads(done.stdout.split("PICTURES ", 1)[1])
            sha = row["sha256"]
            print(f"| {repeat + 1} | {tree} | {row['overview_s']:.3f} | {row['confidence_s']:.3f} | "
                  f"{sha['overview']} / {sha['confidence']} / {sha['tissue']} |", flush=True)


if __name__ == "__main__":
    main()
