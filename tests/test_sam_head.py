"""`--head sam`: MobileSAM's own mask decoder as a trainable, promptless head (nuclei_model + train).

The shared reference weights (random values in the official `mobile_sam.pt` layout) stand in for the official
file. Small inputs (64 px), one epoch: these tests check wiring, not accuracy.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

import main
import model as mobile_sam
import nuclei_model as nm
import sam_decoder
import train
from utils import UserError, read_csv, read_json

CONFIG = {"pretrained": None, "head": "sam", "input_size": 64, "lora_rank": 4, "lora_alpha": 4.0,
          "lora_dropout": 0.0, "lora_targets": ["qkv", "proj", "fc1", "fc2"], "train_only_lora": True}
FROZEN = ("head.prompt_encoder.", "head.mask_decoder.iou_prediction_head.",
          "head.mask_decoder.output_hypernetworks_mlps.1.", "head.mask_decoder.output_hypernetworks_mlps.2.",
          "head.mask_decoder.output_hypernetworks_mlps.3.")


@pytest.fixture(scope="module")
def weights(reference_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    shutil.copy(reference_dir / "mobile_sam_random_weights.pt", path)
    return path


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_pretrained_sam_head_weights_and_trainable_set(weights, one_torch_thread):
    net = nm.build_model({**CONFIG, "pretrained": str(weights)})
    assert isinstance(net.head, sam_decoder.SAMHead)
    base = torch.load(weights, weights_only=True)
    head_state = net.head.state_dict()
    for key, value in head_state.items():  # every decoder tensor comes from the file
        assert torch.equal(value, base[key]), key
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for k in trainable:
        assert "lora_" in k or (k.startswith("head.mask_decoder.") and not k.startswith(FROZEN)), k
    # LoRA on all four kinds of encoder linear layers
    for kind in ("qkv", "proj", "fc1", "fc2"):
        assert any(f".{kind}.lora_A" in k for k in trainable), kind
    assert any(k.startswith("head.mask_decoder.transformer.") for k in trainable)
    assert not any(k.startswith(FROZEN) for k in trainable)
    report = nm.parameter_report(net)
    assert report["head"] == 6_220 + 4_058_340


@pytest.mark.parametrize("size", [64, 128])
def test_head_is_the_decoder_without_prompts_upsampled(weights, size, one_torch_thread):
    """Two paths agree: the head's logits = the standalone decoder (no prompt, single mask) on the neck
    embedding, bilinearly upsampled to the input size."""
    net = nm.build_model({**CONFIG, "pretrained": str(weights), "lora_rank": 0, "input_size": size})
    x = _images(2, size)
    with torch.no_grad():
        out = net(x)
        emb = net.encoder(mobile_sam.normalize_image(x))
        decoder = sam_decoder.load_mobile_sam_decoder(weights)
        low, iou = decoder(emb)
        ref = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    assert set(out) == {"foreground"} and out["foreground"].shape == (2, 1, size, size)
    assert low.shape == (2, 1, size // 4, size // 4) and iou.shape == (2, 1)
    torch.testing.assert_close(out["foreground"], ref, atol=1e-5, rtol=1e-5)


def test_loss_without_hv_decreases(weights, one_torch_thread):
    torch.manual_seed(0)
    net = nm.build_model({**CONFIG, "pretrained": str(weights)}).train()
    x = _images(2, 64, seed=1)
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 16:40, 20:44] = 1.0
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss, parts = nm.compute_loss(net(x), {"foreground": target})
        assert set(parts) == {"bce", "dice"}
        opt.zero_grad()
        loss.backward()
        # every trainable tensor gets a gradient (DDP needs no unused parameters)
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9, losses


def test_checkpoint_trainable_only_stores_decoder_and_lora(weights, tmp_path, one_torch_thread):
    config = {**CONFIG, "pretrained": str(weights)}
    net = nm.build_model(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path / "best_model.pth"
    nm.save_checkpoint(path, net, config, train.default_postprocess("sam"))
    raw = torch.load(path, weights_only=True)
    assert raw["state_kind"] == "trainable"
    keys = set(raw["state_dict"])
    assert keys == {k for k, p in net.named_parameters() if p.requires_grad}
    assert not any(k.startswith(FROZEN) for k in keys)  # the frozen prompt encoder comes from the base file
    assert any(k.startswith("head.mask_decoder.") for k in keys)
    assert raw["postprocess"]["mode"] == "binary" and raw["postprocess"]["watershed"] is True
    loaded = nm.load_model(path)
    x = _images(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["foreground"], net.eval()(x)["foreground"])
        torch.testing.assert_close(nm.prepare_for_inference(loaded)(x)["foreground"],
                                   net(x)["foreground"], atol=1e-4, rtol=1e-4)


def test_checkpoint_without_pretrained_stores_random_prompt_encoder(tmp_path, one_torch_thread):
    """--pretrained none: nothing but the checkpoint can reproduce the random prompt encoder, so it is stored."""
    torch.manual_seed(5)
    net = nm.build_model(CONFIG)
    path = tmp_path / "full.pth"
    nm.save_checkpoint(path, net, CONFIG, train.default_postprocess("sam"))
    raw = torch.load(path, weights_only=True)
    assert raw["state_kind"] == "full"
    assert "head.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in raw["state_dict"]
    assert "head.prompt_encoder.no_mask_embed.weight" in raw["state_dict"]
    torch.manual_seed(6)  # another random init underneath: loading must overwrite all of it
    loaded = nm.load_model(path)
    x = _images(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["foreground"], net.eval()(x)["foreground"])


def test_base_file_without_decoder_is_one_line_error(tmp_path):
    enc = mobile_sam.MobileSAMEncoder()
    path = tmp_path / "encoder_only.pt"
    torch.save({"image_encoder." + k: v for k, v in enc.state_dict().items()}, path)
    with pytest.raises(UserError, match=r"encoder_only\.pt.*prompt_encoder") as err:
        nm.build_model({**CONFIG, "pretrained": str(path)})
    assert "\n" not in str(err.value)


def test_train_evaluate_demo_predict_with_sam_head(weights, synthetic_data_dir, tmp_path, one_torch_thread):
    out = tmp_path / "sam"
    assert main.main(["-q", "train", "--data_dir", str(synthetic_data_dir), "--output_dir", str(out),
                      "--head", "sam", "--pretrained", str(weights), "--train_only_lora",
                      "--lora_targets", "qkv,proj,fc1,fc2", "--input_size", "64", "--epochs", "1",
                      "--batch_size", "4", "--cross_validation", "--num_folds", "2", "--num_workers", "0",
                      "--device", "cpu", "--no_augment"]) == 0
    config = read_json(out / "config.json")
    assert config["head"] == "sam" and config["postprocess"]["watershed"] is True
    ckpt = torch.load(out / "fold_0" / "best_model.pth", weights_only=True)
    assert ckpt["state_kind"] == "trainable"
    assert not any(k.startswith("head.prompt_encoder.") for k in ckpt["state_dict"])
    rows = read_csv(out / "fold_0" / "history.csv")
    assert float(rows[0]["train_loss"]) > 0 and "train_mse" not in rows[0]

    assert main.main(["-q", "evaluate", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "evaluation"),
                      "--num_workers", "0"]) == 0
    assert len(read_csv(tmp_path / "evaluation" / "per_image.csv")) == 12
    assert main.main(["-q", "demo", "--data_dir", str(synthetic_data_dir), "--model_path",
                      str(out / "best_model.pth"), "--output_dir", str(tmp_path / "demo"),
                      "--num_samples", "1"]) == 0
    image = next(synthetic_data_dir.glob("*/tissue images/*.png"))
    assert main.main(["-q", "predict", "--model_path", str(out / "best_model.pth"), "--input", str(image),
                      "--output_dir", str(tmp_path / "pred"), "--no_overlay"]) == 0
    labels = tifffile.imread(tmp_path / "pred" / f"{image.stem}_labels.tif")
    assert labels.dtype == np.uint32 and labels.shape == (128, 128)


def test_train_sam_head_without_pretrained_weights(synthetic_data_dir, tmp_path, one_torch_thread):
    out = tmp_path / "sam_none"
    assert main.main(["-q", "train", "--data_dir", str(synthetic_data_dir), "--output_dir", str(out),
                      "--head", "sam", "--pretrained", "none", "--train_only_lora", "--input_size", "64",
                      "--epochs", "1", "--batch_size", "4", "--fold", "0", "--num_folds", "2",
                      "--num_workers", "0", "--device", "cpu", "--no_augment"]) == 0
    ckpt = torch.load(out / "fold_0" / "best_model.pth", weights_only=True)
    assert ckpt["state_kind"] == "full" and ckpt["config"]["head"] == "sam"
    summary = read_json(out / "summary.json")
    assert summary["params"]["trainable"] < summary["params"]["total"]


def test_parameter_search_with_sam_head(synthetic_data_dir, tmp_path, one_torch_thread):
    out = tmp_path / "search"
    assert main.main(["-q", "parameter_search", "--data_dir", str(synthetic_data_dir), "--output_dir", str(out),
                      "--head", "sam", "--pretrained", "none", "--train_only_lora", "--input_size", "64",
                      "--epochs", "1", "--num_folds", "2", "--batch_size", "4", "--num_workers", "0",
                      "--device", "cpu", "--val_fraction", "0.2", "--lora_ranks", "2", "--lora_alphas", "4",
                      "--learning_rates", "1e-3"]) == 0
    assert len(read_csv(out / "results.csv")) == 1
