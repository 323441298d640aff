"""Tests for sam_decoder.py: golden reproduction of the official MobileSAM prompt encoder + mask decoder,
strict checkpoint reading, parameter counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import model
import sam_decoder
from utils import UserError

TOLERANCE = 1e-4  # relative L2 error allowed against the official decoder's outputs


def rel_l2(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b)
    return float((a.detach().double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> dict:
    data = dict(np.load(reference_dir / "mobile_sam_decoder_golden.npz"))
    data["embedding"] = torch.from_numpy(np.load(reference_dir / "mobile_sam_encoder_golden.npz")["embedding"])
    data["weights"] = reference_dir / "mobile_sam_random_weights.pt"
    return data


@pytest.fixture(scope="module")
def decoder(golden) -> torch.nn.Module:
    return sam_decoder.load_mobile_sam_decoder(golden["weights"])


@pytest.fixture(scope="module")
def reference_state(golden) -> dict:
    return torch.load(golden["weights"], map_location="cpu", weights_only=True)


def test_loader_gives_eval_module(decoder):
    assert isinstance(decoder, torch.nn.Module) and not decoder.training


def test_golden_positional_encoding(decoder, golden, report):
    with torch.no_grad():
        pe = decoder.prompt_encoder.dense_pe((64, 64))
    err = rel_l2(pe, golden["image_pe"])
    report(f"decoder golden: dense positional encoding relative L2 {err:.3e}")
    assert pe.shape == (1, 256, 64, 64) and err < TOLERANCE


def test_golden_no_prompt(decoder, golden, report):
    with torch.no_grad():
        sparse, dense = decoder.prompt_encoder((64, 64))
        masks, iou = decoder(golden["embedding"])
    assert sparse.shape == (1, 0, 256)
    assert rel_l2(dense, golden["noprompt_dense"]) < TOLERANCE
    em, ei = rel_l2(masks, golden["noprompt_masks"]), rel_l2(iou, golden["noprompt_iou"])
    report(f"decoder golden, no prompt: masks {em:.3e}, IoU {ei:.3e} (relative L2)")
    assert masks.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert em < TOLERANCE and ei < TOLERANCE


def test_golden_points_multimask(decoder, golden, report):
    points = (torch.from_numpy(golden["points_xy"]), torch.from_numpy(golden["points_label"]))
    with torch.no_grad():
        masks, iou = decoder(golden["embedding"], points=points, multimask_output=True)
    em, ei = rel_l2(masks, golden["points_masks"]), rel_l2(iou, golden["points_iou"])
    report(f"decoder golden, 3 point prompts x 3 masks: masks {em:.3e}, IoU {ei:.3e} (relative L2)")
    assert masks.shape == (3, 3, 256, 256) and iou.shape == (3, 3)
    assert em < TOLERANCE and ei < TOLERANCE


def test_golden_boxes(decoder, golden, report):
    with torch.no_grad():
        masks, iou = decoder(golden["embedding"], boxes=torch.from_numpy(golden["boxes_xyxy"]))
    em, ei = rel_l2(masks, golden["boxes_masks"]), rel_l2(iou, golden["boxes_iou"])
    report(f"decoder golden, 2 box prompts: masks {em:.3e}, IoU {ei:.3e} (relative L2)")
    assert masks.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert em < TOLERANCE and ei < TOLERANCE


def test_golden_batched_embedding_equals_repeated(decoder, golden):
    """An image batch of B equal embeddings gives what one embedding repeated per prompt gives."""
    boxes = torch.from_numpy(golden["boxes_xyxy"])
    with torch.no_grad():
        a, _ = decoder(golden["embedding"], boxes=boxes)
        b, _ = decoder(golden["embedding"].expand(2, -1, -1, -1).contiguous(), boxes=boxes)
    assert torch.allclose(a, b, atol=1e-5)


def test_parameter_counts(decoder):
    # reference README: prompt encoder 6,220 parameters, mask decoder 4,058,340
    assert sam_decoder.count_parameters(decoder.prompt_encoder) == 6_220
    assert sam_decoder.count_parameters(decoder.mask_decoder) == 4_058_340


def test_state_dict_keys_match_manifest(reference_dir):
    import json

    manifest = json.loads((reference_dir / "mobile_sam_state_dict_manifest.json").read_text())
    wanted = {k: tuple(v["shape"]) for k, v in manifest.items() if k.startswith(sam_decoder.PREFIXES)}
    own = {k: tuple(v.shape) for k, v in sam_decoder.SAMPromptDecoder().state_dict().items()}
    assert own == wanted


def test_missing_key_names_file_and_key(reference_state, tmp_path):
    state = dict(reference_state)
    del state["mask_decoder.transformer.layers.1.norm4.bias"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing\.pt.*missing key 'mask_decoder\.transformer\.layers\.1\.norm4\.bias'"):
        sam_decoder.load_mobile_sam_decoder(path)


def test_misshaped_key_names_key_and_shapes(reference_state, tmp_path):
    state = dict(reference_state)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 64)
    path = tmp_path / "misshaped.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        sam_decoder.load_mobile_sam_decoder(path)
    msg = str(err.value)
    assert "\n" not in msg and "misshaped.pt" in msg
    assert "positional_encoding_gaussian_matrix" in msg and "(2, 64)" in msg and "(2, 128)" in msg


def test_unexpected_and_foreign_files(reference_state, tmp_path):
    state = dict(reference_state)
    state["mask_decoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"extra\.pt.*unexpected key 'mask_decoder\.extra\.weight'"):
        sam_decoder.load_mobile_sam_decoder(path)
    encoder_only = {k: v for k, v in reference_state.items() if k.startswith("image_encoder.")}
    path = tmp_path / "encoder_only.pt"
    torch.save(encoder_only, path)
    with pytest.raises(UserError, match=r"encoder_only\.pt.*prompt_encoder"):
        sam_decoder.load_mobile_sam_decoder(path)


def test_other_grid_sizes_run():
    """The frame follows the embedding grid (16 px per cell), so any encoder input size works."""
    torch.manual_seed(0)
    net = sam_decoder.load_mobile_sam_decoder(None)
    emb = torch.randn(2, 256, 8, 12)
    with torch.no_grad():
        masks, iou = net(emb, points=(torch.tensor([[[10.0, 20.0]], [[100.0, 60.0]]]), torch.ones(2, 1)),
                         multimask_output=True)
    assert masks.shape == (2, 3, 32, 48) and iou.shape == (2, 3)
    assert torch.isfinite(masks).all()
