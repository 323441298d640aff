"""One training epoch on the CPU alone versus beside a competing 2-thread CPU job, with default settings.

    python bench/bench_threads.py [--code DIR ...] [--repeats 2] [--images 16] [--image_size 128]
                                  [--input_size 128] [--out bench_threads.json]

For each code tree given with `--code` (default: this one; add a checkout of an older commit to compare),
each repeat runs, back to back: `main.py train` for one epoch alone, then the same while another process
multiplies 512 x 512 float32 matrices with 2 torch threads (the competing job, started before and stopped
after the training run). The epoch time is the `seconds` column of the fold's `history.csv` (the epoch's
training and validation, not the start-up). The training processes get the environment of a new user:
OMP_NUM_THREADS, MKL_NUM_THREADS, OMP_WAIT_POLICY and KMP_BLOCKTIME are removed, so each code tree runs
with its own defaults; the competing job keeps torch's defaults too (spinning OpenMP threads), as another
user's job would. The slowdown is competing / alone of the same code tree in the same repeat; on a shared
machine other load moves both numbers, so the repeats are interleaved and every figure is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
CLEAN_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME",
             "GOMP_SPINCOUNT")

COMPETITOR = """
import time, torch
torch.set_num_threads(2)
a = torch.randn(512, 512); b = torch.randn(512, 512)
while True:
    for _ in range(50):
        c = a @ b
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}


def epoch_seconds(code: Path, data_dir: Path, out_dir: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, str(code / "main.py"), "-q", "train", "--data_dir", str(data_dir),
           "--output_dir", str(out_dir), "--pretrained", "none", "--input_size", str(args.input_size),
           "--epochs", "1", "--batch_size", "4", "--train_only_lora", "--seed", "0"]
    done = subprocess.run(cmd, cwd=code, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(out_dir / "fold_0" / "history.csv", newline="") as f:
        return float(list(csv.DictReader(f))[0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", nargs="+", default=[str(PROJECT_DIR)], help="code trees to compare")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()

    sys.path.insert(0, str(PROJECT_DIR))
    import sample_data
    import utils

    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        tmp_path = Path(tmp)
        data_dir = tmp_path / "data"
        sample_data.make_sample_dataset(data_dir, num_images=args.images, seed=0, image_size=args.image_size)
        results: dict[str, list[dict[str, float]]] = {c: [] for c in args.code}
        run = 0
        for repeat in range(args.repeats):
            for code in args.code:
                row = {}
                for mode in ("alone", "competing"):
                    run += 1
                    competitor = None
                    if mode == "competing":
                        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=clean_env())
                        time.sleep(2.0)  # let it start its threads
                    try:
                        row[mode] = epoch_seconds(Path(code), data_dir, tmp_path / f"run{run}", args)
                    finally:
                        if competitor is not None:
                            competitor.terminate()
                            competitor.wait()
                    print(f"repeat {repeat} {code}: {mode} {row[mode]:.2f} s  (load average "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
                row["slowdown"] = row["competing"] / row["alone"]
                results[code].append(row)
        report = {"usable_cores": utils.usable_cores(), "images": args.images, "image_size": args.image_size,
                  "input_size": args.input_size, "results": results}
        for code, rows in results.items():
            ratios = [r["slowdown"] for r in rows]
            print(f"{code}: slowdown competing/alone " + ", ".join(f"{r:.1f}x" for r in ratios)
                  + " (alone " + ", ".join(f"{r['alone']:.1f}" for r in rows) + " s)")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
