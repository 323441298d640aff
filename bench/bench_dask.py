"""Throughput of `predict` over many slides: in-process versus a local Dask cluster of 1 and 2 CPU workers.

Writes `--slides` synthetic pyramidal slides (tiles of `sample_data.render_tile`, 0.25 um/px) and a random
model (weights do not change speed), then runs the same command line once per engine, each in a fresh
process, on the same slides into a fresh output folder:

    python main.py predict --model_path tiny.pth --input 'slides/*.tif' --device cpu --tissue_mask none
        [--workers N]

and reports wall time (start of the process to its exit: model check, cluster start, all slides, cluster
shutdown) as slides per hour, plus the 1-minute load average before each run (the machine may be shared).
The engines run in rounds (in-process, 1 worker, 2 workers, then again) so a change of load hits all of them.
It also checks that each run's result files are byte-identical to the in-process run's where the torch thread
count per process is the same (1 worker with all cores = in-process).

    python bench/bench_dask.py --slides 8 --size 1024 --input_size 256 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))


def make_study(root: Path, slides: int, size: int, input_size: int) -> Path:
    import numpy as np

    import dataset
    import nuclei_model
    import postprocess
    import sample_data
    import utils

    config = {"input_size": input_size, "pretrained": None, "head": "hv", "lora_rank": 4, "lora_alpha": 4.0,
              "train_only_lora": True, "mpp": dataset.NUINSSEG_MPP, "tile_size": 256}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None)
    nuclei_model.save_checkpoint(root / "model.pth", net, config, postprocess.PostprocessConfig().to_dict(),
                                 fold=0, epoch=1, val={"pq": 0.1}, monitor="pq")
    rng = np.random.default_rng(0)
    (root / "slides").mkdir()
    for i in range(slides):
        tile = sample_data.render_tile(rng, 256, sample_data.ORGANS[i % len(sample_data.ORGANS)])[0]
        reps = -(-size // 256)
        image = np.ascontiguousarray(np.tile(tile, (reps, reps, 1))[:size, :size])
        sample_data.write_pyramidal_tiff(root / "slides" / f"slide{i:02d}.tif", image, mpp=0.25, tile_size=256)
    return root


def run_engine(root: Path, out: Path, workers: int | None) -> float:
    cmd = [sys.executable, str(PROJECT_DIR / "main.py"), "-q", "predict", "--model_path", str(root / "model.pth"),
           "--input", str(root / "slides" / "*.tif"), "--output_dir", str(out), "--device", "cpu",
           "--tissue_mask", "none"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def result_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()
            if p.is_file() and p.name not in ("summary.csv", "predict_config.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="slide side in pixels (0.25 um/px)")
    parser.add_argument("--input_size", type=int, default=256, help="network input size of the random model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    engines = {"in-process": None, "--workers 1": 1, "--workers 2": 2}
    times: dict[str, list[float]] = {name: [] for name in engines}
    loads: dict[str, list[float]] = {name: [] for name in engines}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dask_") as tmp:
        root = make_study(Path(tmp), args.slides, args.size, args.input_size)
        for r in range(args.rounds):
            for name, workers in engines.items():
                out = root / f"out_{r}_{workers}"
                loads[name].append(os.getloadavg()[0])
                times[name].append(run_engine(root, out, workers))
                print(f"round {r}: {name}: {times[name][-1]:.1f} s (load {loads[name][-1]:.1f})", flush=True)
                if r == 0 and workers is not None:
                    identical[name] = result_files(out) == result_files(root / "out_0_None")
    cores = len(os.sched_getaffinity(0))
    print(f"\n{args.slides} slides of {args.size} x {args.size} px, random model at input {args.input_size}, "
          f"{cores} usable cores, {args.rounds} round(s)\n")
    print("| engine | wall s (median) | slides / hour | load (1 min) | files identical to in-process |")
    print("| --- | --- | --- | --- | --- |")
    figures = {}
    for name in engines:
        median = statistics.median(times[name])
        figures[name] = {"seconds": times[name], "slides_per_hour": 3600 * args.slides / median, "load": loads[name],
                         "identical": identical.get(name)}
        same = {True: "yes", False: "no", None: "(reference)"}[identical.get(name)]
        print(f"| {name} | {median:.1f} | {3600 * args.slides / median:.0f} | "
              f"{statistics.median(loads[name]):.1f} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cores": cores, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
