"""Learning check: does the model learn, and does the HV head beat the binary baseline on the same budget?

Makes a synthetic NuInsSeg-layout dataset (`make_sample_data`), then trains two models with identical data,
split, seed, epochs and optimiser settings, from random encoder weights (`--pretrained none`, full
fine-tuning): the HoVer-Net-style `hv` head and the `binary` baseline head (threshold + connected
components). Each is evaluated on its fold's test images (never seen in training or selection). Writes a
Markdown table, a JSON summary and a learning-curve figure.

    python bench/learning_check.py --output_dir /tmp/learning_check --epochs 24
    python bench/learning_check.py --quick          # a few minutes, to see that it runs

The two trainings run in parallel, one torch thread each, so both get the same compute.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

import utils  # noqa: E402
import visualize  # noqa: E402

HEADS = ("hv", "binary")
SCORES = ("pq", "sq", "rq", "aji", "aji_plus", "dice", "f1")


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "main.py"), *args]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    data = out / "data"
    if not data.is_dir():
        subprocess.run(main_py("make_sample_data", "--output_dir", str(data), "--num_images", str(args.num_images),
                               "--image_size", str(args.image_size), "--seed", str(args.seed)), check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--data_dir", str(data), "--pretrained", "none", "--input_size", str(args.input_size),
              "--batch_size", "4", "--learning_rate", str(args.learning_rate), "--epochs", str(args.epochs),
              "--warmup_epochs", "1", "--num_folds", "5", "--fold", "0", "--seed", str(args.seed),
              "--num_workers", "0", "--device", "cpu", "--overwrite"]
    start = time.time()
    procs = {}
    for head in HEADS:
        log = open(out / f"train_{head}.log", "w")
        procs[head] = (subprocess.Popen(main_py("-q", "train", "--output_dir", str(out / head), "--head", head,
                                                *common), env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for head, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"training the {head} head failed: see {out / f'train_{head}.log'}")
        log.close()
    train_seconds = time.time() - start

    results = {}
    for head in HEADS:
        subprocess.run(main_py("-q", "evaluate", "--data_dir", str(data), "--model_path",
                               str(out / head / "best_model.pth"), "--fold", "0", "--output_dir",
                               str(out / f"evaluation_{head}"), "--num_workers", "0"), check=True, env=env)
        summary = utils.read_json(out / f"evaluation_{head}" / "summary.json")
        history = read_rows(out / head / "fold_0" / "history.csv")
        best = max(history, key=lambda r: float(r["val_pq"]))
        results[head] = {"test": {k: summary["overall"][k] for k in SCORES if k in summary["overall"]},
                         "images": summary.get("num_images"), "epochs": len(history),
                         "best_epoch": int(best["epoch"]), "best_val_pq": float(best["val_pq"]),
                         "history": history}

    visualize.plot_learning_curves({h: results[h]["history"] for h in HEADS}, out / "learning_curves.png",
                                   panels=[("training loss", ["train_loss"]), ("validation loss", ["val_loss"]),
                                           ("validation PQ", ["val_pq"]), ("validation AJI", ["val_aji"]),
                                           ("validation Dice", ["val_dice"])])
    lines = [f"Synthetic data: {args.num_images} images of {args.image_size} px (seed {args.seed}); fold 0 of 5 "
             f"(test images never used for training or selection); input size {args.input_size}; random encoder "
             f"weights, full fine-tuning; {args.epochs} epochs, batch 4, lr {args.learning_rate}; both heads "
             f"trained in parallel with one CPU thread each ({train_seconds / 60:.1f} min wall).", "",
             "| head | " + " | ".join(SCORES) + " | best epoch (val PQ) |",
             "| --- |" + " --- |" * (len(SCORES) + 1)]
    for head in HEADS:
        r = results[head]
        lines.append(f"| {head} | " + " | ".join(f"{r['test'].get(k, float('nan')):.3f}" for k in SCORES)
                     + f" | {r['best_epoch']} ({r['best_val_pq']:.3f}) |")
    table = "\n".join(lines)
    utils.atomic_write_text(out / "learning_check.md", table + "\n")
    utils.write_json(out / "learning_check.json", {"args": vars(args), "train_seconds": train_seconds,
                                                   "results": {h: {k: v for k, v in r.items() if k != "history"}
                                                               for h, r in results.items()},
                                                   "environment": utils.environment_info()})
    print(table)
    print(f"\nwritten to {out.resolve()} (learning_check.md, learning_check.json, learning_curves.png)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="learning_check")
    p.add_argument("--num_images", type=int, default=60)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--input_size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20 images, 3 epochs")
    args = p.parse_args()
    if args.quick:
        args.num_images, args.epochs = 20, 3
    run(args)


if __name__ == "__main__":
    main()
