"""Whole-slide inference: peak memory against slide size, seconds per mm² of tissue, windows per second, and the
read / network / post-processing / writing split (issue 10, points 5 and 10).

    python bench/bench_wsi.py [--sizes 4096,16384] [--input_size 128] [--device cpu] [--num_workers 1]
                              [--region_size 2048] [--out bench_wsi_output] [--markdown]

For each size a synthetic slide (0.25 µm/px, an elliptical piece of tissue on a white background, tiled
pyramidal TIFF written tile by tile with `sample_data.write_pyramidal_tiff_from_tiles`, never whole in memory)
is segmented by `predict.predict_one` in a fresh subprocess, with the real network (random weights, the
configuration given: `--input_size` on 512-pixel training tiles) and the default window (512 / 128). A random
network finds almost no nuclei, which would make post-processing and writing look free, so after the network
has run on a window its maps are replaced by maps of the window's dark pixels (their HV maps from
`dataset.hv_targets`): post-processing and writing then do the work of a slide full of nuclei. The label image
is written too (`--label_image`). `network_s` is the network stage of the pipeline (stitching included, and here
the replacement maps); `model_s` the time inside the network itself. Peak memory is the largest total resident set of the subprocess and its
children (post-processing workers), sampled every 0.1 s with psutil. Timings on a shared machine are noisy.
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


def run_one(args: argparse.Namespace) -> None:
    """The measured process: load the model, segment one slide, print the Outcome as JSON."""
    import torch
    from scipy import ndimage

    import dataset
    import inference
    import predict

    torch.set_num_threads(max(1, args.threads))
    options = predict.PredictOptions(model_path=args.model, device=args.device, tissue_mask="auto",
                                     label_image=True, num_workers=args.num_workers, overwrite=True,
                                     region_size=args.region_size, batch_size=args.batch_size)
    predictor = inference.load_predictor(options)
    network = predictor.maps_fn

    model_seconds = [0.0]

    def maps_fn(tiles):
        t0 = time.perf_counter()
        network(tiles)  # the real network's work; its maps are replaced (see the module docstring)
        model_seconds[0] += time.perf_counter() - t0
        out = []
        for tile in tiles:
            dark = tile.mean(axis=2) < 120
            out.append((dark.astype(np.float32), dataset.hv_targets(ndimage.label(dark)[0])))
        return out

    predictor.maps_fn = maps_fn
    outcome = predict.predict_one(predictor, Path(args.slide), Path(args.slide).stem, Path(args.output), options)
    print("OUTCOME " + json.dumps(dict(vars(outcome), model_seconds=model_seconds[0])))


def measure(cmd: list[str]) -> tuple[dict, float, float]:
    """Run `cmd`, sampling the total RSS of it and its children; (outcome, peak MiB, seconds)."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)))
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
    line = next((ln for ln in out.splitlines() if ln.startswith("OUTCOME ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"measured run failed ({proc.returncode}): {out[-2000:]}")
    return json.loads(line[len("OUTCOME "):]), peak / 2 ** 20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384")
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--region_size", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for slides and outputs (default: a temporary one)")
    parser.add_argument("--run_one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args)
        return
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_wsi_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.pth"
    make_model(model, args.input_size)
    rows = []
    for side in [int(s) for s in args.sizes.split(",")]:
        slide = work / f"synthetic_{side}.tif"
        if not slide.is_file():
            t0 = time.time()
            write_slide(slide, side)
            print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f} s", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run_one", "--slide", str(slide), "--model",
               str(model), "--output", str(work / f"out_{side}"), "--device", args.device, "--threads",
               str(args.threads), "--num_workers", str(args.num_workers), "--region_size", str(args.region_size),
               "--batch_size", str(args.batch_size)]
        outcome, peak, seconds = measure(cmd)
        if outcome["status"] != "ok":
            raise SystemExit(f"{slide}: {outcome['error']}")
        area = outcome["tissue_area_mm2"] or float("nan")
        row = {"side": side, "pixels": side * side, "tissue_mm2": round(area, 3), "nuclei": outcome["nuclei"],
               "windows": outcome["windows"], "seconds": round(seconds, 1),
               "s_per_mm2": round(outcome["seconds"] / area, 2),
               "windows_per_s": round(outcome["windows"] / max(outcome["seconds"], 1e-9), 2),
               "read_s": outcome["read_seconds"], "network_s": outcome["network_seconds"],
               "model_s": round(outcome["model_seconds"], 3),
               "postprocess_s": outcome["postprocess_seconds"], "write_s": outcome["write_seconds"],
               "peak_rss_mib": round(peak, 0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        print(f"peak RSS ratio {rows[-1]['side']}^2 / {rows[0]['side']}^2 = {ratio:.2f} "
              f"(pixels x{rows[-1]['pixels'] / rows[0]['pixels']:.0f})")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
