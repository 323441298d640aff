"""Tests for model.py: golden reproduction of the official encoder, strict checkpoint reading, shapes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model
from utils import UserError

TOLERANCE = 1e-4  # relative L2 error allowed against the official encoder's output


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> dict:
    data = np.load(reference_dir / "mobile_sam_encoder_golden.npz")
    image = torch.from_numpy(data["image"]).permute(2, 0, 1)[None]
    return {"x": model.normalize_image(image), "embedding": torch.from_numpy(data["embedding"]),
            "weights": reference_dir / "mobile_sam_random_weights.pt"}


@pytest.fixture(scope="module")
def reference_state(golden: dict) -> dict:
    return torch.load(golden["weights"], map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def small_encoder() -> model.MobileSAMEncoder:
    torch.manual_seed(0)
    return model.load_mobile_sam_encoder(None)


def encoder_state(state: dict) -> dict:
    return {k[len("image_encoder."):]: v for k, v in state.items()
            if k.startswith("image_encoder.") and not k.startswith(("image_encoder.head.", "image_encoder.norm_head."))}


# ----------------------------------------------------------------------------------------------
# Golden reference (1024 x 1024, the official encoder's output for the reference weights)
# ----------------------------------------------------------------------------------------------
def test_golden_plain_path(golden, report):
    enc = model.load_mobile_sam_encoder(golden["weights"]).configure(fast=False)
    assert enc.attention_impl == "explicit"
    with torch.inference_mode():
        out = enc(golden["x"])
    err = rel_l2(out, golden["embedding"])
    report(f"golden relative L2 error, plain path (unfused, explicit softmax attention): {err:.3e}")
    assert out.shape == (1, 256, 64, 64)
    assert err < TOLERANCE, f"plain path: relative L2 error {err:.3e} >= {TOLERANCE}"


def test_golden_fused_sdpa_path(golden, report):
    enc = model.load_mobile_sam_encoder(golden["weights"])
    assert model.fuse_batchnorm(enc) == 27  # patch embed 2, MBConv 6, mergings 9, local convs 10
    assert model.fuse_batchnorm(enc) == 0
    assert enc.attention_impl == "sdpa" and enc.channels_last
    with torch.inference_mode():
        out = enc(golden["x"])
    err = rel_l2(out, golden["embedding"])
    report(f"golden relative L2 error, fast path (BatchNorm fused, SDPA, channels-last): {err:.3e}")
    assert err < TOLERANCE, f"fused/SDPA path: relative L2 error {err:.3e} >= {TOLERANCE}"


def test_weights_loaded_after_eval_take_effect(golden, reference_state, report):
    torch.manual_seed(1)
    enc = model.load_mobile_sam_encoder(None).eval()
    with torch.inference_mode():  # a forward in eval mode before loading (would fill any cache)
        enc(torch.zeros(1, 3, 64, 64))
    enc.load_state_dict(encoder_state(reference_state), strict=True)
    with torch.inference_mode():
        out = enc(golden["x"])
    err = rel_l2(out, golden["embedding"])
    report(f"golden relative L2 error, weights loaded after eval(): {err:.3e}")
    assert err < TOLERANCE, f"weights loaded after eval(): relative L2 error {err:.3e} >= {TOLERANCE}"


# ----------------------------------------------------------------------------------------------
# Checkpoint reading
# ----------------------------------------------------------------------------------------------
def test_parameter_count_matches_official_encoder_without_head(small_encoder):
    # README: image encoder 6,065,532 parameters of which 321,640 are the unused classification head
    assert model.count_parameters(small_encoder) == 6_065_532 - 321_640
    assert not any("head" in name for name, _ in small_encoder.named_parameters())


def test_ignored_keys_are_logged(golden, caplog):
    with caplog.at_level(logging.INFO, logger="model"):
        enc = model.load_mobile_sam_encoder(golden["weights"])
    assert not enc.training
    messages = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "mask_decoder" in messages[0] and "prompt_encoder" in messages[0]
    assert "classification head: 4" in messages[0]


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="model"):
        model.load_mobile_sam_encoder(None)
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_missing_key_names_file_and_key(reference_state, tmp_path):
    state = dict(reference_state)
    del state["image_encoder.layers.2.blocks.3.attn.attention_biases"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing\.pt.*image_encoder\.layers\.2\.blocks\.3\.attn\.attention_biases"):
        model.load_mobile_sam_encoder(path)


def test_misshaped_key_names_key_and_shapes(reference_state, tmp_path):
    state = dict(reference_state)
    state["image_encoder.neck.0.weight"] = torch.zeros(256, 320, 3, 3)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        model.load_mobile_sam_encoder(path)
    msg = str(info.value)
    assert "bad_shape.pt" in msg and "image_encoder.neck.0.weight" in msg
    assert "(256, 320, 3, 3)" in msg and "(256, 320, 1, 1)" in msg


def test_unexpected_encoder_key_is_an_error(reference_state, tmp_path):
    state = dict(reference_state)
    state["image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 768)  # a ViT-based SAM encoder key
    path = tmp_path / "vit.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"vit\.pt.*image_encoder\.pos_embed"):
        model.load_mobile_sam_encoder(path)


@pytest.mark.parametrize("content", [b"not a checkpoint", None, [1, 2, 3], {"a": 1}, {"w": torch.zeros(2)}])
def test_unreadable_or_foreign_files_raise_user_error(tmp_path, content):
    path = tmp_path / "weird.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=r"weird\.pt"):
        model.load_mobile_sam_encoder(path)


# ----------------------------------------------------------------------------------------------
# Shapes, features, options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(512, 512), (256, 384), (64, 128)])
def test_output_shapes_any_multiple_of_64(small_encoder, height, width):
    with torch.inference_mode():
        feats = small_encoder.forward_features(torch.randn(1, 3, height, width))
    neck = feats["neck"]  # forward() == forward_features()["neck"] is tested separately
    h, w = height // 16, width // 16
    assert neck.shape == (1, 256, h, w)
    expected = {"stride4": (1, 64, 4 * h, 4 * w), "stride8": (1, 128, 2 * h, 2 * w),
                "stride16": (1, 320, h, w), "neck": (1, 256, h, w)}
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    for key, tensor in feats.items():
        assert tensor.shape[1] == small_encoder.feature_channels[key]
        assert torch.isfinite(tensor).all()


def test_forward_is_forward_features_neck_and_batch_independent(small_encoder):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 128, 192)
    with torch.inference_mode():
        neck = small_encoder(x)
        feats = small_encoder.forward_features(x)
        single = small_encoder(x[1:])
    torch.testing.assert_close(neck, feats["neck"], rtol=0, atol=0)
    torch.testing.assert_close(neck[1:], single, rtol=1e-4, atol=1e-5)


def test_bad_input_shape_raises(small_encoder):
    with pytest.raises(ValueError, match="multiples of 16"):
        small_encoder(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        small_encoder(torch.randn(1, 1, 64, 64))


def reference_window_attention(attn: model.WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's formulation, written independently: pad x with zeros, LayerNorm + qkv on every token,
    partition, explicit softmax attention with the bias table built from the offset rule, unpartition, crop."""
    b, h, w, c = x.shape
    ws, heads, hd = attn.window_size, attn.num_heads, attn.head_dim
    ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
    xp = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    t = xp.view(b, ph // ws, ws, pw // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
    qkv = F.linear(F.layer_norm(t, (c,), attn.norm.weight, attn.norm.bias), attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.view(t.shape[0], ws * ws, heads, 3 * hd).permute(0, 2, 1, 3).split(hd, dim=3)
    offsets: dict = {}
    pos = [(r, s) for r in range(ws) for s in range(ws)]
    idx = torch.tensor([[offsets.setdefault((abs(p[0] - o[0]), abs(p[1] - o[1])), len(offsets)) for o in pos]
                        for p in pos])
    logits = q @ k.transpose(-2, -1) * hd ** -0.5 + attn.attention_biases[:, idx]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws * ws, c)
    out = out.view(b, ph // ws, pw // ws, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)[:, :h, :w]
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("impl", model.ATTENTION_IMPLS)
@pytest.mark.parametrize("size", [(7, 7), (20, 33), (14, 9), (3, 16)])
def test_window_attention_matches_padded_reference(impl, size):
    torch.manual_seed(3)
    attn = model.WindowAttention(dim=40, num_heads=5, window_size=7)
    with torch.no_grad():
        attn.attention_biases.normal_()
        attn.norm.bias.normal_()
        attn.norm.weight.normal_()
    attn.impl = impl
    # float64: the comparison then tests the formulation, not float32 summation order (qkv.weight's
    # gradient sums over every token, where float32 rounding alone reaches ~2e-4 relative)
    attn.double()
    x = torch.randn(2, *size, 40, requires_grad=True, dtype=torch.float64)
    ours, ref = attn(x), reference_window_attention(attn, x)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    grad_out = torch.randn_like(ref)
    params = [x, attn.qkv.weight, attn.attention_biases, attn.norm.bias]
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params, grad_out),
                             torch.autograd.grad(ref, params, grad_out)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-10)


def test_relative_offset_index_layout():
    index, n = model.relative_offset_index(2)
    # positions (0,0),(0,1),(1,0),(1,1); offsets numbered by first appearance
    assert n == 4
    assert index.tolist() == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    assert model.relative_offset_index(7)[1] == 49 and model.relative_offset_index(14)[1] == 196


def test_fast_and_plain_paths_agree_and_fusion_keeps_outputs():
    torch.manual_seed(4)
    enc = model.load_mobile_sam_encoder(None)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that folding is really exercised
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(1, 3, 128, 128)
    enc.configure(fast=False)
    with torch.inference_mode():
        plain = enc.forward_features(x)
        model.fuse_batchnorm(enc)
        enc.configure(fast=True)
        fast = enc.forward_features(x)
    for key in plain:
        assert rel_l2(fast[key], plain[key]) < 1e-5, key
    # stage 0 in row bands (used automatically for large inputs): force bands of 5 rows (32 = 6*5 + 2)
    for m in enc.modules():
        if isinstance(m, model.MBConv):
            m.tile_bytes = 5 * 256 * 32 * 4
    with torch.inference_mode():
        banded = enc.forward_features(x)
    for key in plain:
        assert rel_l2(banded[key], fast[key]) < 1e-6, key
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    with pytest.raises(ValueError):
        enc.attention_impl = "flash"


def test_normalize_image_uint8_and_float():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    a = model.normalize_image(img)
    b = model.normalize_image(img.double())
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    mean = torch.tensor(model.SAM_PIXEL_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize_image(mean.expand(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4))


def test_gradients_flow_and_checkpointing_matches():
    torch.manual_seed(5)
    enc = model.load_mobile_sam_encoder(None).train()
    x = torch.randn(1, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        enc.zero_grad()
        enc.gradient_checkpointing = ckpt
        enc(x).square().mean().backward()
        grads.append(enc.layers[2].blocks[0].attn.attention_biases.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_plain_and_fast_paths_have_the_same_gradients():
    torch.manual_seed(8)
    enc = model.load_mobile_sam_encoder(None).train()
    x = torch.randn(2, 3, 32, 48)
    names = ["patch_embed.seq.0.c.weight", "layers.0.blocks.1.conv3.bn.weight", "layers.1.blocks.0.attn.qkv.weight",
             "layers.3.blocks.1.attn.attention_biases", "layers.2.downsample.conv3.c.weight", "neck.2.weight"]
    params = dict(enc.named_parameters())
    grads = []
    for fast in (False, True):
        enc.configure(fast=fast)
        out = enc.forward_features(x)
        loss = sum(v.square().mean() for v in out.values())
        grads.append(torch.autograd.grad(loss, [params[n] for n in names]))
    for name, g_plain, g_fast in zip(names, *grads):
        assert g_plain.abs().sum() > 0, name
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-3, atol=1e-6, msg=name)


def test_forward_compiles_as_one_graph():
    """No data-dependent Python control flow: dynamo captures the whole forward without graph breaks."""
    enc = model.load_mobile_sam_encoder(None)
    x = torch.randn(1, 3, 64, 64)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(enc, backend=backend, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), enc(x))
    assert len(graphs) == 1


@pytest.mark.parametrize("impl", model.ATTENTION_IMPLS)
def test_bfloat16_autocast(small_encoder, impl):
    """Autocast (bf16 here on the CPU; the same code path runs on CUDA) works and stays close to float32."""
    torch.manual_seed(7)
    x = torch.randn(1, 3, 128, 128)
    small_encoder.attention_impl = impl
    try:
        with torch.inference_mode():
            ref = small_encoder(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = small_encoder(x)
    finally:
        small_encoder.attention_impl = "sdpa"
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_l2(out.float(), ref) < 0.1


def test_configure_plain_and_fast(small_encoder):
    enc = model.MobileSAMEncoder().configure(fast=False)
    assert (enc.attention_impl, enc.channels_last, enc.inplace_activations) == ("explicit", False, False)
    enc.configure(fast=True)
    assert (enc.attention_impl, enc.channels_last, enc.inplace_activations) == ("sdpa", True, True)
