"""`train --init_model` and `train --all_data` (issue 18, points 4 and 7) on the tiny synthetic dataset."""
from __future__ import annotations

import argparse
import shutil

import pytest
import torch

import main
import nuclei_model as nm
import train
import utils

BASE = ["--pretrained", "none", "--batch_size", "4", "--epochs", "1", "--lora_rank", "2", "--num_workers", "0",
        "--no_augment", "--device", "cpu"]


def _args(data_dir, output_dir, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(["--data_dir", str(data_dir), "--output_dir", str(output_dir), *BASE, *extra])


@pytest.fixture(scope="module")
def first_model(synthetic_data_dir, tmp_path_factory, one_torch_thread):
    """A model trained from scratch (input size 64, LoRA rank 2, full fine-tuning: a "full" checkpoint)."""
    out = tmp_path_factory.mktemp("first")
    train.run(_args(synthetic_data_dir, out, "--input_size", "64", "--fold", "0", "--num_folds", "3"))
    return out / "best_model.pth"


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in nm.unwrap(net).state_dict().items()}


def test_init_model_keeps_the_model_and_records_its_lineage(synthetic_data_dir, first_model, tmp_path,
                                                            one_torch_thread):
    first = nm.read_checkpoint(first_model)
    out = tmp_path / "second"
    args = _args(synthetic_data_dir, out, "--init_model", str(first_model), "--all_data", "--learning_rate", "1e-5")
    config = train.apply_init_model(train.config_from_args(args), args)
    for key in ("head", "input_size", "lora_rank", "lora_alpha", "lora_targets", "mpp", "tile_size"):
        assert config[key] == first["config"][key], key
    assert config["input_size"] == 64 and config["pretrained"] is None  # a full checkpoint holds every weight
    assert config["postprocess"] == first["postprocess"]
    # the network training starts from is the first model, tensor for tensor
    start = train.build_initial_model(config)
    reference = nm.load_model(first_model)
    assert all(torch.equal(a, b) for a, b in zip(_state(start).values(), _state(reference).values()))
    assert train.run(args) == 0
    saved = utils.read_json(out / "config.json")
    fingerprint = nm.file_fingerprint(first_model)
    assert saved["init_from"]["sha1"] == fingerprint["sha1"] and saved["init_from"]["path"] == fingerprint["path"]
    assert saved["init_from"]["epoch"] == 1 and saved["init_from"]["init_from"] is None
    ckpt = nm.read_checkpoint(out / "best_model.pth")
    assert ckpt["config"]["init_from"]["sha1"] == fingerprint["sha1"]
    assert ckpt["config"]["input_size"] == 64
    after = nm.load_model(out / "best_model.pth")
    assert not all(torch.equal(a, b) for a, b in zip(_state(after).values(), _state(reference).values()))
    # --all_data: no test images, a validation subset, the summary says there is no held-out score
    folds = utils.read_json(out / "folds.json")
    assert folds["num_folds"] == 1 and folds["folds"][0]["test"] == []
    assert len(folds["folds"][0]["val"]) == 1 and len(folds["folds"][0]["train"]) == 11
    summary = utils.read_json(out / "summary.json")
    assert summary["held_out_score"] is None and "no held-out score exists" in summary["note"]
    assert summary["test_mean"] is None and not (out / "fold_0" / "test_per_image.csv").exists()
    # lineage of a second round
    third = tmp_path / "third"
    assert train.run(_args(synthetic_data_dir, third, "--init_model", str(out / "best_model.pth"), "--all_data",
                           "--val_fraction", "0")) == 0
    chain = utils.read_json(third / "config.json")["init_from"]
    assert chain["sha1"] == nm.file_fingerprint(out / "best_model.pth")["sha1"]
    assert chain["init_from"]["sha1"] == fingerprint["sha1"]
    assert utils.read_json(third / "folds.json")["folds"][0]["val"] == []


def test_init_model_conflicts_are_one_line_errors(synthetic_data_dir, first_model, tmp_path, run_error):
    out = tmp_path / "never"
    base = ["train", "--data_dir", str(synthetic_data_dir), "--output_dir", str(out), *BASE,
            "--init_model", str(first_model)]
    for flags, text in ((["--head", "binary"], "--head binary: the --init_model"),
                        (["--input_size", "128"], "--input_size 128"),
                        (["--lora_rank", "4"], "--lora_rank 4"),
                        (["--lora_targets", "qkv,proj,fc1"], "--lora_targets qkv,proj,fc1"),
                        (["--mpp", "0.4"], "--mpp 0.4"),
                        (["--tile_size", "96"], "--tile_size 96")):
        line = run_error(base + flags)
        assert text in line and "fine-tuning keeps" in line, line
        assert not out.exists()
    # the same values as the model's are fine to give
    args = _args(synthetic_data_dir, out, "--init_model", str(first_model), "--input_size", "64", "--head", "hv")
    assert train.apply_init_model(train.config_from_args(args), args)["input_size"] == 64
    # a cross-validation index is not one model
    index = tmp_path / "cv" / "best_model.pth"
    nm.save_model_set_index(index, nm.read_checkpoint(first_model)["config"], {}, {0: "fold_0/best_model.pth"})
    assert "fold_0/best_model.pth" in run_error(base[:-1] + [str(index)])
    assert "checkpoint not found" in run_error(base[:-1] + [str(tmp_path / "missing.pth")])
    # --all_data with folds or without validation but with early stopping
    assert "--cross_validation" in run_error(base + ["--all_data", "--cross_validation"])
    assert "--early_stopping" in run_error(base + ["--all_data", "--val_fraction", "0", "--early_stopping"])
    assert not out.exists()


def test_trainable_only_model_base_weights_checked_by_sha1(synthetic_data_dir, tmp_path, reference_dir, run_error,
                                                           one_torch_thread):
    """A LoRA + head checkpoint over base weights: fine-tuning rebuilds them from the recorded file and refuses
    a file with another SHA-1."""
    weights = tmp_path / "mobile_sam.pt"
    shutil.copy(reference_dir / "mobile_sam_random_weights.pt", weights)
    first = tmp_path / "lora"
    common = ["--data_dir", str(synthetic_data_dir), *BASE[2:], "--input_size", "64", "--train_only_lora"]
    assert main.main(["-q", "train", "--output_dir", str(first), "--pretrained", str(weights), *common,
                      "--fold", "0", "--num_folds", "3"]) == 0
    ckpt = nm.read_checkpoint(first / "best_model.pth")
    assert ckpt["state_kind"] == "trainable"
    args = _args(synthetic_data_dir, tmp_path / "x", "--init_model", str(first / "best_model.pth"))
    config = train.apply_init_model(train.config_from_args(args), args)
    assert config["pretrained"] == str(weights.resolve()) and config["train_only_lora"] is True
    start = train.build_initial_model(config)
    reference = nm.load_model(first / "best_model.pth")
    assert all(torch.equal(a, b) for a, b in zip(_state(start).values(), _state(reference).values()))
    trainable = {k for k, p in start.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in k or k.startswith("head.") for k in trainable)
    other = tmp_path / "other.pt"
    state = torch.load(weights, weights_only=True)
    key = next(k for k in state if k.startswith("image_encoder."))
    state[key] = state[key] + 1.0
    torch.save(state, other)
    line = run_error(["train", "--output_dir", str(tmp_path / "never"), "--pretrained", str(other), *common,
                      "--init_model", str(first / "best_model.pth")])
    assert "SHA-1" in line and not (tmp_path / "never").exists()
