"""DistributedDataParallel: 2 CPU processes (gloo, via torch.distributed.run) train the same weights as one
process with the same global batch (augmentation off, same seed)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train
import utils

PROJECT_DIR = Path(__file__).resolve().parents[1]
# fold 0 of 3 on the 12 synthetic images: 8 training-pool images -> 2 validation + 6 training;
# global batch 2 = 1 image per process, 3 optimiser steps
OPTIONS = ["--pretrained", "none", "--input_size", "64", "--batch_size", "2", "--epochs", "1", "--num_folds", "3",
           "--val_fraction", "0.25", "--learning_rate", "1e-3", "--lora_rank", "4", "--train_only_lora",
           "--num_workers", "0", "--no_augment", "--device", "cpu", "--seed", "3"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_two_processes_match_one(synthetic_data_dir, tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(PROJECT_DIR / "main.py"), "train", "--data_dir", str(synthetic_data_dir), "--output_dir",
           str(ddp_out), *OPTIONS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = utils.read_json(ddp_out / "config.json")
    assert config["world_size"] == 2

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--data_dir", str(synthetic_data_dir), "--output_dir", str(single_out), *OPTIONS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process
    try:
        train.run_training(train.config_from_args(args), single_out, evaluate_test=False)
    finally:
        torch.set_num_threads(threads)

    h_ddp = utils.read_csv(ddp_out / "fold_0" / "history.csv")
    h_one = utils.read_csv(single_out / "fold_0" / "history.csv")
    assert len(h_ddp) == len(h_one) == 1
    for key in ("train_loss", "train_bce", "train_dice", "train_mse", "train_msge", "val_loss", "val_dice"):
        assert float(h_ddp[0][key]) == pytest.approx(float(h_one[0][key]), rel=1e-4, abs=1e-6), key

    a = torch.load(ddp_out / "fold_0" / "last_model.pth", weights_only=True)
    b = torch.load(single_out / "fold_0" / "last_model.pth", weights_only=True)
    assert a["step"] == b["step"] == 3
    trainable = [k for k in b["state_dict"] if "lora_" in k or k.startswith("head.")]
    assert trainable and set(a["state_dict"]) == set(b["state_dict"])
    start = torch.load(single_out / "fold_0" / "best_model.pth", weights_only=True)
    moved = 0
    # atol 1e-4 (a tenth of an AdamW step at lr 1e-3): the first Adam steps are close to lr * sign(gradient), so
    # an element whose gradient is near zero can move differently when only the float summation order differs
    for k in trainable:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-4, msg=k)
        moved += int(not torch.equal(b["state_dict"][k], torch.zeros_like(b["state_dict"][k])))
    assert moved > 0 and start["epoch"] == 1
    # only rank 0 wrote: one history, one set of checkpoints, the test fold scored once
    assert (ddp_out / "fold_0" / "result.json").is_file() and (ddp_out / "best_model.pth").is_file()
