"""The nuclei segmentation network (MobileSAM encoder + LoRA + a light decoder head), its loss, its
checkpoints and whole-image inference.

Network. `NucleiSAM` runs MobileSAM's TinyViT encoder (optionally with LoRA adapters, `lora.py`) and a small
U-Net-like decoder head on the encoder's multi-scale features: the neck embedding (256 ch, stride 16), the
stage-1 tokens (128 ch, stride 8) and the stage-0 maps (64 ch, stride 4), plus a very light stem that reads
the normalised image at half resolution. Nuclei are only 4-10 px wide at stride 16, so the high-resolution
skips carry the boundary detail the neck cannot. The head is built from depthwise-separable 3x3 convolutions
with GroupNorm and GELU (GroupNorm, not BatchNorm: per-sample statistics behave the same for any batch size
and under DistributedDataParallel). For speed the maps are predicted at half resolution, upsampled
(bilinear + a learned sub-pixel correction) and refined by two thin 3x3 convolutions (16 channels), the
only layers at full resolution (the head costs a fraction of the encoder's time; see docs/benchmarks.md). The
half-resolution image stem (4x4 kernel, stride 2, padding 1) centres its pixel i between input pixels 2i and
2i+1, where the bilinear upsampling puts it, so the maps are not shifted by half a pixel. It outputs, at the
input resolution,

- `"foreground"`: nucleus-vs-background logits (B, 1, S, S);
- `"hv"`: HoVer-Net horizontal/vertical distance maps (B, 2, S, S), linear output (targets lie in [-1, 1]);
  absent for the `head="binary"` comparison baseline.

`head="sam"` replaces that decoder by MobileSAM's own mask decoder (`sam_decoder.SAMHead`): run without
prompts on the neck embedding, its single mask upsampled to the input size (foreground logits only). Its
weights come from the base file with the encoder's; the prompt encoder, the IoU head and the three
multimask hypernetworks are frozen (the promptless single-mask loss cannot reach them), the rest of the
mask decoder is trained.

Loss (`compute_loss`). Foreground: binary cross-entropy + soft Dice (Dice per image, then averaged).
HV maps (HoVer-Net): mean squared error over the whole map (background target 0, so the head also learns
to keep the background flat) + "MSGE", the mean squared error of the Sobel derivatives (d/dx of the
horizontal map, d/dy of the vertical map) restricted to ground-truth nucleus pixels, where the sharp sign
flips between touching nuclei are what post-processing relies on. Every term is a per-image mean averaged
over the batch, so the loss of a batch split over several processes (DDP) averages to the same value.
With a batch's "valid" map (0 under an ignore mask, `dataset.NucleiDataset`) every term leaves those pixels
out (`masked_loss`).

Checkpoints are plain tensors and JSON-able values (`torch.load(path, weights_only=True)` reads them).
When the encoder starts from a pretrained file and only LoRA + head are trained, a checkpoint stores only
the trainable tensors (a few MB) plus the path, size and SHA-1 of the base weights; otherwise it stores the
whole state dict (BatchNorm buffers included). A cross-validation folder's top-level `best_model.pth` is a
small index pointing at `fold_<k>/best_model.pth`; `load_model_set` reads either kind.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dataset
import lora
import model as mobile_sam
import sam_decoder
import utils
from utils import UserError, atomic_torch_save

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nuclei-sam-checkpoint/1"
MODEL_SET_FORMAT = "nuclei-sam-cv-set/1"
HEADS = ("hv", "binary", "sam")
# model-related configuration keys and their defaults (the training config holds many more keys)
MODEL_DEFAULTS: dict[str, Any] = {
    "pretrained": None, "head": "hv", "input_size": 1024, "lora_rank": 4, "lora_alpha": 4.0,
    "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "train_only_lora": True,
}
LOSS_WEIGHTS: dict[str, float] = {"bce": 1.0, "dice": 1.0, "mse": 1.0, "msge": 1.0}
HEAD_PREFIX = "head."
_UNSET = object()


# ----------------------------------------------------------------------------------------------
# Decoder head
# ----------------------------------------------------------------------------------------------
def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ConvNormAct(nn.Sequential):
    """k x k convolution (no bias) -> GroupNorm -> GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.GroupNorm(_groups(out_ch), out_ch), nn.GELU())


class SepConv(nn.Sequential):
    """Depthwise 3x3 -> pointwise 1x1 -> GroupNorm -> GELU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False),
                         nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.GroupNorm(_groups(out_ch), out_ch), nn.GELU())


class ResSepConv(nn.Module):
    """x + SepConv(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = SepConv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class DecoderHead(nn.Module):
    """Light U-Net-like decoder that does its work at low resolution: neck (/16) -> /8 -> /4 with lateral
    skips, then a /2 stage (a stride-2 image stem added to the /4 features) where the output maps are
    predicted. They reach the input resolution by bilinear upsampling plus a learned sub-pixel correction
    (pixel shuffle), and are refined by two thin full-resolution convolutions that also see the image."""

    def __init__(self, feature_channels: Mapping[str, int], head: str = "hv") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        c16, c8, c4, c2, c1 = 128, 80, 64, 24, 16
        maps = 3 if head == "hv" else 1  # foreground logit (+ horizontal, vertical)
        self.lat16 = ConvNormAct(feature_channels["neck"], c16)
        self.ref16 = ResSepConv(c16)
        self.lat8 = ConvNormAct(feature_channels["stride8"], 48)
        self.fuse8 = nn.Sequential(SepConv(c16 + 48, c8), ResSepConv(c8))
        self.lat4 = ConvNormAct(feature_channels["stride4"], 32)
        self.fuse4 = nn.Sequential(SepConv(c8 + 32, c4), ResSepConv(c4))
        # /2: channels are cut at /4 before upsampling, and the image stem is added (not concatenated)
        self.reduce4 = ConvNormAct(c4, c2)
        # 4x4 kernel, stride 2, padding 1: half-resolution pixel i is centred between input pixels 2i and
        # 2i+1, where bilinear upsampling (align_corners=False) puts it
        self.stem2 = nn.Sequential(nn.Conv2d(3, c2, 4, 2, 1, bias=False), nn.GroupNorm(_groups(c2), c2),
                                   nn.GELU())
        self.fuse2 = ResSepConv(c2)
        self.foreground = nn.Sequential(SepConv(c2, c2), nn.Conv2d(c2, 1, 1))
        self.hv = nn.Sequential(SepConv(c2, c2), nn.Conv2d(c2, 2, 1)) if head == "hv" else None
        # /2 -> /1: 4 values per map and half-resolution pixel, put onto its 2 x 2 full-resolution pixels
        self.subpixel = nn.Conv2d(c2, 4 * maps, 1)
        # /1: a thin residual refinement (two 3x3 convolutions) from the upsampled maps and the image
        self.refine1 = nn.Sequential(nn.Conv2d(maps + 3, c1, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(c1, maps, 3, padding=1))
        nn.init.zeros_(self.subpixel.weight)  # starts as "no correction"
        nn.init.zeros_(self.subpixel.bias)
        # nuclei cover roughly a fifth of a tile: start the foreground logits near that prior
        nn.init.constant_(self.foreground[-1].bias, math.log(0.2 / 0.8))
        # run on channels-last tensors (faster on CPU; set with the weights by `prepare_for_inference`)
        self.channels_last = False

    def forward(self, image: Tensor, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """image: normalised (B, 3, S, S); feats: the encoder's `forward_features` output."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
            feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
        s4, s8 = feats["stride4"], feats["stride8"]
        x = self.ref16(self.lat16(feats["neck"]))
        x = self.fuse8(torch.cat([_up(x, s8), self.lat8(s8)], 1))
        x = self.fuse4(torch.cat([_up(x, s4), self.lat4(s4)], 1))
        h2 = self.stem2(image)
        x = self.fuse2(_up(self.reduce4(x), h2) + h2)
        maps = torch.cat([self.foreground(x)] + ([self.hv(x)] if self.hv is not None else []), 1)
        height, width = image.shape[-2:]
        maps = _up(maps, image) + F.pixel_shuffle(self.subpixel(x), 2)[..., :height, :width]
        maps = maps + self.refine1(torch.cat([maps, image], 1))
        out = {"foreground": maps[:, :1].contiguous()}
        if self.hv is not None:
            out["hv"] = maps[:, 1:].contiguous()
        return out


class NucleiSAM(nn.Module):
    """MobileSAM encoder (+ LoRA) + decoder head. Input (B, 3, S, S) uint8 or float in 0..255, RGB;
    S a multiple of 64. Output {"foreground": logits (B,1,S,S), "hv": (B,2,S,S)} ("hv" only for head="hv")."""

    def __init__(self, encoder: nn.Module, head: str = "hv") -> None:
        super().__init__()
        self.encoder = encoder
        self.head_type = head
        self.head = sam_decoder.SAMHead() if head == "sam" else DecoderHead(encoder.feature_channels, head)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = mobile_sam.normalize_image(x)
        feats = self.encoder.forward_features(x)
        return self.head(x, feats)

    def train(self, mode: bool = True) -> "NucleiSAM":
        super().train(mode)
        lora.freeze_frozen_batchnorm(self)  # a frozen encoder's BatchNorm keeps its running statistics
        return self


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def head_parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(net).head.parameters())


def parameter_report(net: nn.Module) -> dict[str, Any]:
    """{"total", "trainable", "percent", "head"} parameter counts."""
    report = dict(lora.parameter_report(unwrap(net)))
    report["head"] = head_parameter_count(net)
    return report


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model-related keys of a (training) config, with defaults filled in."""
    return {k: config.get(k, v) for k, v in MODEL_DEFAULTS.items()}


def is_no_weights(value: Any) -> bool:
    """True for a `pretrained` value meaning "random encoder": None, "", "none" (any case)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def build_model(config: Mapping[str, Any], pretrained: Any = _UNSET) -> NucleiSAM:
    """Build a NucleiSAM from a JSON-able config (see MODEL_DEFAULTS; other keys are ignored).

    `pretrained` (argument, else `config["pretrained"]`): path of the official `mobile_sam.pt`, or None for
    a random encoder (a warning is logged). With `lora_rank > 0` LoRA adapters are put on `lora_targets`;
    with `train_only_lora` only LoRA and head parameters require grad, otherwise all do.
    """
    cfg = model_config(config)
    if pretrained is not _UNSET:
        cfg["pretrained"] = pretrained
    return _build(cfg, load_pretrained=True)


def _build(cfg: Mapping[str, Any], load_pretrained: bool) -> NucleiSAM:
    head = cfg["head"]
    if head not in HEADS:
        raise UserError(f"--head {head}: unknown head (choose from {', '.join(HEADS)})")
    rank = int(cfg["lora_rank"])
    if rank < 0:
        raise UserError(f"--lora_rank {rank}: must be 0 (no LoRA) or a positive integer")
    if not load_pretrained:
        encoder = mobile_sam.MobileSAMEncoder().eval()  # weights come from a checkpoint right after
    elif is_no_weights(cfg["pretrained"]):
        encoder = mobile_sam.load_mobile_sam_encoder(None)
    else:
        path = utils.check_input_file(cfg["pretrained"], "--pretrained",
                                      "the official mobile_sam.pt: download it with `python main.py download "
                                      "--output_dir weights`, or pass --pretrained none for a random encoder")
        encoder = mobile_sam.load_mobile_sam_encoder(path)
    base = None if not load_pretrained or is_no_weights(cfg["pretrained"]) else Path(cfg["pretrained"]).expanduser()
    if rank > 0:
        targets = cfg["lora_targets"]
        targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
        lora.apply_lora(encoder, rank, float(cfg["lora_alpha"]), targets=targets,
                        dropout=float(cfg["lora_dropout"]))
    net = NucleiSAM(encoder, head)
    if head == "sam" and base is not None:
        sam_decoder.load_decoder_weights(net.head, base)  # MobileSAM's pretrained prompt encoder + mask decoder
    lora.mark_trainable(net, bool(cfg["train_only_lora"]), always_trainable=(HEAD_PREFIX,))
    if head == "sam":
        net.head.freeze_untrained()
    return net.eval()


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def _sobel_xy(hv: Tensor) -> Tensor:
    """d/dx of channel 0 and d/dy of channel 1 (Sobel 3x3, scaled to units per pixel; edges replicated)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=hv.device,
                      dtype=hv.dtype) / 8.0
    ky = kx.t()
    padded = F.pad(hv, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded[:, :1], kx.view(1, 1, 3, 3))
    gy = F.conv2d(padded[:, 1:2], ky.reshape(1, 1, 3, 3))
    return torch.cat([gx, gy], 1)


def compute_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                 weights: Mapping[str, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of BCE + soft Dice (foreground) and MSE + MSGE (HV maps, when both sides have them).

    batch: "foreground" float (B,1,S,S) in {0,1}, "hv" float (B,2,S,S), optionally "valid" float (B,1,S,S)
    in {0,1} (0 = under an ignore mask). Returns (loss, {term: float}). Computed in float32 whatever the
    autocast dtype of the outputs. With `valid`, every term is taken over the valid pixels only (see
    `masked_loss`); all-ones `valid` gives the same loss as none.
    """
    valid = batch.get("valid")
    if valid is not None:
        valid = valid.to(device=outputs["foreground"].device, dtype=torch.float32)
        if not bool((valid < 0.5).any()):
            valid = None
    if valid is not None:
        return masked_loss(outputs, batch, valid, weights)
    w = {**LOSS_WEIGHTS, **(weights or {})}
    logits = outputs["foreground"].float()
    target = batch["foreground"].to(device=logits.device, dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    parts["bce"] = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    flat_t = target.flatten(1)
    dice = (2.0 * (prob * flat_t).sum(1) + 1.0) / (prob.sum(1) + flat_t.sum(1) + 1.0)
    parts["dice"] = (1.0 - dice).mean()
    if "hv" in outputs and "hv" in batch:
        hv = outputs["hv"].float()
        hv_t = batch["hv"].to(device=hv.device, dtype=torch.float32)
        parts["mse"] = F.mse_loss(hv, hv_t)
        grad_err = (_sobel_xy(hv) - _sobel_xy(hv_t)).pow(2).sum(1, keepdim=True)  # both channels
        focus = target
        per_image = (grad_err * focus).flatten(1).sum(1) / (2.0 * focus.flatten(1).sum(1)).clamp_min(1.0)
        parts["msge"] = per_image.mean()
    loss = sum(w[k] * v for k, v in parts.items())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def masked_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], valid: Tensor,
                weights: Mapping[str, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """`compute_loss` over the pixels where `valid` (B,1,S,S) is 1: BCE and MSE are per-image means over
    the valid pixels, Dice sums over them, and MSGE (whose 3x3 Sobel reads the neighbours) is taken only at
    ground-truth nucleus pixels whose whole 3x3 neighbourhood is valid, so no pixel under the mask enters any
    term. A fully masked image adds 0 to every term."""
    w = {**LOSS_WEIGHTS, **(weights or {})}
    logits = outputs["foreground"].float()
    target = batch["foreground"].to(device=logits.device, dtype=torch.float32)
    count = valid.flatten(1).sum(1)
    parts: dict[str, Tensor] = {}
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    parts["bce"] = (bce.flatten(1).sum(1) / count.clamp_min(1.0)).mean()
    prob = (torch.sigmoid(logits) * valid).flatten(1)
    flat_t = (target * valid).flatten(1)
    dice = (2.0 * (prob * flat_t).sum(1) + 1.0) / (prob.sum(1) + flat_t.sum(1) + 1.0)
    parts["dice"] = (1.0 - dice).mean()
    if "hv" in outputs and "hv" in batch:
        hv = outputs["hv"].float()
        hv_t = batch["hv"].to(device=hv.device, dtype=torch.float32)
        err = (hv - hv_t).pow(2) * valid
        parts["mse"] = (err.flatten(1).sum(1) / (2.0 * count).clamp_min(1.0)).mean()
        inner = 1.0 - F.max_pool2d(1.0 - valid, 3, stride=1, padding=1)  # valid with all 8 neighbours valid
        grad_err = (_sobel_xy(hv) - _sobel_xy(hv_t)).pow(2).sum(1, keepdim=True)
        focus = target * inner
        per_image = (grad_err * focus).flatten(1).sum(1) / (2.0 * focus.flatten(1).sum(1)).clamp_min(1.0)
        parts["msge"] = per_image.mean()
    loss = sum(w[k] * v for k, v in parts.items())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{"path": absolute path, "size": bytes, "sha1": hex digest} of a file."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size": int(st.st_size), "sha1": _sha1(str(p), st.st_size, st.st_mtime_ns)}


def stores_trainable_only(config: Mapping[str, Any]) -> bool:
    """True when checkpoints of this config hold only LoRA + head tensors (base weights rebuilt from file)."""
    cfg = model_config(config)
    return not is_no_weights(cfg["pretrained"]) and bool(cfg["train_only_lora"])


def model_state(net: nn.Module, trainable_only: bool) -> dict[str, Tensor]:
    """CPU copies of the trainable parameters, or of the whole state dict (buffers included)."""
    net = unwrap(net)
    if trainable_only:
        items = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    else:
        items = list(net.state_dict().items())
    return {k: v.detach().to("cpu", copy=True) for k, v in items}


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor inside dicts/lists/tuples replaced by a detached CPU copy (e.g. an optimizer
    state dict whose moments live on the GPU), so a checkpoint loads on a machine without that GPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: Mapping[str, Any],
                    postprocess: Mapping[str, Any], **extra: Any) -> Path:
    """Atomically write a weights_only-readable checkpoint. `extra`: JSON-able values or tensors
    (epoch, val metrics, fold, optimizer state, rng states, ...); tensors are stored as CPU copies."""
    trainable_only = stores_trainable_only(config)
    base = file_fingerprint(model_config(config)["pretrained"]) if trainable_only else None
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(config),
        "postprocess": dict(postprocess),
        "state_kind": "trainable" if trainable_only else "full",
        "base_weights": base,
        "state_dict": model_state(model, trainable_only),
        "parameters": parameter_report(model),
        **to_cpu(extra),
    }
    return atomic_torch_save(ckpt, path)


def save_model_set_index(path: str | os.PathLike, config: Mapping[str, Any], postprocess: Mapping[str, Any],
                         folds: Mapping[int, str], folds_json: str = "folds.json", **extra: Any) -> Path:
    """The top-level `best_model.pth` of a CV folder: {fold: relative checkpoint path} + folds.json."""
    ckpt = {"format": MODEL_SET_FORMAT, "config": dict(config), "postprocess": dict(postprocess),
            "folds": {str(int(k)): str(v) for k, v in folds.items()}, "folds_json": folds_json, **extra}
    return atomic_torch_save(ckpt, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) + format check; UserError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected a .pth checkpoint)")
    ckpt = utils.load_torch_file(path)  # one line saying what is wrong with an unreadable file
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, MODEL_SET_FORMAT):
        raise UserError(f"{path}: not a nuclei model checkpoint (format tag {fmt!r}, expected "
                        f"{CHECKPOINT_FORMAT!r} or {MODEL_SET_FORMAT!r})")
    if fmt == CHECKPOINT_FORMAT:
        for key in ("config", "state_dict", "state_kind"):
            if key not in ckpt:
                raise UserError(f"{path}: corrupt checkpoint (no {key!r} entry)")
    return ckpt


def _describe(config: Mapping[str, Any]) -> str:
    cfg = model_config(config)
    return f"head {cfg['head']}, LoRA rank {cfg['lora_rank']} on {','.join(cfg['lora_targets'])}"


def load_weights(net: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                 source: str | None = None) -> None:
    """Load a checkpoint's state (trainable-only or full) into an existing model; a checkpoint that does
    not fit the model (other LoRA rank/targets/head, missing keys) raises UserError naming the file."""
    if isinstance(checkpoint, Mapping):
        ckpt, name = checkpoint, source or "checkpoint"
    else:
        ckpt, name = read_checkpoint(checkpoint), str(checkpoint)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{name}: a model-set index, not a single model checkpoint")
    net = unwrap(net)
    state = ckpt["state_dict"]
    own = net.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if ckpt["state_kind"] == "full":
        required = list(own)
    else:
        required = [k for k, p in net.named_parameters() if p.requires_grad]
    missing = [k for k in required if k not in state]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of another shape (e.g. {mismatched[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if problems:
        raise UserError(f"{name}: checkpoint does not fit the model ({_describe(ckpt['config'])} recorded): "
                        + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", pretrained: Any = None,
               checkpoint: Mapping[str, Any] | None = None) -> NucleiSAM:
    """One model from a single-model checkpoint, in eval mode on `device`. `pretrained` overrides the
    recorded base-weights path of a trainable-only checkpoint."""
    path = Path(path)
    ckpt = checkpoint if checkpoint is not None else read_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: a model-set index; use load_model_set")
    config = dict(ckpt["config"])
    cfg = model_config(config)
    if cfg["head"] not in HEADS:
        raise UserError(f"{path}: unknown head {cfg['head']!r} in the checkpoint's config")
    if ckpt["state_kind"] == "trainable":
        recorded = ckpt.get("base_weights") or {}
        base = Path(pretrained) if not is_no_weights(pretrained) else Path(recorded.get("path", ""))
        if not base.is_file():
            raise UserError(f"{path}: its base weights {base} were not found (the checkpoint holds only the "
                            f"LoRA and head weights); pass --pretrained <mobile_sam.pt>, e.g. after "
                            f"`python main.py download --output_dir weights`")
        if recorded:
            now = file_fingerprint(base)
            if now["size"] != recorded.get("size") or now["sha1"] != recorded.get("sha1"):
                log.warning("%s: base weights %s differ from those used in training (SHA-1 %s, recorded %s); "
                            "results may be wrong", path, base, now["sha1"][:12], str(recorded.get("sha1"))[:12])
        cfg["pretrained"] = str(base)
        net = _build(cfg, load_pretrained=True)
    elif ckpt["state_kind"] == "full":
        net = _build(cfg, load_pretrained=False)
    else:
        raise UserError(f"{path}: corrupt checkpoint (state_kind {ckpt['state_kind']!r})")
    load_weights(net, ckpt, source=str(path))
    return net.to(device).eval()


def init_from_checkpoint(path: str | os.PathLike, config: Mapping[str, Any]) -> NucleiSAM:
    """A model to fine-tune from a single-model checkpoint: built like the checkpoint's own model (base weights
    from `config["pretrained"]` for a trainable-only checkpoint; whose architecture keys `config` must share),
    its tensors loaded, then trainable parameters set as `config["train_only_lora"]` says (in train mode
    off: call `.train()`)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: a model-set index, not a single model checkpoint")
    cfg = model_config(config)
    build_cfg = dict(cfg, train_only_lora=bool(model_config(ckpt["config"])["train_only_lora"]))
    net = _build(build_cfg, load_pretrained=ckpt["state_kind"] != "full")
    load_weights(net, ckpt, source=str(path))
    lora.mark_trainable(net, bool(cfg["train_only_lora"]), always_trainable=(HEAD_PREFIX,))
    if cfg["head"] == "sam":
        net.head.freeze_untrained()
    return net.eval()


@dataclass
class Member:
    fold: int | None
    model: NucleiSAM
    checkpoint_path: Path
    test_images: list[str] | None = None
    val_images: list[str] | None = None
    postprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSet:
    members: list[Member]
    config: dict[str, Any]
    postprocess: dict[str, Any]
    is_cv: bool
    output_dir: Path

    @property
    def models(self) -> list[NucleiSAM]:
        return [m.model for m in self.members]

    @property
    def input_size(self) -> int:
        return int(self.config.get("input_size", MODEL_DEFAULTS["input_size"]))

    @property
    def head(self) -> str:
        return str(self.config.get("head", "hv"))


def _fold_images(folds_json: Path | None, fold: int | None) -> tuple[list[str] | None, list[str] | None]:
    if folds_json is None or fold is None or not folds_json.is_file():
        return None, None
    info = dataset.read_folds_json(folds_json)  # folds list image indices into info["images"]
    images = info["images"]
    for entry in info["folds"]:
        if int(entry["fold"]) == int(fold):
            return ([images[i] for i in entry["test"]] or None), ([images[i] for i in entry["val"]] or None)
    return None, None


def load_model_set(path: str | os.PathLike, device: str | torch.device = "cpu",
                   pretrained: Any = None) -> ModelSet:
    """A single checkpoint -> one member; a CV index (`best_model.pth` at the top of a CV output folder, or
    the folder itself) -> one member per fold, each knowing its test images (from folds.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best_model.pth"
    ckpt = read_checkpoint(path)
    if ckpt["format"] == MODEL_SET_FORMAT:
        members = []
        folds_json = path.parent / str(ckpt.get("folds_json", "folds.json"))
        folds = ckpt.get("folds") or {}
        if not folds:
            raise UserError(f"{path}: corrupt model-set index (no folds)")
        for key in sorted(folds, key=int):
            member_path = path.parent / folds[key]
            if not member_path.is_file():
                raise UserError(f"{path}: fold {key} checkpoint {member_path} not found")
            member_ckpt = read_checkpoint(member_path)
            net = load_model(member_path, device, pretrained, checkpoint=member_ckpt)
            test, val = _fold_images(folds_json, int(key))
            members.append(Member(int(key), net, member_path, test, val,
                                  dict(member_ckpt.get("postprocess") or {})))
        return ModelSet(members, dict(ckpt["config"]), dict(ckpt.get("postprocess") or {}), True, path.parent)
    net = load_model(path, device, pretrained, checkpoint=ckpt)
    fold = ckpt.get("fold")
    folds_json = next((p for p in (path.parent / "folds.json", path.parent.parent / "folds.json")
                       if p.is_file()), None)
    test, val = _fold_images(folds_json, fold)
    member = Member(None if fold is None else int(fold), net, path, test, val,
                    dict(ckpt.get("postprocess") or {}))
    out_dir = folds_json.parent if folds_json is not None else path.parent
    return ModelSet([member], dict(ckpt["config"]), dict(ckpt.get("postprocess") or {}), False, out_dir)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
def native_bf16(device: torch.device | str) -> bool:
    """True for a CUDA device with bf16 in hardware (compute capability 8.0+, e.g. A100/H100; or ROCm).
    Not `torch.cuda.is_bf16_supported()`: by default that also says yes for emulated bf16 on older GPUs
    (V100, T4), and it looks at the current device, not `device`."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device | str, amp: bool = True, fp16_fallback: bool = False
                   ) -> torch.dtype | None:
    """bf16 on CUDA devices with native bf16; on other CUDA devices float16 with `fp16_fallback`
    (training, with a GradScaler), else None (full precision). None on CPU/MPS or without `amp`."""
    device = torch.device(device)
    if not amp or device.type != "cuda" or not torch.cuda.is_available():
        return None
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if fp16_fallback else None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast context for `dtype`, or a no-op context when dtype is None."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """A copy with LoRA merged into the base weights, encoder Conv+BN folded and the head on channels-last
    tensors (faster, same outputs up to float rounding)."""
    net = copy.deepcopy(unwrap(net)).eval()
    lora.merge_lora(net)
    mobile_sam.fuse_batchnorm(net)
    if isinstance(getattr(net, "head", None), DecoderHead):
        net.head.to(memory_format=torch.channels_last)
        net.head.channels_last = True
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _as_list(models: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    models = list(models)
    if not models:
        raise ValueError("predict_maps: no models given")
    return models


@torch.no_grad()
def predict_maps_batch(models: nn.Module | Sequence[nn.Module], images: Sequence[np.ndarray], input_size: int,
                       device: torch.device | str, amp: bool = True
                       ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """For each uint8 (H, W, 3) image: (foreground probability float32 (H, W), hv float32 (2, H, W) or None),
    at the image's own resolution, averaged over `models` (probabilities and HV maps are averaged)."""
    models = _as_list(models)
    if not images:
        return []
    device = torch.device(device)
    for im in images:
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"predict_maps: expected (H, W, 3) images, got shape {im.shape}")
    batch = np.stack([dataset.resize_image(np.asarray(im, dtype=np.uint8), int(input_size)) for im in images])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
    return maps_to_images(_average_outputs(models, x, device, amp), [tuple(im.shape[:2]) for im in images])


def _average_outputs(models: list[nn.Module], x: Tensor, device: torch.device | str, amp: bool,
                     crop: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """{"foreground_prob", "hv" (when the head has it)} of the batch `x` (B, 3, S, S), averaged over `models`
    (each run in eval mode under autocast), cropped to the top-left `crop` (h, w) when given."""
    dtype = autocast_dtype(device, amp)
    rows, cols = (slice(None), slice(None)) if crop is None else (slice(0, crop[0]), slice(0, crop[1]))
    fg_sum: Tensor | None = None
    hv_sum: Tensor | None = None
    for net in models:
        was_training = net.training
        net.eval()
        try:
            with autocast(device, dtype):
                out = net(x)
        finally:
            net.train(was_training)
        fg = torch.sigmoid(out["foreground"].float())[:, :, rows, cols]
        fg_sum = fg if fg_sum is None else fg_sum + fg
        if "hv" in out:
            hv = out["hv"].float()[:, :, rows, cols]
            hv_sum = hv if hv_sum is None else hv_sum + hv
    n = float(len(models))
    averaged = {"foreground_prob": fg_sum / n}
    if hv_sum is not None:
        averaged["hv"] = hv_sum / n
    return averaged


@torch.no_grad()
def network_outputs(models: nn.Module | Sequence[nn.Module], x: Tensor, device: torch.device | str,
                    amp: bool = True, crop: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """{"foreground_prob", "hv" (when the head has it)} of a uint8 (B, 3, S, S) batch already on `device`,
    averaged over `models` and cropped to the top-left `crop` (h, w): the network step of
    `predict_maps_scaled`, for callers that keep the maps on the device (`inference.NetworkMaps`)."""
    return _average_outputs(_as_list(models), x, device, amp, crop=crop)


def network_size(length: int, scale: float, multiple: int = 64) -> tuple[int, int]:
    """(resized, padded) side of a window of `length` pixels seen by the network at `scale` network pixels
    per image pixel: `resized = round(length * scale)`, `padded` = the next multiple of `multiple` (what the
    encoder accepts), at least `multiple`."""
    resized = max(1, int(round(length * float(scale))))
    return resized, max(multiple, -(-resized // multiple) * multiple)


@torch.no_grad()
def predict_maps_scaled(models: nn.Module | Sequence[nn.Module], images: Sequence[np.ndarray], scale: float,
                        device: torch.device | str, amp: bool = True, multiple: int = 64
                        ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Like `predict_maps_batch`, but the magnification comes from `scale` (network pixels per image pixel,
    i.e. the model's input size / its training tile size), not from the image size: each image (all of the
    same (H, W)) is resized by `scale`, mirror-padded at the bottom/right to a multiple of `multiple`, run,
    and the maps are cropped and resized back to (H, W). When `round(H * scale)` is already the padded size
    this is exactly `predict_maps_batch(models, images, H * scale, ...)`."""
    models = _as_list(models)
    if not images:
        return []
    shapes = {tuple(np.asarray(im).shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"predict_maps_scaled: images of one batch must share a shape, got {sorted(shapes)}")
    h, w = next(iter(shapes))[:2]
    rh, ph = network_size(h, scale, multiple)
    rw, pw = network_size(w, scale, multiple)
    side = max(ph, pw)
    batch = []
    for im in images:
        resized = dataset.resize_image(np.asarray(im, dtype=np.uint8), (rh, rw))
        if (rh, rw) != (side, side):
            resized = np.pad(resized, ((0, side - rh), (0, side - rw), (0, 0)), mode="symmetric")
        batch.append(resized)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(torch.device(device))
    return maps_to_images(_average_outputs(models, x, device, amp, crop=(rh, rw)), [(h, w)] * len(images))


def maps_to_images(outputs: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]]
                   ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Network maps at input size -> per-image numpy maps at each image's own (H, W), bilinear.

    `outputs`: {"foreground_prob": (B,1,S,S) probabilities} or raw {"foreground": logits}, and optionally
    "hv" (B,2,S,S). Returns [(foreground_prob float32 (H, W), hv float32 (2, H, W) | None), ...].
    """
    if "foreground_prob" in outputs:
        prob = outputs["foreground_prob"].float()
    else:
        prob = torch.sigmoid(outputs["foreground"].float())
    hv_all = outputs["hv"].float() if "hv" in outputs else None
    results = []
    for i, size in enumerate(sizes):
        size = (int(size[0]), int(size[1]))
        fg = F.interpolate(prob[i:i + 1], size=size, mode="bilinear", align_corners=False)[0, 0]
        hv_np = None
        if hv_all is not None:
            hv = F.interpolate(hv_all[i:i + 1], size=size, mode="bilinear", align_corners=False)[0]
            hv_np = hv.cpu().numpy().astype(np.float32)
        results.append((fg.clamp(0, 1).cpu().numpy().astype(np.float32), hv_np))
    return results


def predict_maps(models: nn.Module | Sequence[nn.Module], image: np.ndarray, input_size: int,
                 device: torch.device | str, amp: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(foreground probability float32 (H, W), hv float32 (2, H, W) | None) for one uint8 (H, W, 3) image,
    resized to `input_size` for the network and back to (H, W), averaged over `models`."""
    return predict_maps_batch(models, [image], input_size, device, amp)[0]


__all__ = [
    "CHECKPOINT_FORMAT", "MODEL_SET_FORMAT", "HEADS", "MODEL_DEFAULTS", "LOSS_WEIGHTS", "DecoderHead",
    "NucleiSAM", "build_model", "compute_loss", "masked_loss", "save_checkpoint", "save_model_set_index",
    "read_checkpoint", "load_weights", "load_model", "init_from_checkpoint", "Member", "ModelSet", "load_model_set",
    "predict_maps", "predict_maps_batch", "predict_maps_scaled", "network_size", "network_outputs",
    "prepare_for_inference", "maps_to_images", "parameter_report", "head_parameter_count", "unwrap", "model_config",
    "stores_trainable_only", "file_fingerprint", "autocast_dtype", "autocast", "model_state", "native_bf16",
    "to_cpu",
]
