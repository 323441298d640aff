"""Learning check: does the model learn, and does the HV head beat the binary baseline on the same budget?

Makes a synthetic NuInsSeg-layout dataset (`make_sample_data`), or uses an existing one (`--data_dir`, e.g.
the real sample `../shared/data/nuinsseg_sample`), then trains one model per head of `--heads` (default
hv,binary: the HoVer-Net-style `hv` head and the `binary` baseline head, threshold + connected components)
with identical data, split, seed, epochs and optimiser settings, from random encoder weights
(`--pretrained none`, full fine-tuning). Each is evaluated on fold 0's test images (never seen in training
or selection). Writes a Markdown table, a JSON summary and a learning-curve figure.

    python bench/learning_check.py --output_dir /tmp/learning_check --epochs 24
    python bench/learning_check.py --output_dir /tmp/lc_real --data_dir ../shared/data/nuinsseg_sample --heads hv
    python bench/learning_check.py --quick          # a few minutes, to see that it runs

The trainings run in parallel, one torch thread each, so all get the same compute.
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

import nuclei_model  # noqa: E402
import utils  # noqa: E402
import visualize  # noqa: E402

SCORES = ("pq", "sq", "rq", "aji", "aji_plus", "dice", "f1")


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "main.py"), *args]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    heads = args.heads
    data = Path(args.data_dir) if args.data_dir else out / "data"
    out.mkdir(parents=True, exist_ok=True)
    if not args.data_dir and not data.is_dir():
        subprocess.run(main_py("make_sample_data", "--output_dir", str(data), "--num_images", str(args.num_images),
                               "--image_size", str(args.image_size), "--seed", str(args.seed)), check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--data_dir", str(data), "--pretrained", "none", "--input_size", str(args.input_size),
              "--batch_size", "4", "--learning_rate", str(args.learning_rate), "--epochs", str(args.epochs),
              "--warmup_epochs", "1", "--num_folds", "5", "--fold", "0", "--seed", str(args.seed),
              "--num_workers", "0", "--device", "cpu", "--overwrite"]
    start = time.time()
    procs = {}
    for head in heads:
        log = open(out / f"train_{head}.log", "w")
        procs[head] = (subprocess.Popen(main_py("-q", "train", "--output_dir", str(out / head), "--head", head,
                                                *common), env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for head, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"training the {head} head failed: see {out / f'train_{head}.log'}")
        log.close()
    train_seconds = time.time() - start

    results = {}
    for head in heads:
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

    visualize.plot_learning_curves({h: results[h]["history"] for h in heads}, out / "learning_curves.png",
                                   panels=[("training loss", ["train_loss"]), ("validation loss", ["val_loss"]),
                                           ("validation PQ", ["val_pq"]), ("validation AJI", ["val_aji"]),
                                           ("validation Dice", ["val_dice"])])
    source = (f"Data: {data}" if args.data_dir else
              f"Synthetic data: {args.num_images} images of {args.image_size} px (seed {args.seed})")
    lines = [f"{source}; fold 0 of 5 (test images never used for training or selection); input size "
             f"{args.input_size}; random encoder weights, full fine-tuning; {args.epochs} epochs, batch 4, "
             f"lr {args.learning_rate}; heads {', '.join(heads)} trained in parallel with one CPU thread each "
             f"({train_seconds / 60:.1f} min wall).", "",
             "| head | " + " | ".join(SCORES) + " | best epoch (val PQ) |",
             "| --- |" + " --- |" * (len(SCORES) + 1)]
    for head in heads:
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
    p.add_argument("--data_dir", default=None,
                   help="an existing NuInsSeg-layout dataset to use instead of synthetic data")
    p.add_argument("--heads", default="hv,binary",
                   help=f"comma list of heads to train and compare (from {', '.join(nuclei_model.HEADS)})")
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
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in args.heads if h not in nuclei_model.HEADS]
    if not args.heads or unknown or len(set(args.heads)) != len(args.heads):
        p.error(f"--heads {','.join(args.heads)}: give distinct heads from {', '.join(nuclei_model.HEADS)}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: not a folder")
    run(args)


if __name__ == "__main__":
    main()
