"""The CPU side of the slide pipeline in seconds per mm² per core, old tree vs new tree (issue 17, point 4).

    python bench/bench_cpu_side.py [--old /tmp/cpu/old] [--side 4096] [--repeats 2] [--out DIR] [--read_scale 1.0108]

The old tree is another checkout (`git worktree add /tmp/cpu/old 487c4a1`). Each tree runs in its own fresh
subprocess with that tree first on `sys.path`, one thread (`OMP_NUM_THREADS=1` and friends) and no worker
process, and the runs alternate old, new, old, new, ...; each stage's figure is the smallest over the repeats.

Input: a `--side` x `--side` slide at 0.25 µm/px (4096² = 1.05 mm²) tiled from real NuInsSeg tiles
(`/work/shared/data/nuinsseg_sample`, the nine densest-but-typical ones, rotated at random), about 4,500 - 5,000
nuclei per mm². Its maps are realistic maps with real nuclei, not a network's: foreground = the nuclei masks
blurred (sigma 1 px) and scaled by a smooth random field (so probabilities, and confidences, vary), HV maps =
`dataset.hv_targets` of the real label map. The RGB is written as a tiled pyramidal TIFF (zlib) read back
through `slides.open_slide` (as predict reads it: OpenSlide, whose levels its tiffslide twin reads in a tree that has one).

Stages per region (regions of 2048 with the 128-px margin, as `predict`): `read` (`read_scaled` of what
`run_regions` reads for the region: `wsi.run_boxes`, the crop and the windows not run by an earlier region, in
a tree that has it, with the columns shared with the previous region's box copied from its pixels (`wsi.read_box`)
where the tree does that; `Region.box` in an older one; with `--read_scale S` the same boxes are read through
`read_scaled(box, S)`, the resampling of every region of a slide at S x 0.25 µm/px, and that read is the one timed,
while the other stages work on the scale-1 pixels), `blend` (`wsi.stitch_region` with the window cache as in
`run_regions` and a maps function that hands back each window's slice of the precomputed maps; that function's
own time, copying out of the memory-mapped maps, is left out, so only the blending is timed), `finish`
(`wsi.finish_region`: post-processing + seam rule + measurements + polygons + region file, as a worker runs it) and
`postprocess` (`postprocess.postprocess` on the crop again, timed on its own right after `finish`, on the memory
`finish` has just freed: without the page faults a worker's first pass may pay; `finish - postprocess` is what comes
after the post-processing, and those page faults). Then per slide `assemble`
(GeoJSON, CSV and the label pyramid from the region files; `--no_label_image`: without it, as predict by default) and
`overview` (the overview PNG(s)).
CPU side per mm² = read + blend + finish + assemble; the overview PNG(s) are a fixed cost per slide (matplotlib,
about 1-3 s whatever the slide's size) and are given in seconds per slide, and so is the first blend of the process
(`warm_up`, untimed in `blend`: the engine's torch import and first tensor operations, about 2 s, which predict pays
before its network runs anyway) and the first `finish_region` of the process, on the first region (`warm_up_finish`,
untimed in `finish`: imports and the first growth of the heap, which each worker process pays once). After those two,
a tree that has `utils.freeze_startup_objects` calls it, as predict does once its model is loaded and each worker after
its imports. The outputs of the two trees are compared: label
images byte for byte, GeoJSON geometries, CSV columns of the old tree (to 6 significant digits, as written).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.25
TILES = ["human_jejunum_02", "human_kidney_01", "human_kidney_02", "human_melanoma_01", "human_salivory_01",
         "mouse_femur_01", "human_jejunum_01", "human_pylorus_10", "human_pancreas_01"]
SAMPLE = Path("/work/shared/data/nuinsseg_sample")


def make_input(work: Path, side: int, seed: int = 0) -> None:
    """labels.npy, fg.npy, hv.npy (target grid = level 0) and slide.tif in `work`."""
    import tifffile
    from PIL import Image
    from scipy import ndimage

    sys.path.insert(0, str(ROOT))
    import dataset
    import sample_data

    tiles = []
    for name in TILES:
        label_file = next(SAMPLE.glob(f"*/label masks modify/{name}.tif"))
        image_file = Path(str(label_file).replace("label masks modify", "tissue images")).with_suffix(".png")
        tiles.append((np.asarray(Image.open(image_file).convert("RGB")), tifffile.imread(label_file).astype(np.int32)))
    rng = np.random.default_rng(seed)
    n = -(-side // 512)
    labels = np.zeros((n * 512, n * 512), np.int32)
    rgb = np.zeros((n * 512, n * 512, 3), np.uint8)
    top = 0
    for ty in range(n):
        for tx in range(n):
            image, lab = tiles[rng.integers(len(tiles))]
            k = int(rng.integers(4))
            image, lab = np.rot90(image, k), np.rot90(lab, k)
            lab = np.where(lab > 0, lab + top, 0)
            top = max(top, int(lab.max()))
            labels[ty * 512:(ty + 1) * 512, tx * 512:(tx + 1) * 512] = lab
            rgb[ty * 512:(ty + 1) * 512, tx * 512:(tx + 1) * 512] = image
    labels, rgb = np.ascontiguousarray(labels[:side, :side]), np.ascontiguousarray(rgb[:side, :side])
    field = ndimage.gaussian_filter(rng.random(labels.shape).astype(np.float32), 16)
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    fg = ndimage.gaussian_filter((labels > 0).astype(np.float32), 1.0) * (0.6 + 0.4 * field)
    np.save(work / "labels.npy", labels)
    np.save(work / "fg.npy", fg.astype(np.float32))
    np.save(work / "hv.npy", dataset.hv_targets(labels))
    sample_data.write_pyramidal_tiff(work / "slide.tif", rgb, MPP, tile_size=256)


def bench_input(work: str | Path, side: int = 4096) -> Path:
    """`work` holding this bench's input (labels.npy, fg.npy, hv.npy, slide.tif: `make_input`), written first if it
    has none; for the benches of single steps (`bench_labelling.py`, `bench_gaussian.py`, `bench_deflate.py`)."""
    work = Path(work)
    if not (work / "fg.npy").is_file():
        work.mkdir(parents=True, exist_ok=True)
        make_input(work, side)
    return work


def single_step_arguments(description: str, repeats: int) -> argparse.Namespace:
    """The command line of a single-step bench: `--work` (this bench's input folder) and `--repeats`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", default="/tmp/cpu/bs4096",
                        help="folder of bench_cpu_side.py's input (written there first if it has none)")
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


# the crops (a 2048 region with its margin) of the benches of single post-processing steps, and their origins
CROP_SIDE, CROP_ORIGINS = 2176, ((960, 960), (0, 0), (1900, 1500))


def postprocess_crops(work: Path) -> int:
    """`postprocess.postprocess` on the maps of each crop of `CROP_ORIGINS` (for a caller watching what it calls);
    returns the number of crops."""
    import postprocess as pp

    fg_all = np.load(work / "fg.npy", mmap_mode="r")
    hv_all = np.load(work / "hv.npy", mmap_mode="r")
    side = CROP_SIDE
    for y0, x0 in CROP_ORIGINS:
        pp.postprocess(np.array(fg_all[y0:y0 + side, x0:x0 + side]), np.array(hv_all[:, y0:y0 + side, x0:x0 + side]),
                       pp.PostprocessConfig())
    return len(CROP_ORIGINS)


def run_tree(args: argparse.Namespace) -> None:
    """The measured process (one tree): every stage on the input in `args.work`, timings as JSON."""
    sys.path.insert(0, args.tree)
    from types import SimpleNamespace

    import postprocess as pp
    import slides
    import tissue
    import visualize
    import wsi

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    work, out = Path(args.work), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    fg_all = np.load(work / "fg.npy", mmap_mode="r")
    hv_all = np.load(work / "hv.npy", mmap_mode="r")
    tile, overlap = 512, 128
    timing = dict.fromkeys(("read", "blend", "postprocess", "finish", "assemble", "overview", "warm_up",
                            "warm_up_finish"), 0.0)
    with slides.open_slide(work / "slide.tif") as slide:
        dims = slide.dimensions
        geo = wsi.slide_geometry(dims, 1.0, tile, overlap, work / "slide.tif")
        flags = np.ones((len(geo.ys), len(geo.xs)), bool)
        regions = wsi.plan_regions(geo, flags, 2048)
        settings = pp.PostprocessConfig().to_dict()
        pdir = out / ".progress"
        pdir.mkdir(exist_ok=True)
        state = {"regions": {}}
        # one untimed blend first: the engine's first use in a process (importing torch, first tensor operations:
        # about 2 s with the torch Blender, whatever the slide's size) is a fixed cost per process that predict pays
        # before its network runs anyway, not a cost per mm²; it is reported on its own ("warm_up")
        region = regions[0]
        y0, x0, y1, x1 = region.box
        rgb = slide.read_scaled((x0, y0, x1 - x0, y1 - y0), 1.0)
        queue = list(region.windows)

        def maps_warm(tiles_in):
            out = []
            for _ in tiles_in:
                iy, ix = queue.pop(0)
                out.append((np.array(fg_all[geo.ys[iy]:geo.ys[iy] + tile, geo.xs[ix]:geo.xs[ix] + tile]),
                            np.array(hv_all[:, geo.ys[iy]:geo.ys[iy] + tile, geo.xs[ix]:geo.xs[ix] + tile])))
            return out

        def region_job(region, rgb, origin, fg, hv, file) -> dict:
            """The worker's job for `region`: its maps, the crop of `rgb` (read from `origin`), its settings."""
            (by0, bx0), (cy0, cx0, cy1, cx1) = origin, region.crop
            return {"fg": fg, "hv": hv, "rgb": np.ascontiguousarray(rgb[cy0 - by0:cy1 - by0, cx0 - bx0:cx1 - bx0]),
                    "settings": settings, "crop": region.crop, "core": region.core, "scale": 1.0, "mpp": MPP,
                    "file": str(file)}

        t = clock()
        fg, hv, _ = wsi.stitch_region(region, rgb, geo, maps_warm, 1)
        timing["warm_up"] = clock() - t
        # and one untimed finish of that region, as a worker's first task (imports, the first growth of its heap:
        # once per worker process, not per mm²; "warm_up_finish"), into a file of its own
        job = region_job(region, rgb, region.box[:2], fg, hv, out / "warm_up_region.npz")
        t = clock()
        wsi.finish_region(job)
        timing["warm_up_finish"] = clock() - t
        import utils

        if hasattr(utils, "freeze_startup_objects"):   # as predict does once its model is loaded and each worker
            utils.freeze_startup_objects()               # once it has imported what it needs (untimed)
        del fg, hv, job
        # what each region reads, as `run_regions` reads it: a tree with `run_boxes` reads the crop and the windows
        # that run there (the others come from the window cache), an older one the whole `Region.box`
        cached_run = hasattr(wsi, "run_boxes")
        boxes = wsi.run_boxes(regions, geo) if cached_run else [r.box for r in regions]
        last_use = {key: k for k, r in enumerate(regions) for key in r.windows}
        cache: dict = {}
        stand_in = [0.0]   # the stand-in network's own time (copies out of the memory-mapped maps): not blending
        previous = previous_scaled = None
        read_scale = float(args.read_scale)
        for k, (region, box) in enumerate(zip(regions, boxes)):
            y0, x0, y1, x1 = box
            if read_scale != 1.0:   # timed: the same box read through the resampling of a slide at another mpp
                t = clock()
                if hasattr(wsi, "read_box"):
                    previous_scaled = (box, wsi.read_box(lambda b: slide.read_scaled(b, read_scale), box,
                                                         previous_scaled))
                else:
                    slide.read_scaled((x0, y0, x1 - x0, y1 - y0), read_scale)
                timing["read"] += clock() - t
            t = clock()
            if hasattr(wsi, "read_box"):   # the columns shared with the previous region's box are copied
                rgb = wsi.read_box(lambda b: slide.read_scaled(b, 1.0), box, previous)
                previous = (box, rgb)
            else:
                rgb = slide.read_scaled((x0, y0, x1 - x0, y1 - y0), 1.0)
            if read_scale == 1.0:
                timing["read"] += clock() - t
            # the windows stitch_region runs, in its order (batch 1; with the cache, those not run before)
            queue = [key for key in region.windows if key not in cache]

            def maps_by_order(tiles_in):
                t_in = clock()
                result = []
                for _ in tiles_in:
                    iy, ix = queue.pop(0)
                    ys, xs = geo.ys[iy], geo.xs[ix]
                    result.append((np.array(fg_all[ys:ys + tile, xs:xs + tile]),
                                   np.array(hv_all[:, ys:ys + tile, xs:xs + tile])))
                stand_in[0] += clock() - t_in
                return result

            before = stand_in[0]
            t = clock()
            if cached_run:
                later = {key for key in region.windows if last_use[key] > k}
                fg, hv, _ = wsi.stitch_region(region, rgb, geo, maps_by_order, 1, cache, later, box[:2])
                for key in region.windows:
                    if last_use[key] == k:
                        cache.pop(key, None)
            else:
                fg, hv, _ = wsi.stitch_region(region, rgb, geo, maps_by_order, 1)
            timing["blend"] += clock() - t - (stand_in[0] - before)
            job = region_job(region, rgb, box[:2], fg, hv, pdir / f"region_{region.index:06d}.npz")
            # finish first, as a worker runs it (its memory as the last region left it); the post-processing
            # alone after it, on the memory finish has just freed
            t = clock()
            result = wsi.finish_region(job)
            timing["finish"] += clock() - t
            t = clock()
            pp.postprocess(fg, hv, pp.PostprocessConfig.from_dict(settings))
            timing["postprocess"] += clock() - t
            state["regions"][str(region.index)] = {"file": result["file"], "nuclei": result["nuclei"]}
        thumb = slide.thumbnail(2048)
    options = SimpleNamespace(geojson_gzip=False, label_image=not args.no_label_image)
    outputs = {"geojson": out / "slide.geojson", "csv": out / "slide_nuclei.csv"}
    if options.label_image:
        outputs["labels"] = out / "slide_labels.tif"
    t = clock()
    result = wsi.assemble(out, "slide", outputs, regions, state, pdir, geo, MPP, (dims[1], dims[0]), options)
    timing["assemble"] = clock() - t
    nuclei, centroids = result[0], result[1]
    t = clock()
    mask = tissue.full_mask(dims)
    visualize.save_slide_overview(out / "slide_overview.png", thumb[0], thumb[1], mask, centroids, MPP)
    if len(result) > 2 and hasattr(visualize, "save_confidence_overview"):
        visualize.save_confidence_overview(out / "slide_confidence.png", thumb[0], thumb[1], mask, centroids,
                                           result[2], MPP)
    timing["overview"] = clock() - t
    print("TIMING " + json.dumps(dict(timing, nuclei=int(nuclei), mm2=dims[0] * dims[1] * (MPP / 1000) ** 2)))


def read_factors(sides=(4096, 12288, 40000), region_size: int = 2048) -> None:
    """Pixels read per slide pixel for slides of tissue everywhere (windows 512 / 128 as `predict`): the whole
    `Region.box` of every region, `wsi.run_boxes` (the crop and the windows run there) and that with the columns
    shared with the previous region copied (`wsi.reused_columns`). Geometry only (this tree)."""
    sys.path.insert(0, str(ROOT))
    import wsi

    print("| slide | Region.box | run_boxes | + shared columns copied |\n| --- | --- | --- | --- |")
    for side in sides:
        geo = wsi.slide_geometry((side, side), 1.0, 512, 128, Path("slide"))
        regions = wsi.plan_regions(geo, np.ones((len(geo.ys), len(geo.xs)), bool), region_size)
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        boxes = wsi.run_boxes(regions, geo)
        copied = sum((b[2] - b[0]) * wsi.reused_columns(p, b) for p, b in zip([None] + boxes[:-1], boxes))
        print(f"| {side}² | {sum(area(r.box) for r in regions) / side ** 2:.2f} | "
              f"{sum(map(area, boxes)) / side ** 2:.2f} | {(sum(map(area, boxes)) - copied) / side ** 2:.2f} |")


def compare(old_dir: Path, new_dir: Path) -> dict:
    import csv

    import tifffile

    same_labels = None   # None: no label image written (--no_label_image)
    if (old_dir / "slide_labels.tif").is_file() or (new_dir / "slide_labels.tif").is_file():
        same_labels = bool(np.array_equal(tifffile.imread(old_dir / "slide_labels.tif"),
                                          tifffile.imread(new_dir / "slide_labels.tif")))
    old_f = json.loads((old_dir / "slide.geojson").read_text())["features"]
    new_f = json.loads((new_dir / "slide.geojson").read_text())["features"]
    same_geometry = [f["geometry"] for f in old_f] == [f["geometry"] for f in new_f]
    with open(old_dir / "slide_nuclei.csv") as a, open(new_dir / "slide_nuclei.csv") as b:
        old_rows, new_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    cells = sum(len(r) for r in old_rows)
    differing = sum(1 for r, s in zip(old_rows, new_rows) for k in r if r[k] != s[k])
    return {"label_images_identical": same_labels, "geometries_identical": bool(same_geometry),
            "nuclei_old": len(old_rows), "nuclei_new": len(new_rows), "csv_cells_compared": cells,
            "csv_cells_differing": differing, "new_columns": [k for k in new_rows[0] if k not in old_rows[0]]
            if new_rows else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="/tmp/cpu/old", help="checkout of the old tree")
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="/tmp/cpu/bench_cpu_side")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: CPU seconds of the measuring process (what a core spends; robust to other jobs "
                             "on a shared machine), wall: elapsed seconds")
    parser.add_argument("--no_label_image", action="store_true",
                        help="assemble without the label image (predict's default; --label_image writes it)")
    parser.add_argument("--read_scale", type=float, default=1.0,
                        help="time the read stage through `read_scaled` at this scale (slide mpp / 0.25: 1.0108 for "
                             "the 0.2527 µm/px of many 40x scanners), the resampling every region of such a slide "
                             "goes through; the other stages work on the scale-1 pixels as before")
    parser.add_argument("--run_tree", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_tree:
        run_tree(args)
        return
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "slide.tif").is_file():
        t = time.time()
        make_input(work, args.side)
        print(f"input written in {time.time() - t:.0f} s", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH="")
    best: dict[str, dict] = {}
    suffix = "_no_label_image" if args.no_label_image else ""
    for repeat in range(args.repeats):
        for label, tree in (("old", args.old), ("new", str(ROOT))):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run_tree", "--tree", tree, "--work", str(work),
                   "--output", str(work / f"out_{label}{suffix}"), "--clock", args.clock,
                   "--read_scale", str(args.read_scale)] \
                + (["--no_label_image"] if args.no_label_image else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TIMING ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{label} run failed: {proc.stderr[-3000:]}")
            timing = json.loads(line[len("TIMING "):])
            print(label, repeat, json.dumps({k: round(v, 3) for k, v in timing.items()}), flush=True)
            if label in best:
                timing = {k: min(v, best[label][k]) if k not in ("nuclei", "mm2") else v for k, v in timing.items()}
            best[label] = timing
    load = os.getloadavg()[0]
    print(f"\nslide {args.side}² at {MPP} µm/px = {best['new']['mm2']:.3f} mm², {best['new']['nuclei']} nuclei "
          f"({best['new']['nuclei'] / best['new']['mm2']:.0f} per mm²); read at scale {args.read_scale:g}; "
          f"1 thread, 1 process, {args.clock} seconds; best of {args.repeats} "
          f"interleaved runs; 1-min load average at the end {load:.2f}\n")
    stages = ("read", "blend", "postprocess", "finish", "assemble")
    per_mm2 = ("read", "blend", "finish", "assemble")
    print("| tree | " + " | ".join(f"{s} s/mm²" for s in stages)
          + " | finish - postprocess s/mm² | CPU side s/mm² (without the overview) | overview s per slide"
          + " | first blend of the process (warm-up), s | first finish of the process (warm-up), s |")
    print("| --- " * (len(stages) + 6) + "|")
    totals = {}
    for label in ("old", "new"):
        t, mm2 = best[label], best[label]["mm2"]
        totals[label] = sum(t[s] for s in per_mm2) / mm2
        print(f"| {label} | " + " | ".join(f"{t[s] / mm2:.2f}" for s in stages)
              + f" | {(t['finish'] - t['postprocess']) / mm2:.2f} | {totals[label]:.2f} | {t['overview']:.2f}"
              + f" | {t.get('warm_up', 0.0):.2f} | {t.get('warm_up_finish', 0.0):.2f} |")
    print(f"\nspeed-up of the CPU side (without the overview, a fixed cost per slide): "
          f"{totals['old'] / totals['new']:.2f}x")
    print("outputs:", json.dumps(compare(work / f"out_old{suffix}", work / f"out_new{suffix}")))
    print("\npixels read per slide pixel (this tree's geometry):")
    read_factors()


if __name__ == "__main__":
    main()
