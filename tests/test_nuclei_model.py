"""Tests of nuclei_model.py: head shapes, parameter budget, loss, checkpoints, model sets, inference."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import model as mobile_sam
import nuclei_model as nm
from utils import UserError

CONFIG = {"pretrained": None, "head": "hv", "input_size": 64, "lora_rank": 4, "lora_alpha": 4.0,
          "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "train_only_lora": True}


@pytest.fixture(scope="module")
def fake_pretrained(tmp_path_factory):
    """A random encoder saved in the official mobile_sam.pt key layout (no real weights needed)."""
    torch.manual_seed(123)
    enc = mobile_sam.MobileSAMEncoder()
    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    torch.save({"image_encoder." + k: v for k, v in enc.state_dict().items()}, path)
    return path


def _perturb_trainable(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [64, 128])
def test_output_shapes(size):
    torch.manual_seed(0)
    net = nm.build_model(CONFIG)
    with torch.no_grad():
        out = net(_images(2, size))
    assert out["foreground"].shape == (2, 1, size, size)
    assert out["hv"].shape == (2, 2, size, size)
    assert torch.isfinite(out["foreground"]).all() and torch.isfinite(out["hv"]).all()
    binary = nm.build_model({**CONFIG, "head": "binary"})
    with torch.no_grad():
        out_b = binary(_images(1, size).float())  # float 0..255 works as well as uint8
    assert set(out_b) == {"foreground"} and out_b["foreground"].shape == (1, 1, size, size)


def _head_features(batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random encoder features of the shapes `forward_features` gives for a (height, width) input."""
    g = torch.Generator().manual_seed(seed)
    channels = mobile_sam.MobileSAMEncoder.feature_channels
    strides = {"stride4": 4, "stride8": 8, "stride16": 16, "neck": 16}
    return {k: torch.randn(batch, channels[k], -(-height // s), -(-width // s), generator=g)
            for k, s in strides.items()}


@pytest.mark.parametrize("height,width", [(64, 128), (192, 64), (96, 160), (100, 150)])
def test_head_shapes_non_square(height, width):
    """Both head variants give input-resolution maps for non-square inputs (head alone and whole network)."""
    torch.manual_seed(0)
    image = torch.randn(2, 3, height, width)
    feats = _head_features(2, height, width)
    for head, keys in (("hv", {"foreground", "hv"}), ("binary", {"foreground"})):
        out = nm.DecoderHead(mobile_sam.MobileSAMEncoder.feature_channels, head).eval()(image, feats)
        assert set(out) == keys
        assert out["foreground"].shape == (2, 1, height, width)
        if head == "hv":
            assert out["hv"].shape == (2, 2, height, width)
        assert all(torch.isfinite(v).all() for v in out.values())
    with torch.no_grad():
        out = nm.build_model({**CONFIG, "head": "binary"})(torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8))
    assert set(out) == {"foreground"} and out["foreground"].shape == (1, 1, 64, 128)


def test_head_does_little_work_at_full_resolution():
    """The speed design: the head's convolutions and normalisations run at half resolution or less, except
    the stride-2 image stem (which reads the image) and the thin (16-channel) full-resolution refinement."""
    size = 128
    head = nm.DecoderHead(mobile_sam.MobileSAMEncoder.feature_channels, "hv").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, tuple(inp[0].shape[-2:]))))
             for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    out = head(torch.randn(1, 3, size, size), _head_features(1, size, size))
    for h in hooks:
        h.remove()
    assert out["hv"].shape[-2:] == (size, size)
    full = [m for m, s in seen if s == (size, size)]
    assert full == [head.stem2[0], head.refine1[0], head.refine1[2]], full
    assert head.stem2[0].stride == (2, 2) and head.stem2[0].in_channels == 3
    assert head.refine1[0].out_channels <= 16
    assert max(s[0] * s[1] for m, s in seen if s != (size, size)) <= (size // 2) ** 2


def test_prepared_head_runs_channels_last_with_the_same_outputs():
    """prepare_for_inference puts the head on channels-last tensors (faster on CPU): same maps, contiguous."""
    torch.manual_seed(0)
    net = nm.build_model({**CONFIG, "lora_rank": 0})
    _perturb_trainable(net)
    fast = nm.prepare_for_inference(net)
    assert fast.head.channels_last and not net.head.channels_last
    assert fast.head.refine1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = _images(2, 128, seed=3)
    with torch.no_grad():
        ref, out = net(x), fast(x)
    for key in ("foreground", "hv"):
        assert out[key].is_contiguous()
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)


def test_half_resolution_stem_is_aligned_with_bilinear_upsampling():
    """Hand-computed geometry: with a box-filter kernel the stride-2 stem turns a horizontal ramp (value =
    column) into column 2i + 0.5 at half-resolution pixel i (the mean of columns 2i-1 .. 2i+2), and bilinear
    upsampling (align_corners=False, as the head uses) gives back the ramp exactly away from the borders: no
    half-pixel shift between the half-resolution maps and the input."""
    head = nm.DecoderHead(mobile_sam.MobileSAMEncoder.feature_channels, "hv")
    conv = head.stem2[0]
    assert conv.kernel_size == (4, 4) and conv.stride == (2, 2) and conv.padding == (1, 1)
    size = 32
    ramp = torch.arange(size, dtype=torch.float32).expand(1, 1, size, size)
    box = torch.nn.functional.conv2d(ramp, torch.full((1, 1) + conv.kernel_size, 1 / 16), stride=conv.stride,
                                     padding=conv.padding)
    assert box.shape[-2:] == (size // 2, size // 2)
    assert torch.allclose(box[0, 0, 2, 1:-1], 2 * torch.arange(1, size // 2 - 1, dtype=torch.float32) + 0.5)
    back = torch.nn.functional.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(back[0, 0, 4:-4, 4:-4], ramp[0, 0, 4:-4, 4:-4], atol=1e-5)


def test_parameter_budget_rank4():
    net = nm.build_model(CONFIG)
    report = nm.parameter_report(net)
    # hand count (conv weights + GroupNorm affine): ConvNormAct(i, o, k) = i*o*k*k + 2o, SepConv(i, o) =
    # 9i + i*o + 2o; lat16 CNA(256,128) 33,024 + ref16 17,792 + lat8 CNA(128,48) 6,240 + fuse8 SepConv(176,80)
    # 15,824 + res 7,280 + lat4 CNA(64,32) 2,112 + fuse4 SepConv(112,64) 8,304 + res 4,800 + reduce4 CNA(64,24)
    # 1,584 + stem2 4x4 conv (3 -> 24) + GroupNorm 1,200 + fuse2 840 + foreground SepConv(24,24) 840 + 1x1 25
    # + hv 840 + 50 + subpixel 1x1 (24 -> 12) 300 + refine1 3x3 (6 -> 16) 880 + 3x3 (16 -> 3) 435
    assert report["head"] == 102_370
    # binary: no hv branch (890), subpixel 24 -> 4 (100), refine1 4 -> 16 (592) and 16 -> 1 (145)
    assert nm.head_parameter_count(nm.build_model({**CONFIG, "head": "binary"})) == 102_370 - 890 - 200 - 288 - 290
    assert report["percent"] < 3.0
    assert report["trainable"] == sum(p.numel() for n, p in net.named_parameters()
                                      if "lora" in n or n.startswith("head."))
    # everything trainable without train_only_lora
    full = nm.parameter_report(nm.build_model({**CONFIG, "train_only_lora": False}))
    assert full["trainable"] == full["total"]


def test_train_mode_keeps_frozen_encoder_batchnorm_in_eval():
    net = nm.build_model(CONFIG).train()
    bns = [m for m in net.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert net.head.training


def test_loss_terms_and_masking():
    torch.manual_seed(0)
    fg = torch.zeros(2, 1, 32, 32)
    fg[:, :, 8:20, 8:20] = 1
    hv = torch.zeros(2, 2, 32, 32)
    hv[:, 0, 8:20, 8:20] = torch.linspace(-1, 1, 12)
    hv[:, 1, 8:20, 8:20] = torch.linspace(-1, 1, 12)[:, None]
    batch = {"foreground": fg, "hv": hv}
    perfect = {"foreground": (fg * 2 - 1) * 20, "hv": hv.clone()}
    loss, parts = nm.compute_loss(perfect, batch)
    assert set(parts) == {"bce", "dice", "mse", "msge"}
    assert parts["mse"] == 0 and parts["msge"] == 0 and parts["bce"] < 1e-6 and parts["dice"] < 1e-3
    # a gradient error in the background counts in the MSE but not in the MSGE (restricted to nuclei)
    noisy = {"foreground": perfect["foreground"], "hv": hv.clone()}
    noisy["hv"][:, :, 24:, 24:] = torch.randn(2, 2, 8, 8)
    _, p2 = nm.compute_loss(noisy, batch)
    assert p2["mse"] > 0 and p2["msge"] == 0
    noisy["hv"][:, :, 10:14, 10:14] += 0.5 * torch.randn(2, 2, 4, 4)
    _, p3 = nm.compute_loss(noisy, batch)
    assert p3["msge"] > 0
    # binary head: no HV terms; custom weights
    loss_b, pb = nm.compute_loss({"foreground": perfect["foreground"]}, batch, weights={"dice": 0.0})
    assert set(pb) == {"bce", "dice"} and float(loss_b) == pytest.approx(pb["bce"], abs=1e-7)


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    net = nm.build_model(CONFIG).train()
    x = _images(2, 64)
    fg = torch.zeros(2, 1, 64, 64)
    fg[:, :, 16:40, 20:44] = 1
    hv = torch.zeros(2, 2, 64, 64)
    hv[:, 0, 16:40, 20:44] = torch.linspace(-1, 1, 24)
    hv[:, 1, 16:40, 20:44] = torch.linspace(-1, 1, 24)[:, None]
    batch = {"foreground": fg, "hv": hv}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = nm.compute_loss(net(x), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip_trainable_only(tmp_path, fake_pretrained):
    config = {**CONFIG, "pretrained": str(fake_pretrained)}
    net = nm.build_model(config)
    _perturb_trainable(net)
    path = tmp_path / "best_model.pth"
    nm.save_checkpoint(path, net, config, {"mode": "hv", "fg_threshold": 0.45}, epoch=3, fold=None,
                       val={"pq": 0.5}, rng=torch.get_rng_state())
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == nm.CHECKPOINT_FORMAT and raw["state_kind"] == "trainable"
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert set(raw["state_dict"]) == trainable
    assert raw["base_weights"]["sha1"] and raw["base_weights"]["size"] == fake_pretrained.stat().st_size
    assert path.stat().st_size < 3_000_000
    ms = nm.load_model_set(path, "cpu")
    assert not ms.is_cv and len(ms.members) == 1 and ms.postprocess["fg_threshold"] == 0.45
    loaded = ms.members[0].model
    assert not loaded.training
    x = _images(1, 64)
    with torch.no_grad():
        a, b = net.eval()(x), loaded(x)
    torch.testing.assert_close(a["foreground"], b["foreground"])
    torch.testing.assert_close(a["hv"], b["hv"])
    # merged LoRA + fused BN give the same maps
    fast = nm.prepare_for_inference(loaded)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)["hv"], a["hv"], atol=1e-4, rtol=1e-4)


def test_checkpoint_base_weights_moved_or_changed(tmp_path, fake_pretrained, caplog):
    base = tmp_path / "moved.pt"
    base.write_bytes(fake_pretrained.read_bytes())
    config = {**CONFIG, "pretrained": str(base)}
    net = nm.build_model(config)
    path = tmp_path / "m.pth"
    nm.save_checkpoint(path, net, config, {})
    base.unlink()
    with pytest.raises(UserError, match="--pretrained"):
        nm.load_model_set(path, "cpu")
    # override with a file of other content: loads with a warning
    other = tmp_path / "other.pt"
    state = torch.load(fake_pretrained, weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other)
    with caplog.at_level(logging.WARNING):
        ms = nm.load_model_set(path, "cpu", pretrained=other)
    assert len(ms.members) == 1 and "differ" in caplog.text


def test_checkpoint_round_trip_full_state(tmp_path):
    config = {**CONFIG, "train_only_lora": False}
    net = nm.build_model(config)
    _perturb_trainable(net)
    bn = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.add_(0.3)  # a fully fine-tuned encoder's BN statistics must travel too
    path = tmp_path / "full.pth"
    nm.save_checkpoint(path, net, config, {})
    raw = torch.load(path, weights_only=True)
    assert raw["state_kind"] == "full" and raw["base_weights"] is None
    loaded = nm.load_model_set(path, "cpu").members[0].model
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_incompatible_or_corrupt_checkpoints(tmp_path):
    net = nm.build_model(CONFIG)
    path = tmp_path / "r4.pth"
    nm.save_checkpoint(path, net, CONFIG, {})
    other_rank = nm.build_model({**CONFIG, "lora_rank": 2})
    with pytest.raises(UserError, match="r4.pth.*(shape|missing|unexpected)"):
        nm.load_weights(other_rank, path)
    no_lora = nm.build_model({**CONFIG, "lora_rank": 0})
    with pytest.raises(UserError, match="r4.pth"):
        nm.load_weights(no_lora, path)
    # a checkpoint whose state dict lost keys
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for i, (k, v) in enumerate(ckpt["state_dict"].items()) if i % 2}
    torch.save(ckpt, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing.pth.*missing"):
        nm.load_model_set(tmp_path / "missing.pth")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="foreign.pth.*format"):
        nm.load_model_set(tmp_path / "foreign.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        nm.load_model_set(tmp_path / "garbage.pth")
    with pytest.raises(UserError, match="nope.pth"):
        nm.load_model_set(tmp_path / "nope.pth")


def test_missing_pretrained_file_message(tmp_path):
    with pytest.raises(UserError, match="python main.py download --output_dir weights"):
        nm.build_model({**CONFIG, "pretrained": str(tmp_path / "mobile_sam.pt")})


def test_predict_maps_original_resolution_and_ensemble():
    torch.manual_seed(0)
    a, b = nm.build_model(CONFIG), nm.build_model(CONFIG)
    _perturb_trainable(b, seed=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)
    fg_a, hv_a = nm.predict_maps(a, image, 64, "cpu")
    fg_b, hv_b = nm.predict_maps([b], image, 64, "cpu")
    fg, hv = nm.predict_maps([a, b], image, 64, "cpu")
    assert fg.shape == (100, 90) and fg.dtype == np.float32 and hv.shape == (2, 100, 90)
    assert 0 <= fg.min() and fg.max() <= 1
    np.testing.assert_allclose(fg, (fg_a + fg_b) / 2, atol=1e-5)
    np.testing.assert_allclose(hv, (hv_a + hv_b) / 2, atol=1e-5)
    other = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    batch = nm.predict_maps_batch([a], [image, other], 64, "cpu")
    np.testing.assert_allclose(batch[0][0], fg_a, atol=1e-5)
    assert batch[1][0].shape == (64, 80)
    fg_bin, hv_bin = nm.predict_maps(nm.build_model({**CONFIG, "head": "binary"}), image, 64, "cpu")
    assert hv_bin is None and fg_bin.shape == (100, 90)


def _fake_cuda(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("capability, inference, training", [((9, 0), torch.bfloat16, torch.bfloat16),
                                                             ((8, 0), torch.bfloat16, torch.bfloat16),
                                                             ((7, 5), None, torch.float16)])
def test_autocast_dtype_bf16_only_on_native_hardware(monkeypatch, capability, inference, training):
    """torch.cuda.is_bf16_supported() also says yes for emulated bf16 (V100/T4): those GPUs must get
    float16 + GradScaler for training and full precision for inference, not slow emulated bf16."""
    _fake_cuda(monkeypatch, capability)
    assert nm.autocast_dtype("cuda:1", True) == inference
    assert nm.autocast_dtype("cuda", True, fp16_fallback=True) == training
    assert nm.autocast_dtype("cuda", False, fp16_fallback=True) is None
    assert nm.autocast_dtype("cpu", True, fp16_fallback=True) is None


def test_training_step_and_outputs_under_bf16_autocast():
    """What a CUDA bf16 run does, simulated with CPU bf16 autocast: float32 loss, float32 gradients,
    float32 numpy maps from bf16 network outputs."""
    torch.manual_seed(0)
    for train_only_lora in (True, False):
        net = nm.build_model({**CONFIG, "train_only_lora": train_only_lora}).train()
        batch = {"image": _images(2, 64), "foreground": (torch.rand(2, 1, 64, 64) > 0.7).float(),
                 "hv": torch.rand(2, 2, 64, 64) * 2 - 1}
        with nm.autocast("cpu", torch.bfloat16):
            out = net(batch["image"])
        assert out["foreground"].dtype == out["hv"].dtype == torch.bfloat16
        loss, parts = nm.compute_loss(out, batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and set(parts) == {"bce", "dice", "mse", "msge"}
        loss.backward()
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        for name, p in trainable:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        maps = nm.maps_to_images({k: v.detach() for k, v in out.items()}, [(50, 70), (64, 64)])
        assert maps[0][0].dtype == maps[0][1].dtype == np.float32 and maps[0][1].shape == (2, 50, 70)


def test_checkpoint_extra_tensors_are_cpu_copies(tmp_path):
    """An optimizer state dict (on the GPU in a CUDA run) is stored as CPU copies, so plain
    torch.load(weights_only=True) reads the checkpoint on a machine without that GPU."""
    net = nm.build_model(CONFIG)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    copied = nm.to_cpu({"optimizer": state, "scaler": None, "betas": (0.9, 0.999)})
    assert copied["betas"] == (0.9, 0.999) and copied["scaler"] is None
    live = state["state"][0]["exp_avg"]
    saved = copied["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(saved, live) and saved.data_ptr() != live.data_ptr()
    path = tmp_path / "last.pth"
    nm.save_checkpoint(path, net, CONFIG, {}, optimizer=state, rng={"torch": torch.get_rng_state()})
    raw = torch.load(path, weights_only=True)

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    found = list(tensors(raw))
    assert len(found) > len(raw["state_dict"]) and all(t.device.type == "cpu" for t in found)
    opt2 = torch.optim.AdamW(trainable, lr=1e-3)
    opt2.load_state_dict(raw["optimizer"])


def test_unreadable_files_are_one_line_and_a_folder_is_named_a_folder(tmp_path):
    """Issue 19: PyTorch's multi-line weights_only advice was embedded in the error; a folder given as
    --pretrained was 'file not found'."""
    junk = tmp_path / "model.pth"
    junk.write_bytes(bytes(range(128, 256)) * 4)
    for read in (nm.read_checkpoint, mobile_sam.read_state_dict):
        with pytest.raises(UserError) as info:
            read(junk)
        message = str(info.value)
        assert message == f"{junk}: not a PyTorch checkpoint (neither a zip archive nor a pickle; wrong file or damaged)"
    numpy_ckpt = tmp_path / "numpy.pth"
    torch.save({"format": "x", "a": np.zeros(3)}, numpy_ckpt)
    with pytest.raises(UserError) as info:
        nm.read_checkpoint(numpy_ckpt)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert str(info.value).startswith(f"{numpy_ckpt}: a PyTorch checkpoint holding Python objects (numpy.")
    with pytest.raises(UserError, match=r"^--pretrained .*: is a folder, expected a file \(the official mobile_sam"):
        nm.build_model({"pretrained": str(tmp_path), "head": "hv", "input_size": 64, "lora_rank": 0})
    with pytest.raises(UserError, match=r": is a folder, expected a checkpoint file"):
        mobile_sam.read_state_dict(tmp_path)
