"""Tests of train.py on the tiny synthetic dataset (input size 64, random encoder, 1-4 epochs)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nuclei_model as nm
import train
import utils
from utils import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _args(data_dir, output_dir, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--pretrained", "none",
                              "--input_size", "64", "--batch_size", "4", "--epochs", "1", "--lora_rank", "4",
                              "--train_only_lora", "--num_workers", "0", "--no_augment", "--device", "cpu",
                              *extra])


def _cli(data_dir, output_dir, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "main.py"), "train", "--data_dir", str(data_dir), "--output_dir",
            str(output_dir), "--pretrained", "none", "--input_size", "64", "--batch_size", "4", "--lora_rank", "4",
            "--train_only_lora", "--num_workers", "0", "--no_augment", "--device", "cpu", *extra]


def test_config_is_json_able_and_complete(synthetic_data_dir, tmp_path):
    config = train.config_from_args(_args(synthetic_data_dir, tmp_path / "out"))
    json.dumps(config)
    for key in ("data_dir", "output_dir", "pretrained", "input_size", "head", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_targets", "train_only_lora", "batch_size", "learning_rate", "weight_decay",
                "epochs", "warmup_epochs", "early_stopping", "patience", "monitor", "cross_validation",
                "num_folds", "fold", "fold_seed", "val_fraction", "seed", "num_workers", "device", "amp",
                "grad_clip", "compile", "mpp", "augmentation", "postprocess", "resume"):
        assert key in config, key
    assert config["pretrained"] is None and config["lora_targets"] == ["qkv", "proj"]
    assert config["postprocess"]["mode"] == "hv" and config["fold_seed"] == 19 and config["monitor"] == "pq"


def test_lr_schedule_warmup_then_cosine():
    f = [train.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[99] < 0.01


def test_cross_validation_outputs(synthetic_data_dir, tmp_path):
    out = tmp_path / "cv"
    config = train.config_from_args(_args(synthetic_data_dir, out, "--cross_validation", "--num_folds", "2"))
    calls = []
    summary = train.run_training(config, out, epoch_callback=lambda k, e, v: calls.append((k, e, v["pq"])))
    assert [c[:2] for c in calls] == [(0, 1), (1, 1)]
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert summary["test_mean"] is not None and "pq" in summary["test_sd"] and "pq" in summary["val_mean"]
    assert summary["params"]["percent"] < 3.0 and summary["params"]["head"] > 0
    for name in ("config.json", "folds.json", "cv_summary.csv", "cv_summary.md", "best_model.pth"):
        assert (out / name).is_file(), name
    saved = utils.read_json(out / "config.json")
    assert saved["lora_rank"] == 4 and "environment" in saved and "git_commit" in saved["environment"]
    assert saved["tile_size"] == 128  # the synthetic images' side: predict tiles new images at this size
    for k in (0, 1):
        rows = utils.read_csv(out / f"fold_{k}" / "history.csv")
        assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["train_loss"]) > 0 and "val_pq" in rows[0]
        for name in ("best_model.pth", "last_model.pth"):
            ckpt = torch.load(out / f"fold_{k}" / name, weights_only=True)
            assert ckpt["fold"] == k and ckpt["epoch"] == 1
    cv_rows = utils.read_csv(out / "cv_summary.csv")
    assert [r["fold"] for r in cv_rows] == ["0", "1", "mean", "sd"]
    assert "±" in (out / "cv_summary.md").read_text()
    index = torch.load(out / "best_model.pth", weights_only=True)
    assert index["format"] == nm.MODEL_SET_FORMAT and index["folds"] == {"0": "fold_0/best_model.pth",
                                                                         "1": "fold_1/best_model.pth"}
    ms = nm.load_model_set(out / "best_model.pth", "cpu")
    folds = utils.read_json(out / "folds.json")
    assert ms.is_cv and [m.fold for m in ms.members] == [0, 1]
    for m in ms.members:
        assert m.test_images == [folds["images"][i] for i in folds["folds"][m.fold]["test"]]
        assert not set(m.test_images) & set(m.val_images or [])


def test_single_split_same_seed_same_losses(synthetic_data_dir, tmp_path):
    histories = []
    for name in ("a", "b"):
        out = tmp_path / name
        config = train.config_from_args(_args(synthetic_data_dir, out, "--fold", "1", "--epochs", "2",
                                              "--num_folds", "3"))
        summary = train.run_training(config, out, evaluate_test=False)
        assert summary["folds"][0]["fold"] == 1 and summary["folds"][0]["test"] is None
        assert summary["test_mean"] is None
        assert (out / "best_model.pth").is_file() and not (out / "cv_summary.csv").exists()
        histories.append([float(r["train_loss"]) for r in utils.read_csv(out / "fold_1" / "history.csv")])
    assert len(histories[0]) == 2 and histories[0] == histories[1]
    single = nm.load_model_set(tmp_path / "a" / "best_model.pth", "cpu")
    assert not single.is_cv and single.members[0].fold == 1 and single.members[0].test_images


def test_refuses_non_empty_output_and_missing_pretrained(synthetic_data_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty.*--resume"):
        train.run(_args(synthetic_data_dir, out))
    assert (out / "something.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="nothing to resume"):
        train.run(_args(synthetic_data_dir, tmp_path / "empty", "--resume"))
    args = _args(synthetic_data_dir, tmp_path / "new")
    args.pretrained = str(tmp_path / "weights" / "mobile_sam.pt")
    with pytest.raises(UserError, match="python main.py download --output_dir weights"):
        train.run(args)


def test_resume_after_kill(synthetic_data_dir, tmp_path):
    """Kill a `main.py train` run after its first checkpoint, resume it, compare with an uninterrupted run."""
    out = tmp_path / "killed"
    extra = ("--epochs", "3", "--num_folds", "3")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    proc = subprocess.Popen(_cli(synthetic_data_dir, out, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    last = out / "fold_0" / "last_model.pth"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert last.exists() and not (out / "fold_0" / "result.json").exists()
    done = subprocess.run(_cli(synthetic_data_dir, out, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed after epoch" in done.stderr
    rows = utils.read_csv(out / "fold_0" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert (out / "best_model.pth").is_file() and (out / "fold_0" / "result.json").is_file()
    # same losses as a run that was never interrupted
    ref = tmp_path / "ref"
    train.run_training(train.config_from_args(_args(synthetic_data_dir, ref, *extra)), ref, evaluate_test=False)
    ref_rows = utils.read_csv(ref / "fold_0" / "history.csv")
    for a, b in zip(rows, ref_rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)


def test_tune_postprocess_picks_from_grid_around_defaults(synthetic_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "tuned"
    config = train.config_from_args(_args(synthetic_data_dir, out, "--tune_postprocess", "--num_folds", "3"))
    chosen = []
    real_tune = train.tune_postprocess
    monkeypatch.setattr(train, "tune_postprocess", lambda *a, **k: chosen.append(real_tune(*a, **k)) or chosen[-1])
    train.run_training(config, out, evaluate_test=False)
    base = config["postprocess"]
    saved = torch.load(out / "fold_0" / "best_model.pth", weights_only=True)["postprocess"]
    assert len(chosen) == 1 and saved == chosen[0].to_dict()
    fg_grid = [round(min(max(base["fg_threshold"] + o, 0.05), 0.95), 4) for o in train.TUNE_FG_OFFSETS]
    marker_grid = [base["marker_threshold"] * f for f in train.TUNE_MARKER_FACTORS]
    assert saved["fg_threshold"] in fg_grid
    assert any(saved["marker_threshold"] == pytest.approx(m) for m in marker_grid)
    untouched = {k: v for k, v in base.items() if k not in ("fg_threshold", "marker_threshold")}
    assert {k: saved[k] for k in untouched} == untouched


def test_process_device_is_one_gpu_per_torchrun_process(monkeypatch):
    """Under torchrun every process must own cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU), even
    when --device names one GPU; no CUDA device is touched (all faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert train.process_device(None, 2) == torch.device("cuda:2")
    assert train.process_device("cuda", 3) == torch.device("cuda:3")
    assert train.process_device("cuda:0", 1) == torch.device("cuda:1")
    assert train.process_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(UserError, match="--nproc_per_node 4"):
        train.process_device("cuda", 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_under_autocast(synthetic_data_dir, tmp_path, monkeypatch, dtype):
    """The CUDA mixed-precision paths (bf16; float16 with a GradScaler) simulated with CPU autocast: training,
    validation on autocast outputs, checkpoints with CPU tensors only (scaler state included), resumable."""
    monkeypatch.setattr(nm, "autocast_dtype", lambda device, amp=True, fp16_fallback=False:
                        dtype if amp and (dtype == torch.bfloat16 or fp16_fallback) else None)
    out = tmp_path / "amp"
    summary = train.run_training(train.config_from_args(_args(synthetic_data_dir, out, "--num_folds", "3")), out,
                                 evaluate_test=False)
    assert summary["folds"][0]["best_epoch"] == 1
    row = utils.read_csv(out / "fold_0" / "history.csv")[0]
    assert float(row["train_loss"]) > 0 and row["val_pq"] != ""
    last = torch.load(out / "fold_0" / "last_model.pth", weights_only=True)
    if dtype == torch.float16:  # the first steps find inf gradients at the initial scale and are skipped
        assert last["scaler"]["scale"] > 0
    else:
        assert last["scaler"] is None and last["optimizer"]["state"]
    moments = [t for s in last["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in moments)


def test_bad_pretrained_fails_before_anything_is_written(synthetic_data_dir, tmp_path):
    junk = tmp_path / "mobile_sam.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    args = _args(synthetic_data_dir, out)
    args.pretrained = str(junk)
    with pytest.raises(UserError, match="mobile_sam.pt"):
        train.run(args)
    assert not out.exists()  # so the corrected command can run in the same folder


def test_negative_seeds_are_user_errors(synthetic_data_dir, tmp_path):
    for option in ("--seed", "--fold_seed"):
        with pytest.raises(UserError, match=f"{option} -1"):
            train.run(_args(synthetic_data_dir, tmp_path / option.strip("-"), option, "-1"))


def test_resume_refuses_changed_options(synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    train.run(_args(synthetic_data_dir, out, "--num_folds", "3"))
    with pytest.raises(UserError, match=r"--epochs 5 \(saved: 1\)"):
        train.run(_args(synthetic_data_dir, out, "--num_folds", "3", "--epochs", "5", "--resume"))
    # runtime options may change, and options left at their defaults mean "as saved"
    assert train.run(_args(synthetic_data_dir, out, "--num_folds", "3", "--resume", "--num_workers", "0")) == 0


def test_data_dir_is_recorded_absolute(synthetic_data_dir, tmp_path, monkeypatch):
    """Issue 19: the config recorded --data_dir as given (relative to where train ran), so evaluate/demo
    without --data_dir from another folder did not find the data."""
    monkeypatch.chdir(synthetic_data_dir.parent)
    config = train.config_from_args(_args(synthetic_data_dir.name, tmp_path / "out"))
    assert config["data_dir"] == str(synthetic_data_dir) and os.path.isabs(config["data_dir"])
    monkeypatch.chdir(tmp_path)
    assert train.discover_training_data(dict(config))  # still found from another folder


def test_resume_with_overwrite_is_refused(synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^--resume and --overwrite: choose one"):
        train.run(_args(synthetic_data_dir, out, "--resume", "--overwrite"))
    assert not out.exists()
