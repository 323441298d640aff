"""Three CPU-side stages of the slide pipeline, old tree vs new tree, each measured inside one process (issue 17).

    python bench/bench_cpu_stages.py --old /tmp/cpu3/base [--work /tmp/cpu/bs4096] [--rounds 3]

`bench_cpu_side.py` gives "finish_region after the post-processing" as the difference of two separately measured
minima, which the noise of a shared machine blurs; this script measures the stages themselves on the input that
`bench_cpu_side.py --out WORK` wrote (slide.tif, fg.npy, hv.npy and the region files of its last run in
WORK/out_new/.progress, copied to a scratch folder first):

- `finish`: `wsi.finish_region` on one 2176² crop (the second region's core plus the margin) with
  `postprocess.postprocess` replaced by its precomputed result, so only what comes after it is timed; also at
  scale 0.2527 / 0.25 (fractional polygon corners, as for a slide of 0.2527 µm/px);
- `read`: `SlideReader.read_scaled` of that crop's box at scale 1 (OpenSlide, and tiffslide);
- `label_pyramid_three_quarters_empty`: `label_pyramid.write_label_pyramid` of the assembled labels in one corner
  of an image of twice the side (three quarters of the tiles empty, as on a whole slide);
- `assemble`: `wsi.assemble` of the four region files (GeoJSON, CSV, label pyramid), tifffile imported first as
  in `predict` and zarr not (tiffslide, which imports it, is read last; `predict` on an OpenSlide slide never
  imports it), so the former tree's zarr import is part of its `assemble`, as it is in `predict`.

Each round runs the old tree then the new tree, each in a fresh subprocess with one thread, the stage's CPU time
the smallest of a few calls; the table gives the smallest over the rounds. The region files written by both trees
and the assembled outputs are compared byte for byte (region files: every array of the old tree's, equal in the
new tree's, which may add arrays: the rows as typed columns, whose count is printed). A tree whose `wsi` has
`COLUMN_PREFIX` gets its own copy of the region files with those columns added from the rows' JSON, as its
`finish_region` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Y0 = X0 = 1920
SIDE = 2176


def measure(tree: str, work: Path, regions_dir: Path, out: Path) -> dict:
    """The measured process (one tree): the three stages' CPU seconds, as JSON on stdout."""
    sys.path.insert(0, tree)
    import time
    from types import SimpleNamespace

    import numpy as np
    import tifffile  # noqa: F401 - imported before assemble, as in predict (slides imports it)

    import postprocess as pp
    import slides
    import wsi

    clock = time.process_time
    timing: dict[str, float] = {}

    def best_of(n: int, work) -> float:
        """The smallest CPU time of `n` calls of `work()`."""
        times = []
        for _ in range(n):
            t = clock()
            work()
            times.append(clock() - t)
        return min(times)
    fg = np.array(np.load(work / "fg.npy", mmap_mode="r")[Y0:Y0 + SIDE, X0:X0 + SIDE])
    hv = np.array(np.load(work / "hv.npy", mmap_mode="r")[:, Y0:Y0 + SIDE, X0:X0 + SIDE])

    def read(backend: str) -> np.ndarray:
        with slides.open_slide(work / "slide.tif", backend=backend) as slide:
            pixels = slide.read_scaled((X0, Y0, SIDE, SIDE), 1.0)
            timing[f"read_{backend}"] = best_of(5, lambda: slide.read_scaled((X0, Y0, SIDE, SIDE), 1.0))
        return pixels

    rgb = read("openslide")
    labels = pp.postprocess(fg, hv)
    pp.postprocess = lambda *args, **kwargs: labels.copy()
    job = {"fg": fg, "hv": hv, "rgb": rgb, "settings": pp.PostprocessConfig().to_dict(),
           "crop": (Y0, X0, Y0 + SIDE, X0 + SIDE), "core": (Y0 + 128, X0 + 128, Y0 + 2048, X0 + 2048), "scale": 1.0,
           "mpp": 0.25, "file": str(out / "region.npz")}
    wsi.finish_region(job)
    timing["finish_after_postprocess"] = best_of(3, lambda: wsi.finish_region(job))
    # the same at a scale other than 1 (a slide of 0.2527 µm/px read for a model of 0.25: corners not whole numbers)
    scaled = dict(job, scale=0.2527 / 0.25, file=str(out / "region_scaled.npz"))
    timing["finish_after_postprocess_scale_1.0108"] = best_of(3, lambda: wsi.finish_region(scaled))
    prefix = getattr(wsi, "COLUMN_PREFIX", None)
    if prefix is not None:
        # a tree whose finish_region also writes the rows as typed columns (and whose assemble reads those instead
        # of parsing the rows' JSON): its own copy of the region files gets them, as its finish_region would have
        # written them (the rows' JSON gives back the very floats and ints)
        own = out / "regions"
        shutil.copytree(regions_dir, own, dirs_exist_ok=True)
        regions_dir = own
        for f in sorted(own.glob("region_*.npz")):
            with np.load(f) as data:
                arrays = {k: data[k] for k in data.files}
            rows = json.loads(arrays["rows"].tobytes().decode())
            for key in (rows[0] if rows else {}):
                values = [row[key] for row in rows]
                arrays[prefix + key] = np.array(values, np.float64 if type(values[0]) is float else np.int64)
            np.savez(f, **arrays)
    with slides.open_slide(work / "slide.tif") as slide:
        dims = slide.dimensions
    geo = wsi.slide_geometry(dims, 1.0, 512, 128, work / "slide.tif")
    regions = wsi.plan_regions(geo, np.ones((len(geo.ys), len(geo.xs)), bool), 2048)
    state = {"regions": {str(r.index): {"file": f"region_{r.index:06d}.npz"} for r in regions}}
    outputs = {"geojson": out / "slide.geojson", "csv": out / "slide_nuclei.csv", "labels": out / "slide_labels.tif"}
    t = clock()
    wsi.assemble(out, "slide", outputs, regions, state, regions_dir, geo, 0.25, (dims[1], dims[0]),
                 SimpleNamespace(geojson_gzip=False, label_image=True))
    timing["assemble"] = clock() - t
    # the label pyramid of a slide that is three quarters background: these labels in one corner of an image of
    # twice the side (a whole slide is mostly empty tiles)
    import label_pyramid

    big = np.zeros((2 * dims[1], 2 * dims[0]), np.uint32)
    big[:dims[1], :dims[0]] = tifffile.imread(outputs["labels"])
    (out / "mostly_empty").mkdir(exist_ok=True)
    t = clock()
    label_pyramid.write_label_pyramid(out / "mostly_empty" / "labels.tif", big.shape,
                                      lambda y, x, h, w: big[y:y + h, x:x + w], mpp=0.25, tile_size=512)
    timing["label_pyramid_three_quarters_empty"] = clock() - t
    read("tiffslide")   # last: tiffslide imports zarr, which the former assemble imported (OpenSlide slides do not)
    return timing


def same_files(a: Path, b: Path) -> dict:
    import numpy as np

    result = {name: (a / name).read_bytes() == (b / name).read_bytes()
              for name in ("slide.geojson", "slide_nuclei.csv", "slide_labels.tif", "mostly_empty/labels.tif")}
    for name in ("region.npz", "region_scaled.npz"):
        with np.load(a / name) as x, np.load(b / name) as y:
            # every array of the old tree's region file, the same in the new tree's (which may add the rows' columns)
            result[name] = set(x.files) <= set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
            result[name + " arrays added"] = len(set(y.files) - set(x.files))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="checkout of the old tree")
    parser.add_argument("--work", default="/tmp/cpu/bs4096", help="the --out folder of bench_cpu_side.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        tree, regions_dir, out = args.measure
        print("TIMING " + json.dumps(measure(tree, Path(args.work), Path(regions_dir), Path(out))))
        return
    work = Path(args.work)
    source = work / "out_new" / ".progress"
    if not (work / "slide.tif").is_file() or not list(source.glob("region_*.npz")):
        raise SystemExit(f"{work}: run bench/bench_cpu_side.py --out {work} first (slide and region files)")
    scratch = Path(tempfile.mkdtemp(prefix="bench_cpu_stages_"))
    regions_dir = scratch / "regions"
    shutil.copytree(source, regions_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH="")
    best: dict[str, dict] = {}
    try:
        for round_ in range(args.rounds):
            for label, tree in (("old", args.old), ("new", str(ROOT))):
                out = scratch / label
                out.mkdir(exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--old", args.old,
                       "--measure", tree, str(regions_dir), str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TIMING ")), None)
                if proc.returncode or line is None:
                    raise SystemExit(f"{label} run failed: {proc.stderr[-3000:]}")
                timing = json.loads(line[len("TIMING "):])
                print(label, round_, json.dumps({k: round(v, 4) for k, v in timing.items()}), flush=True)
                best[label] = {k: min(v, best.get(label, {}).get(k, v)) for k, v in timing.items()}
        print("\n| stage | old, s | new, s | speed-up |\n| --- | --- | --- | --- |")
        for key in best["old"]:
            old, new = best["old"][key], best["new"][key]
            print(f"| {key} | {old:.3f} | {new:.3f} | {old / new:.2f}x |")
        print("\nidentical bytes:", json.dumps(same_files(scratch / "old", scratch / "new")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
