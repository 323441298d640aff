"""Tests for lora.py: zero-init equivalence, merging, adapter state dict, trainable control, frozen BatchNorm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora
import model
from utils import UserError

# transformer blocks: stage 1 (2 x 128 ch), stage 2 (6 x 160), stage 3 (2 x 320)
BLOCK_DIMS = [128] * 2 + [160] * 6 + [320] * 2


@pytest.fixture()
def encoder() -> model.MobileSAMEncoder:
    torch.manual_seed(0)
    return model.load_mobile_sam_encoder(None)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lora_linear_is_identity_at_start_and_scales_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=8.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + 4.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert set(layer.state_dict()) == {"base.weight", "base.bias", "lora_A", "lora_B"}


def test_apply_lora_counts_and_names(encoder):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = encoder(x)
    assert lora.apply_lora(encoder, rank=4, alpha=4.0) == 2 * len(BLOCK_DIMS)
    assert lora.apply_lora(encoder, rank=4, alpha=4.0) == 0  # already wrapped: left alone
    with torch.inference_mode():
        after = encoder(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # B = 0: unchanged model
    keys = lora.lora_state_dict(encoder)
    assert len(keys) == 4 * len(BLOCK_DIMS)
    assert "layers.1.blocks.0.attn.qkv.lora_A" in keys and "layers.3.blocks.1.attn.proj.lora_B" in keys
    assert all("lora" in k for k in keys)
    assert "layers.1.blocks.0.attn.qkv.base.weight" in encoder.state_dict()
    expected = sum(4 * (d + 3 * d) + 4 * (d + d) for d in BLOCK_DIMS)
    assert sum(v.numel() for v in keys.values()) == expected == 44_544


def test_apply_lora_mlp_targets(encoder):
    n = lora.apply_lora(encoder, rank=2, alpha=2.0, targets=("qkv", "proj", "fc1", "fc2"))
    assert n == 4 * len(BLOCK_DIMS)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, lora.LoRALinear)}
    assert wrapped == {"qkv", "proj", "fc1", "fc2"}
    # MBConv / merging / neck convolutions are never touched
    assert not any(isinstance(m, lora.LoRALinear) for m in encoder.layers[0].modules())


def test_apply_lora_only_fc1(encoder):
    assert lora.apply_lora(encoder, rank=1, alpha=1.0, targets=["fc1"]) == len(BLOCK_DIMS)
    assert isinstance(encoder.layers[2].blocks[3].mlp.fc1, lora.LoRALinear)
    assert isinstance(encoder.layers[2].blocks[3].attn.qkv, nn.Linear)


@pytest.mark.parametrize("targets", [("qkv", "query"), ("mlp",), ()])
def test_bad_targets_raise_user_error_listing_valid_ones(encoder, targets):
    with pytest.raises(UserError, match="valid: qkv, proj, fc1, fc2"):
        lora.apply_lora(encoder, rank=4, alpha=4.0, targets=targets)


@pytest.mark.parametrize("rank", [0, -3])
def test_bad_rank_raises_user_error(encoder, rank):
    with pytest.raises(UserError, match="rank"):
        lora.apply_lora(encoder, rank=rank, alpha=4.0)
    with pytest.raises(UserError, match="rank"):
        lora.LoRALinear(nn.Linear(3, 3), rank=rank, alpha=1.0)


def test_merge_lora_keeps_outputs(encoder):
    lora.apply_lora(encoder, rank=4, alpha=8.0, targets=("qkv", "proj", "fc1", "fc2"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x = torch.randn(1, 3, 64, 128)
    with torch.inference_mode():
        adapted = encoder(x)
    assert lora.merge_lora(encoder) == 4 * len(BLOCK_DIMS)
    assert not any(isinstance(m, lora.LoRALinear) for m in encoder.modules())
    assert lora.lora_state_dict(encoder) == {}
    with torch.inference_mode():
        merged = encoder(x)
    err = rel_l2(merged, adapted)
    assert err < 1e-5, f"merged vs adapted relative L2 error {err:.2e}"
    # the merged model has the plain encoder's structure again
    assert set(encoder.state_dict()) == set(model.load_mobile_sam_encoder(None).state_dict())


def test_adapters_change_the_output(encoder):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = encoder(x)
    lora.apply_lora(encoder, rank=4, alpha=4.0)
    with torch.no_grad():
        encoder.layers[3].blocks[1].attn.proj.lora_B.fill_(0.1)
    with torch.inference_mode():
        assert rel_l2(encoder(x), before) > 1e-3


def test_mark_trainable_and_parameter_report(encoder):
    head = nn.Conv2d(256, 2, 1)
    net = nn.ModuleDict({"encoder": encoder, "head": head})
    total_before = lora.parameter_report(net)["total"]
    lora.apply_lora(net, rank=4, alpha=4.0)
    lora.mark_trainable(net, train_only_lora=True, always_trainable=["head."])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if "lora" in n or n.startswith("head.")}
    report = lora.parameter_report(net)
    assert report["total"] == total_before + 44_544
    assert report["trainable"] == 44_544 + 256 * 2 + 2
    assert report["percent"] == pytest.approx(100 * report["trainable"] / report["total"])
    lora.mark_trainable(net, train_only_lora=False)
    assert lora.parameter_report(net)["trainable"] == report["total"]
    lora.mark_trainable(net, train_only_lora=True)
    assert lora.parameter_report(net)["trainable"] == 44_544


def test_parameter_report_rank4_numbers(encoder):
    """The numbers quoted in docs/encoder.md."""
    assert lora.parameter_report(encoder) == {"total": 5_743_892, "trainable": 5_743_892, "percent": 100.0}
    lora.apply_lora(encoder, rank=4, alpha=4.0)
    lora.mark_trainable(encoder, train_only_lora=True)
    report = lora.parameter_report(encoder)
    assert report["total"] == 5_743_892 + 44_544 and report["trainable"] == 44_544
    assert report["percent"] == pytest.approx(0.7696, abs=1e-4)


def test_frozen_batchnorm_keeps_running_stats_while_lora_trains(encoder):
    lora.apply_lora(encoder, rank=4, alpha=4.0)
    lora.mark_trainable(encoder, train_only_lora=True)
    encoder.train()
    assert lora.freeze_frozen_batchnorm(encoder) == 27
    stats = {n: b.clone() for n, b in encoder.named_buffers() if "running" in n}
    lora_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if "lora" in n}
    frozen_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if "lora" not in n}
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    loss = encoder(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    for name, value in encoder.named_buffers():
        if "running" in name:
            assert torch.equal(value, stats[name]), f"{name} changed"
    for name, p in encoder.named_parameters():
        if "lora" in name:
            assert not torch.equal(p, lora_before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed"
    # without freeze_frozen_batchnorm, train mode would update the running statistics
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32))
    assert any(not torch.equal(b, stats[n]) for n, b in encoder.named_buffers() if "running" in n)


def test_freeze_frozen_batchnorm_leaves_trainable_batchnorm(encoder):
    lora.mark_trainable(encoder, train_only_lora=False)
    encoder.train()
    assert lora.freeze_frozen_batchnorm(encoder) == 0
    assert all(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
