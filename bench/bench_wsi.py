"""Whole-slide inference: peak memory against slide size, seconds per mm² of tissue, windows per second, the
read / network / post-processing / writing split (issue 10, points 5 and 10), old code against new (issue 17,
point 6) and the pipeline on a simulated accelerator (issue 17, point 5).

    python bench/bench_wsi.py [--sizes 4096,16384] [--input_sizes 128] [--device cpu] [--num_workers N]
                              [--batch_size N] [--region_size 2048] [--out DIR] [--code OLD_TREE NEW_TREE]
                              [--repeats 1] [--network_probe] [--simulate] [--sim_size 4096]
                              [--sim_latency 0.1] [--sim_batch 8] [--sim_workers 1,2,4] [--sim_pools slide,run]

For each size a synthetic slide (0.25 µm/px, an elliptical piece of tissue on a white background, tiled
pyramidal TIFF written tile by tile with `sample_data.write_pyramidal_tiff_from_tiles`, never whole in memory)
is segmented by `predict.predict_one` in a fresh subprocess, with the real network (random weights, the
configuration given: each `--input_sizes` on 512-pixel training tiles) and the default window (512 / 128).
A random network finds almost no nuclei, which would make post-processing and writing look free, so after
the network has run on a window its maps are replaced by maps of the window's dark pixels (their HV maps from
`dataset.hv_targets`): post-processing and writing then do the work of a slide full of nuclei. The label image
is written too (`--label_image`). `network_s` is the network stage of the pipeline (stitching included, and
here the replacement maps, whose time is `replace_s`); `model_s` the time inside the network itself. Peak
memory is the largest total resident set of the subprocess and its children (post-processing workers),
sampled every 0.1 s with psutil. `--batch_size` / `--num_workers` not given: each code tree's own defaults.

`--code OLD NEW` runs each code tree's `predict` (the subprocess puts that tree first on its path; for an older
commit: `git worktree add /tmp/engine/old 487c4a1`), interleaved (old, new, old, new ... per repeat), and
prints per tree seconds per mm², the stage split, windows run against the windows of the slide's grid that
touch tissue (`grid_windows`, from this tree's `tissue` / `wsi` code). `--network_probe` (the last tree only):
before the slide the bare network is timed on the slide's own windows at batch 1, 2, 4 and 8; `best_s_per_window`
is the fastest, and `stage_ratio` = (network stage - replacement maps) / (windows x best_s_per_window).

`--simulate`: a stand-in accelerator, for each `--code` tree in turn (`--repeats` rounds, interleaved). A first, untimed pass computes the dark-pixel maps of
every window of a `--sim_size` slide; the timed passes return them (replayed in order, see below) after
sleeping `--sim_latency` seconds per batch of `--sim_batch` windows, so the CPU is free while the "device"
works. One pass per `--sim_workers` count and `--sim_pools` kind (`pool`: `slide`, the slide starts its workers, as
a single slide does; `run`, the run's workers (`wsi.Workers`) were started and warm before it, as for a run's later
slides); the table gives the slide time against max(network-bound time =
batches x latency, CPU-side time (read + post-processing + writing) / workers), and against the same with
workers capped at the usable cores. The stage times are elapsed seconds summed over regions, so they grow when
more processes than cores compete; `cpu_work_s` is the pass's CPU seconds (this process, its read threads and its
worker processes, from `getrusage`), and `ratio_cpu_work` = slide / max(network-bound, cpu_work / min(workers,
cores)): the bound a machine with that many cores can reach; `main_cpu_s` the CPU seconds of this process alone
(reading, blending, handing regions over, writing; a CPU stand-in blends on the CPU, which a GPU does on the device).
The stand-in replays the maps in the order the untimed pass ran the windows (checked per window by a fingerprint of
its pixels; `looked_up` counts windows found by the hash of all their pixels instead, 0 when the order held), so
that its own lookups cost this process next to nothing. Each pass shares the CPU threads as `predict` does
(`utils.configure_threads`: `--sim_threads` per process if given, else the usable cores divided among this process
and the pass's workers; `threads` in the table). `--sim_profile DIR`: a cProfile of the main thread of each pass
(where the thread that feeds the device spends its time). `--sim_mpp 0.2527`: the slide is read as a 0.2527 µm/px
scan (predict's `--mpp`), so every region goes through the resampling to the model's 0.25 µm/px, as a real scan's
does. `device_idle_first_s`, `_between_s`, `_last_s`: how long
the stand-in device waited before its first batch (opening the slide, the tissue mask, the first reads), between
batches (windows not ready) and after its last one (the last regions, the label image, the pictures): the slide
time is the network-bound time plus these three. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MPP = 0.25


def _tissue_tiles(n: int = 6, size: int = 512) -> list[np.ndarray]:
    import sample_data

    rng = np.random.default_rng(0)
    styles = list(sample_data.ORGANS)
    tiles = []
    for k in range(n):
        style = styles[k % len(styles)]
        tiles.append(sample_data.render_tile(rng, size, style)[0])
    return tiles


def write_slide(path: Path, side: int) -> None:
    """A side x side synthetic slide: repeated synthetic H&E tiles inside an ellipse, white outside."""
    import sample_data

    tiles = _tissue_tiles()
    size = tiles[0].shape[0]

    def read_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), 242, np.uint8)
        yy, xx = np.mgrid[y:y + h, x:x + w]
        inside = ((yy - side / 2) / (0.45 * side)) ** 2 + ((xx - side / 2) / (0.35 * side)) ** 2 <= 1
        if not inside.any():
            return out
        for ty in range(y // size, (y + h - 1) // size + 1):
            for tx in range(x // size, (x + w - 1) // size + 1):
                tile = tiles[(ty * 7 + tx * 3) % len(tiles)]
                y0, y1 = max(y, ty * size), min(y + h, (ty + 1) * size)
                x0, x1 = max(x, tx * size), min(x + w, (tx + 1) * size)
                sub = tile[y0 - ty * size:y1 - ty * size, x0 - tx * size:x1 - tx * size]
                region = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
                out[region] = np.where(inside[region][..., None], sub, out[region])
        return out

    sample_data.write_pyramidal_tiff_from_tiles(path, (side, side), read_tile, MPP, tile_size=256)


def make_model(path: Path, input_size: int) -> None:
    import nuclei_model
    import postprocess
    import utils

    config = {"input_size": input_size, "pretrained": None, "head": "hv", "lora_rank": 4, "lora_alpha": 4.0,
              "train_only_lora": False, "mpp": MPP, "tile_size": 512}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None)
    nuclei_model.save_checkpoint(path, net, config, postprocess.PostprocessConfig().to_dict(), fold=0, epoch=1,
                                 val={"pq": 0.0}, monitor="pq")


def _probe_network(network, tiles: list, sizes=(1, 2, 4, 8)) -> dict:
    """Seconds per window of the bare maps function at each batch size (one warm-up call first)."""
    network(tiles[:1])
    out = {}
    for size in sizes:
        calls = max(1, 4 // size)
        t0 = time.perf_counter()
        for _ in range(calls):
            network(tiles[:size])
        out[size] = (time.perf_counter() - t0) / (calls * size)
    return out


def _dark_maps(tile: np.ndarray):
    from scipy import ndimage

    import dataset

    dark = tile.mean(axis=2) < 120
    return dark.astype(np.float32), dataset.hv_targets(ndimage.label(dark)[0])


def _options(predict, args, **extra):
    kw = dict(model_path=args.model, device=args.device, tissue_mask="auto", label_image=True, overwrite=True,
              region_size=args.region_size)
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    if args.num_workers is not None:
        kw["num_workers"] = args.num_workers
    kw.update(extra)
    return predict.PredictOptions(**kw)


def run_one(args: argparse.Namespace) -> None:
    """The measured process: load the model, segment one slide, print the Outcome as JSON."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import main as cli

    cli.preset_environment(["--threads", str(args.threads)])  # what `main.py predict` does before torch loads
    import torch

    import predict

    torch.set_num_threads(max(1, args.threads))
    options = _options(predict, args)
    predictor = predict.load_predictor(options)
    network = predictor.maps_fn
    extra = {"batch_size": getattr(predictor, "batch_size", options.batch_size),
             "num_workers": predictor.num_workers}
    if args.network_probe:
        import slides

        with slides.open_slide(args.slide) as slide:
            w, h = slide.dimensions
            rgb = slide.read_scaled((w // 2 - 1024, h // 2 - 1024, 2048, 2048), 1.0)
        tile = predictor.tile_size
        tiles = [np.ascontiguousarray(rgb[y:y + tile, x:x + tile]) for y in (0, 768, 1536 - 128)
                 for x in (0, 768, 1536 - 128)][:8]
        per_window = _probe_network(network, tiles)
        extra["s_per_window_by_batch"] = {str(k): round(v, 4) for k, v in per_window.items()}
        extra["best_s_per_window"] = min(per_window.values())

    spent = {"model": 0.0, "replace": 0.0}

    def maps_fn(tiles):
        t0 = time.perf_counter()
        network(tiles)  # the real network's work; its maps are replaced (see the module docstring)
        t1 = time.perf_counter()
        out = [_dark_maps(tile) for tile in tiles]
        spent["model"] += t1 - t0
        spent["replace"] += time.perf_counter() - t1
        return out

    predictor.maps_fn = maps_fn
    outcome = predict.predict_one(predictor, Path(args.slide), Path(args.slide).stem, Path(args.output), options)
    print("OUTCOME " + json.dumps(dict(vars(outcome), model_seconds=spent["model"], replace_seconds=spent["replace"],
                                       **extra)))


def run_simulated(args: argparse.Namespace) -> None:
    """The simulated accelerator (see the module docstring); prints one JSON row per worker count."""
    import hashlib

    sys.path.insert(0, str(Path(args.tree).resolve()))   # the code tree measured (`--code`)
    import main as cli

    # the threads as `main.py predict` sets them: `--sim_threads` if given, else its default share of the cores
    # among this process and the workers of each pass (`utils.configure_threads` below)
    cli.preset_environment([] if args.sim_threads is None else ["--threads", str(args.sim_threads)])
    import predict
    import utils

    maps: dict = {}
    order: list = []   # (fingerprint, key) of each window in the order the untimed pass ran them

    def key(tile: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(tile).tobytes(), digest_size=16).digest()

    def fingerprint(tile: np.ndarray) -> bytes:   # 1/256 of the pixels: about 5 us instead of 1 ms for `key`
        return hashlib.blake2b(np.ascontiguousarray(tile[::16, ::16]).tobytes(), digest_size=16).digest()

    def precompute(tiles):
        out = []
        for tile in tiles:
            k = key(tile)
            out.append(maps.setdefault(k, _dark_maps(tile)))
            order.append((fingerprint(tile), k))
        return out

    calls, replayed, looked_up = [0], [0], [0]
    spans: list = []   # (start, end) of each batch on the stand-in device, perf_counter seconds

    def device(tiles):
        """The maps of `tiles` after the device's latency. A slide's windows run in the same order whatever the
        worker count, so the maps are replayed in the untimed pass's order (each window checked by a fingerprint
        of its pixels); a window out of that order is looked up by the hash of all its pixels (the stand-in's own
        work, which a real device does not do, stays off this process's CPU in the usual case)."""
        calls[0] += 1
        start = time.perf_counter()
        time.sleep(args.sim_latency)  # the device works; this process's CPU is free
        spans.append((start, time.perf_counter()))
        out = []
        for tile in tiles:
            i = replayed[0] + looked_up[0]
            if i < len(order) and order[i][0] == fingerprint(tile):
                out.append(maps[order[i][1]])
                replayed[0] += 1
            else:
                out.append(maps[key(tile)])
                looked_up[0] += 1
        return out

    device.accelerator = True   # as `NetworkMaps` on a GPU: the slide's batches run ahead in a thread of their own

    import nuclei_model

    model_set = nuclei_model.load_model_set(Path(args.model), "cpu")  # window, pixel size, post-processing
    mpp = {} if args.sim_mpp is None else {"mpp": args.sim_mpp}   # as `--mpp`: the slide read at another pixel size
    options = _options(predict, args, batch_size=args.sim_batch, num_workers=0, **mpp)
    predictor = predict.load_predictor(options, maps_fn=precompute, model_set=model_set)
    predict.predict_one(predictor, Path(args.slide), "warmup", Path(args.output), options)
    cores = _usable_cores()
    import wsi

    pools = [k for k in args.sim_pools.split(",") if k]
    if "run" in pools and not hasattr(wsi, "Workers"):
        print(f"{args.tree}: no run-wide worker pool (wsi.Workers) in this tree: only the 'slide' passes", flush=True)
        pools = [k for k in pools if k != "run"] or ["slide"]
    for workers, pool_kind in [(int(w), k) for w in args.sim_workers.split(",") for k in pools]:
        if pool_kind == "run" and workers == 0:
            continue
        options = _options(predict, args, batch_size=args.sim_batch, num_workers=workers, **mpp)
        predictor = predict.load_predictor(options, maps_fn=device, model_set=model_set)
        threads = utils.configure_threads(args.sim_threads, workers=predictor.num_workers)   # as predict does
        run_workers, extra = None, {}
        if pool_kind == "run":   # the run's workers, started and warm before the slide (a run's later slides)
            run_workers = wsi.Workers(workers)
            for f in [run_workers.pool().submit(time.sleep, 0.5) for _ in range(2 * workers)]:
                f.result()
            extra = {"workers": run_workers}
        calls[0] = replayed[0] = looked_up[0] = 0
        spans.clear()
        cpu_before, main_before = _cpu_seconds(), _cpu_seconds(children=False)
        profile = None
        if args.sim_profile:   # the main thread only (cProfile follows the thread it is enabled in)
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        began = time.perf_counter()
        outcome = predict.predict_one(predictor, Path(args.slide), f"sim{workers}", Path(args.output), options,
                                      **extra)
        ended = time.perf_counter()
        if run_workers is not None:
            run_workers.close()
        if profile is not None:
            profile.disable()
            Path(args.sim_profile).mkdir(parents=True, exist_ok=True)
            profile.dump_stats(str(Path(args.sim_profile) / f"main_thread_{workers}_workers_{pool_kind}_pool.prof"))
        cpu_work = _cpu_seconds() - cpu_before   # this process and its (reaped) post-processing workers
        main_cpu = _cpu_seconds(children=False) - main_before   # this process alone (all its threads)
        if outcome.status != "ok":
            raise SystemExit(outcome.error)
        network_bound = calls[0] * args.sim_latency
        # where the device waited: before its first batch (opening, tissue mask, the first reads), between batches
        # (starved: windows not ready, or the regions in flight all waiting on workers), after its last (the last
        # regions' post-processing, assembly, pictures)
        idle_first = spans[0][0] - began if spans else ended - began
        idle_between = sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        idle_last = ended - spans[-1][1] if spans else 0.0
        cpu_side = outcome.read_seconds + outcome.postprocess_seconds + outcome.write_seconds
        bound = max(network_bound, cpu_side / workers)
        bound_cores = max(network_bound, cpu_side / min(workers, cores))
        print("SIM " + json.dumps({
            "workers": workers, "pool": pool_kind, "threads": threads, "windows": outcome.windows, "batches": calls[0],
            "nuclei": outcome.nuclei,
            "slide_s": outcome.seconds, "network_stage_s": outcome.network_seconds,
            "network_bound_s": round(network_bound, 2), "read_s": outcome.read_seconds,
            "postprocess_s": outcome.postprocess_seconds, "write_s": outcome.write_seconds,
            "cpu_side_s": round(cpu_side, 2), "bound_s": round(bound, 2), "ratio": round(outcome.seconds / bound, 2),
            "bound_cores_s": round(bound_cores, 2), "ratio_cores": round(outcome.seconds / bound_cores, 2),
            "device_idle_first_s": round(idle_first, 2), "device_idle_between_s": round(idle_between, 2),
            "device_idle_last_s": round(idle_last, 2), "cpu_work_s": round(cpu_work, 2),
            "main_cpu_s": round(main_cpu, 2), "looked_up": looked_up[0],
            "ratio_cpu_work": round(outcome.seconds / max(network_bound, cpu_work / min(workers, cores)), 2)}),
            flush=True)


def _cpu_seconds(children: bool = True) -> float:
    """User + system CPU seconds of this process (all its threads) and, with `children`, of its children that have
    ended (worker processes)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, who))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure(cmd: list[str], cwd: Path | None = None, tag: str = "OUTCOME ") -> tuple[list, float, float]:
    """Run `cmd`, sampling the total RSS of it and its children; (JSON of the lines starting with `tag`, peak
    MiB, seconds)."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            total = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    seconds = time.time() - start
    lines = [json.loads(ln[len(tag):]) for ln in out.splitlines() if ln.startswith(tag)]
    if proc.returncode or not lines:
        raise SystemExit(f"measured run failed ({proc.returncode}): {out[-2000:]}")
    return lines, peak / 2 ** 20, seconds


def grid_windows(slide_path: Path, tile: int = 512, overlap: int = 128) -> int:
    """Windows of the slide's global grid (at the model's pixel size = the slide's here) that touch the auto
    tissue mask: what each window computed once means."""
    import slides
    import tissue
    import wsi

    with slides.open_slide(slide_path) as slide:
        mpp0 = float(slide.require_mpp())
        thumb, downsample = slide.thumbnail(wsi.THUMBNAIL_SIZE)
        mask = tissue.detect_tissue(thumb, downsample, mpp=mpp0, dimensions=slide.dimensions)
        geo = wsi.slide_geometry(slide.dimensions, 1.0, tile, overlap, slide_path)
    return int(wsi.window_flags(geo, mask).sum())


def _table(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--input_sizes", "--input_size", default="128")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=_usable_cores())
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--region_size", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--code", nargs="+", default=[str(ROOT)], help="code trees to compare (old first)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--network_probe", action="store_true")
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--sim_size", type=int, default=4096)
    parser.add_argument("--sim_latency", type=float, default=0.1)
    parser.add_argument("--sim_batch", type=int, default=8)
    parser.add_argument("--sim_mpp", type=float, default=None,
                        help="--simulate: the slide's pixel size given to predict as --mpp (e.g. 0.2527: every "
                             "region is resampled to the model's 0.25 µm/px as it is read; default: its own, 0.25)")
    parser.add_argument("--sim_workers", default="1,2,4")
    parser.add_argument("--sim_pools", default="slide,run",
                        help="for each worker count, a pass whose slide starts its own workers ('slide': a single "
                             "slide, or a run's first when the model loads faster than they start) and one with the "
                             "run's workers started and warm beforehand ('run': a run's later slides)")
    parser.add_argument("--out", default=None, help="folder for slides and outputs (default: a temporary one)")
    parser.add_argument("--run_one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sim_profile", default=None,
                        help="--simulate: a folder for a cProfile of the main thread of each pass "
                             "(main_thread_<workers>_workers.prof; read it with python -m pstats)")
    parser.add_argument("--sim_threads", type=int, default=None,
                        help="--simulate: CPU threads per process (default: predict's, the usable cores shared among "
                             "the main process and the workers)")
    parser.add_argument("--run_simulated", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args)
        return
    if args.run_simulated:
        run_simulated(args)
        return
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_wsi_"))
    work.mkdir(parents=True, exist_ok=True)
    trees = [Path(c).resolve() for c in args.code]
    rows = []

    def slide_for(side: int) -> Path:
        slide = work / f"synthetic_{side}.tif"
        if not slide.is_file():
            t0 = time.time()
            write_slide(slide, side)
            print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f} s", flush=True)
        return slide

    def common(slide: Path, model: Path, output: Path) -> list[str]:
        cmd = ["--slide", str(slide), "--model", str(model), "--output", str(output), "--device", args.device,
               "--threads", str(args.threads), "--region_size", str(args.region_size)]
        if args.num_workers is not None:
            cmd += ["--num_workers", str(args.num_workers)]
        if args.batch_size is not None:
            cmd += ["--batch_size", str(args.batch_size)]
        return cmd

    for input_size in [int(s) for s in args.input_sizes.split(",") if s]:
        model = work / f"model_{input_size}.pth"
        if not model.is_file():
            make_model(model, input_size)
        for side in [int(s) for s in args.sizes.split(",") if s]:
            slide = slide_for(side)
            grid = grid_windows(slide)
            for repeat in range(args.repeats):
                for t, tree in enumerate(trees):
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--run_one", "--tree", str(tree),
                           *common(slide, model, work / f"out_{side}_{t}")]
                    if args.network_probe and t == len(trees) - 1:
                        cmd.append("--network_probe")
                    (outcome,), peak, seconds = measure(cmd, cwd=tree)
                    if outcome["status"] != "ok":
                        raise SystemExit(f"{slide}: {outcome['error']}")
                    area = outcome["tissue_area_mm2"] or float("nan")
                    row = {"tree": tree.name, "input": input_size, "side": side, "repeat": repeat,
                           "tissue_mm2": round(area, 3), "nuclei": outcome["nuclei"],
                           "windows": outcome["windows"], "grid_windows": grid,
                           "batch": outcome.get("batch_size"), "workers": outcome.get("num_workers"),
                           "seconds": round(seconds, 1), "s_per_mm2": round(outcome["seconds"] / area, 2),
                           "read_s": outcome["read_seconds"], "network_s": outcome["network_seconds"],
                           "model_s": round(outcome["model_seconds"], 2),
                           "replace_s": round(outcome["replace_seconds"], 2),
                           "postprocess_s": outcome["postprocess_seconds"], "write_s": outcome["write_seconds"],
                           "peak_rss_mib": round(peak, 0)}
                    if "best_s_per_window" in outcome:
                        best = outcome["best_s_per_window"]
                        row["s_per_window_by_batch"] = outcome["s_per_window_by_batch"]
                        row["stage_ratio"] = round((outcome["network_seconds"] - outcome["replace_seconds"])
                                                   / (outcome["windows"] * best), 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if rows:
        sizes = sorted({r["side"] for r in rows})
        if len(sizes) >= 2 and len(trees) == 1:
            small, large = ([r for r in rows if r["side"] == s][0] for s in (sizes[0], sizes[-1]))
            ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
            print(f"peak RSS ratio {large['side']}^2 / {small['side']}^2 = {ratio:.2f} "
                  f"(pixels x{(large['side'] / small['side']) ** 2:.0f})")
        _table([{k: v for k, v in r.items() if k != "s_per_window_by_batch"} for r in rows])
        for r in rows:
            if "s_per_window_by_batch" in r:
                print(f"network alone, {r['input']} input, s per window by batch: {r['s_per_window_by_batch']}")
    if args.simulate:
        slide = slide_for(args.sim_size)
        model = work / f"model_{int(args.input_sizes.split(',')[0])}.pth"
        if not model.is_file():
            make_model(model, int(args.input_sizes.split(",")[0]))
        for repeat in range(args.repeats):
            for tree in trees:  # old and new trees interleaved (`--code`), each pass in a fresh process
                cmd = [sys.executable, str(Path(__file__).resolve()), "--run_simulated", "--tree", str(tree),
                       "--sim_latency", str(args.sim_latency), "--sim_batch", str(args.sim_batch),
                       "--sim_workers", args.sim_workers, "--sim_pools", args.sim_pools,
                       *common(slide, model, work / "out_sim")] \
                    + ([] if args.sim_threads is None else ["--sim_threads", str(args.sim_threads)]) \
                    + ([] if args.sim_mpp is None else ["--sim_mpp", str(args.sim_mpp)]) \
                    + ([] if args.sim_profile is None else ["--sim_profile", str(Path(args.sim_profile).resolve())])
                sim, peak, _ = measure(cmd, cwd=ROOT, tag="SIM ")
                print(f"simulated accelerator ({tree}, repeat {repeat + 1}): {args.sim_size}^2 slide, "
                      f"{args.sim_latency} s per batch of {args.sim_batch} windows, {_usable_cores()} usable cores, "
                      f"peak RSS {peak:.0f} MiB")
                _table(sim)

if __name__ == "__main__":
    main()
