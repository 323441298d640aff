"""MobileSAM's image encoder (TinyViT-5M + SAM neck) in plain PyTorch, reading the official checkpoint.

MobileSAM replaces SAM's ViT-H image encoder by a small hierarchical TinyViT. This module is our own
implementation of that encoder, written so that it

- reads the `image_encoder.*` weights of the official `mobile_sam.pt` strictly (every key, every shape),
  ignoring the prompt encoder, the mask decoder and TinyViT's unused classification head;
- computes what the official encoder computes (checked against a golden embedding in the tests), for any
  input whose sides are multiples of 16 (the project uses multiples of 64; the official code hard-codes 1024);
- exposes the multi-scale features a dense-prediction head needs (`forward_features`);
- is fast for inference: attention through `scaled_dot_product_attention`, Conv+BatchNorm folding
  (`fuse_batchnorm`), channels-last tensors, no Python control flow that depends on data (so callers can
  `torch.compile` it), bf16 autocast friendly.

Layout: stage 0 (MBConv blocks) runs on NCHW tensors; the transformer stages keep tokens as (B, H, W, C).
Both layouts are the same memory when the NCHW tensor is channels-last, so switching between them is free.

Architecture (TinyViT-5M as used by MobileSAM): patch embedding (two 3x3 stride-2 Conv+BN, GELU between)
to 64 channels at stride 4; stage 0: 2 MBConv blocks (64 ch); patch merging to 128 ch at stride 8;
stage 1: 2 transformer blocks (4 heads, window 7); merging to 160 ch at stride 16; stage 2: 6 blocks
(5 heads, window 14); merging to 320 ch, stride 1 (MobileSAM keeps the grid at /16); stage 3: 2 blocks
(10 heads, window 7); neck: 1x1 conv 320->256, LayerNorm2d, 3x3 conv 256->256, LayerNorm2d.
A transformer block is: x + WindowAttention(x) -> depthwise 3x3 Conv+BN (no residual) -> x + MLP(x).
Window attention pads the grid at the bottom/right with zero tokens to a multiple of the window (the
padded tokens take part in attention as keys/values, exactly like TinyViT) and adds a learned bias per
head and per relative offset (|drow|, |dcol|) inside the window.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _activation_checkpoint

import utils
from utils import UserError

log = logging.getLogger(__name__)

SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
MLP_RATIO = 4
MBCONV_EXPAND_RATIO = 4
LOCAL_CONV_SIZE = 3
NECK_DIM = 256
CHECKPOINT_PREFIX = "image_encoder."
# parts of the official image encoder that we do not build (TinyViT's ImageNet classification head)
IGNORED_ENCODER_PREFIXES = ("image_encoder.norm_head.", "image_encoder.head.")
ATTENTION_IMPLS = ("sdpa", "explicit")


def normalize_image(x: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 or float in 0..255 (RGB) -> SAM-normalised float tensor.

    uint8 becomes float32; a floating input keeps its dtype.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize_image: expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def _no_grad_needed(x: Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def _gelu(x: Tensor, inplace: bool = True) -> Tensor:
    """Exact (erf) GELU; in place when autograd does not need the input (inference). Only used on fresh
    intermediate tensors: in place avoids allocating another large buffer, which on the CPU costs more
    (page faults) than the GELU itself for the stage-0 activations."""
    return torch.ops.aten.gelu_(x) if inplace and _no_grad_needed(x) else F.gelu(x)


def _add(fresh: Tensor, other: Tensor, inplace: bool = True) -> Tensor:
    """fresh + other, written into `fresh` (an intermediate nobody else holds) when autograd allows."""
    if inplace and _no_grad_needed(fresh) and _no_grad_needed(other) and fresh.shape == other.shape:
        return fresh.add_(other)
    return fresh + other


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d (checkpoint names `c.*`, `bn.*`).

    `fuse_batchnorm` folds the BatchNorm into the convolution (the conv gets a bias, `bn` becomes Identity).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_ch)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @property
    def is_fused(self) -> bool:
        return not isinstance(self.bn, nn.BatchNorm2d)

    def forward(self, x: Tensor) -> Tensor:
        c = self.c
        if c.kernel_size == (1, 1) and c.groups == 1 and c.stride == (1, 1) and c.padding == (0, 0) \
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous():
            # pointwise conv on a channels-last tensor = a linear layer over the channels of (B, H, W, C):
            # a single GEMM with the bias fused (several times faster than the CPU conv path for 1x1)
            y = F.linear(x.permute(0, 2, 3, 1), c.weight.flatten(1), c.bias).permute(0, 3, 1, 2)
        else:
            y = c(x)
        return self.bn(y)

    @torch.no_grad()
    def fuse(self) -> bool:
        """Fold the BatchNorm (its running statistics) into the conv. Returns False if already fused."""
        if self.is_fused:
            return False
        bn = self.bn
        assert isinstance(bn, nn.BatchNorm2d)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = self.c
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          dilation=conv.dilation, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fused.bias.copy_(bias)
        fused.weight.requires_grad_(conv.weight.requires_grad)
        fused.bias.requires_grad_(conv.weight.requires_grad)
        self.c = fused
        self.bn = nn.Identity()
        return True


class PatchEmbed(nn.Module):
    """Two 3x3 stride-2 Conv+BN with GELU between: (B, 3, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_ch: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_ch, dim // 2, 3, 2, 1), nn.GELU(), ConvBN(dim // 2, dim, 3, 2, 1))
        self.inplace = True

    def forward(self, x: Tensor) -> Tensor:
        return self.seq[2](_gelu(self.seq[0](x), self.inplace))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU after the sum."""

    def __init__(self, dim: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = dim * expand_ratio
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1, bn_weight_init=0.0)
        self.inplace = True
        # eval-mode inference on a channels-last image: process row bands whose expanded (x4) activation
        # stays below this many bytes (0 = never). Large fresh buffers cost page faults on the CPU.
        self.tile_bytes = 16 * 2**20

    def forward(self, x: Tensor) -> Tensor:
        if self.tile_bytes and self.inplace and not self.training and _no_grad_needed(x) and x.dim() == 4 \
                and x.shape[0] == 1 and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous():
            row_bytes = self.conv1.c.out_channels * x.shape[3] * x.element_size()
            rows = max(1, self.tile_bytes // row_bytes)
            if rows < x.shape[2]:
                return self._forward_bands(x, rows)
        y = _gelu(self.conv1(x), self.inplace)
        y = _gelu(self.conv2(y), self.inplace)
        y = self.conv3(y)
        return _gelu(_add(y, x, self.inplace), self.inplace)

    def _forward_bands(self, x: Tensor, rows: int) -> Tensor:
        """Same result, computed in bands of `rows` image rows (each with a one-row halo for the 3x3 conv)."""
        h = x.shape[2]
        out = torch.empty_like(x)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - 1), min(h, r1 + 1)  # rows read, with halo (zero padding at the image border)
            y = _gelu(self.conv1(x[:, :, a:b]))
            y = _gelu(self.conv2(y)[:, :, r0 - a:r1 - a])
            y = self.conv3(y)
            out[:, :, r0:r1] = _gelu(y.add_(x[:, :, r0:r1]))
        return out


class PatchMerging(nn.Module):
    """1x1 Conv+BN, GELU, depthwise 3x3 Conv+BN (stride 1 or 2), GELU, 1x1 Conv+BN. NCHW in and out."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)
        self.inplace = True

    def forward(self, x: Tensor) -> Tensor:
        x = _gelu(self.conv1(x), self.inplace)
        x = _gelu(self.conv2(x), self.inplace)
        return self.conv3(x)


def relative_offset_index(window_size: int) -> tuple[Tensor, int]:
    """Index table (N, N), N = window_size**2, mapping each pair of window positions to its offset id.

    Offsets (|row1 - row2|, |col1 - col2|) are numbered in order of first appearance while visiting every
    pair (p1, p2) of positions, both row-major, p1 in the outer loop: the layout of the checkpoint's
    `attention_biases` columns. Returns (index, number of distinct offsets).
    """
    points = list(itertools.product(range(window_size), range(window_size)))
    ids: dict[tuple[int, int], int] = {}
    index = []
    for r1, c1 in points:
        for r2, c2 in points:
            offset = (abs(r1 - r2), abs(c1 - c2))
            if offset not in ids:
                ids[offset] = len(ids)
            index.append(ids[offset])
    n = len(points)
    return torch.tensor(index, dtype=torch.long).view(n, n), len(ids)


class WindowAttention(nn.Module):
    """LayerNorm + multi-head self-attention inside non-overlapping windows, with relative-position bias.

    Input and output (B, H, W, C). The grid is padded at the bottom/right to a multiple of the window with
    zero tokens (before the LayerNorm, as in TinyViT). `qkv` outputs, per head, [q, k, v] (head_dim each).
    `impl` chooses `"sdpa"` (F.scaled_dot_product_attention, bias as additive float mask) or
    `"explicit"` (q @ k^T * scale + bias, softmax, @ v: the reference formulation).
    The bias table is expanded at every call (cheap), never cached, so loaded weights always take effect.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = self.head_dim ** -0.5
        self.impl = "sdpa"
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index, num_offsets = relative_offset_index(window_size)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("bias_index", index, persistent=False)

    def relative_bias(self) -> Tensor:
        """(num_heads, N, N) additive bias, N = window_size**2."""
        n = self.bias_index.shape[0]
        return self.attention_biases.index_select(1, self.bias_index.view(-1)).view(-1, n, n)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        nh, nw = -(-h // ws), -(-w // ws)  # windows per column / row (the last ones may be padded)
        heads, hd = self.num_heads, self.head_dim
        qkv = self.qkv(self.norm(x))  # (B, H, W, 3C), per head [q, k, v]
        # Window partition straight into the layout attention wants, (3, B*nh*nw, heads, ws*ws, hd): one
        # copy instead of pad + permute. `grid` indexes the same memory as (B, nh, ws, nw, ws, heads, 3, hd).
        windows = qkv.new_empty(3, b, nh, nw, heads, ws, ws, hd)
        grid = windows.permute(1, 2, 5, 3, 6, 4, 0, 7)
        if nh * ws != h or nw * ws != w:
            # A zero padding token becomes norm.bias after the LayerNorm; its q/k/v is one vector shared
            # by all padded positions (computed once instead of running LayerNorm + qkv on the padding).
            pad_token = self.qkv(self.norm(x.new_zeros(1, c))).to(qkv.dtype).view(heads, 3, hd)
            grid[:, nh - 1, h - (nh - 1) * ws:] = pad_token
            grid[:, :, :, nw - 1, w - (nw - 1) * ws:] = pad_token
        for dst, src in _window_blocks(grid, qkv.reshape(b, h, w, heads, 3, hd), ws):
            dst.copy_(src)
        q, k, v = windows.view(3, b * nh * nw, heads, ws * ws, hd).unbind(0)
        bias = self.relative_bias()
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale + bias
            attn = attn.softmax(dim=-1)
            out = attn.to(v.dtype) @ v
        # (B*nh*nw, heads, ws*ws, hd) -> (B, H, W, C) without the padding, again in one copy
        out_grid = out.view(b, nh, nw, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
        y = out.new_empty(b, h, w, c)
        for src, dst in _window_blocks(out_grid, y.view(b, h, w, heads, hd), ws):
            dst.copy_(src)
        return self.proj(y)


def _window_blocks(grid: Tensor, image: Tensor, ws: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Pairs of matching views (window-grid part, image part) covering an unpadded (B, H, W, ...) image.

    `grid` is (B, nh, ws, nw, ws, ...) (window row, row in window, window column, column in window);
    `image` is (B, H, W, ...) with the same trailing dims. Complete windows form one block per direction,
    the partial last window row / column another, so at most four pairs cover the image. The views are
    made one at a time (a generator), after the previous pair was copied, as autograd requires.
    """
    b, h, w = image.shape[:3]
    tail = image.shape[3:]

    def spans(n: int) -> list[tuple[int, int, int]]:  # (first window, number of windows, rows used)
        full, rest = divmod(n, ws)
        out = [(0, full, ws)] if full else []
        return out + [(full, 1, rest)] if rest else out

    for wi, ni, ri in spans(h):
        for wj, nj, rj in spans(w):
            g = grid[:, wi:wi + ni, :ri, wj:wj + nj, :rj]
            im = image[:, wi * ws:wi * ws + ni * ri, wj * ws:wj * ws + nj * rj]
            yield g, im.view(b, ni, ri, nj, rj, *tail)


class Mlp(nn.Module):
    """LayerNorm, Linear (x mlp_ratio), GELU, Linear. Works on the last dimension."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.inplace = True

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_gelu(self.fc1(self.norm(x)), self.inplace))


class TinyViTBlock(nn.Module):
    """x + attn(x) -> depthwise Conv+BN (local mixing, replaces x) -> x + mlp(x). (B, H, W, C) in and out."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: int = MLP_RATIO,
                 local_conv_size: int = LOCAL_CONV_SIZE) -> None:
        super().__init__()
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        # (B, H, W, C) viewed as a channels-last NCHW tensor: no copy
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A list of blocks and an optional patch merging after them (checkpoint names `blocks.*`, `downsample.*`)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (SAM's neck, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------
class MobileSAMEncoder(nn.Module):
    """MobileSAM's TinyViT-5M image encoder with SAM's neck.

    `forward(x)`: x (B, 3, H, W) SAM-normalised (see `normalize_image`), H and W multiples of 16 ->
    neck embedding (B, 256, H/16, W/16). `forward_features(x)` returns all scales (`feature_channels`).

    Options (attributes, safe to change at any time; `configure(fast=False)` selects the plain path):
    - `attention_impl`: "sdpa" (default, fast) or "explicit" (reference formulation with softmax);
    - `channels_last`: run the patch embedding and stage 0 on channels-last tensors too (default True; the
      transformer stages always are, as (B, H, W, C) tokens), pointwise convs there become GEMMs;
    - `inplace_activations`: GELU / residual sums in place when autograd does not need them (default True);
    - `gradient_checkpointing`: recompute block activations in the backward pass while training.
    """

    feature_channels = {"stride4": EMBED_DIMS[0], "stride8": EMBED_DIMS[1], "stride16": EMBED_DIMS[3],
                        "neck": NECK_DIM}

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, EMBED_DIMS[0])
        layers: list[nn.Module] = [
            Stage([MBConv(EMBED_DIMS[0], MBCONV_EXPAND_RATIO) for _ in range(DEPTHS[0])],
                  PatchMerging(EMBED_DIMS[0], EMBED_DIMS[1], stride=2))
        ]
        for i in range(1, 4):
            # MobileSAM: the merging into the 320-channel stage keeps stride 1 (output grid stays at /16)
            downsample = None if i == 3 else PatchMerging(EMBED_DIMS[i], EMBED_DIMS[i + 1],
                                                          stride=1 if i == 2 else 2)
            blocks = [TinyViTBlock(EMBED_DIMS[i], NUM_HEADS[i], WINDOW_SIZES[i]) for _ in range(DEPTHS[i])]
            layers.append(Stage(blocks, downsample))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(EMBED_DIMS[3], NECK_DIM, 1, bias=False),
            LayerNorm2d(NECK_DIM),
            nn.Conv2d(NECK_DIM, NECK_DIM, 3, padding=1, bias=False),
            LayerNorm2d(NECK_DIM),
        )
        self.channels_last = True
        self.gradient_checkpointing = False
        self.reset_parameters()

    # -- options --------------------------------------------------------------------------------
    @property
    def attention_impl(self) -> str:
        impls = {m.impl for m in self.modules() if isinstance(m, WindowAttention)}
        return impls.pop() if len(impls) == 1 else "mixed"

    @attention_impl.setter
    def attention_impl(self, impl: str) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.impl = impl

    @property
    def inplace_activations(self) -> bool:
        return all(m.inplace for m in self.modules() if hasattr(m, "inplace") and m is not self)

    @inplace_activations.setter
    def inplace_activations(self, enabled: bool) -> None:
        for m in self.modules():
            if m is not self and isinstance(getattr(m, "inplace", None), bool):
                m.inplace = bool(enabled)

    def configure(self, fast: bool) -> "MobileSAMEncoder":
        """fast=True: SDPA attention, channels-last, in-place activations (the defaults);
        fast=False: the plain reference formulation (explicit softmax, NCHW, out-of-place).
        BatchNorm folding is separate (`fuse_batchnorm`). Returns self."""
        self.attention_impl = "sdpa" if fast else "explicit"
        self.channels_last = fast
        self.inplace_activations = fast
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation (used when no checkpoint is given)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.zeros_(m.attention_biases)

    # -- forward --------------------------------------------------------------------------------
    def _blocks(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in blocks:
            x = _activation_checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return x

    def _run(self, x: Tensor, collect: bool) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileSAMEncoder: expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"MobileSAMEncoder: height and width must be multiples of 16, got "
                             f"{tuple(x.shape[-2:])}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats: dict[str, Tensor] = {}
        s0, s1, s2, s3 = self.layers
        x = self.patch_embed(x)
        x = self._blocks(s0.blocks, x)  # NCHW
        if collect:
            feats["stride4"] = x
        x = s0.downsample(x)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C) from here on
        if not self.channels_last:
            x = x.contiguous()
        x = self._blocks(s1.blocks, x)
        if collect:
            feats["stride8"] = x.permute(0, 3, 1, 2)
        x = s1.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self._blocks(s2.blocks, x)
        x = s2.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self._blocks(s3.blocks, x)
        x = x.permute(0, 3, 1, 2)
        if collect:
            feats["stride16"] = x
        feats["neck"] = self.neck(x)
        return {k: v.contiguous() for k, v in feats.items()}

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, collect=False)["neck"]

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"stride4": (B,64,H/4,W/4), "stride8": (B,128,H/8,W/8), "stride16": (B,320,H/16,W/16),
        "neck": (B,256,H/16,W/16)}: stage-0 and stage-1 outputs before their patch merging, the last
        stage's output and the neck embedding (the same tensor `forward` returns)."""
        return self._run(x, collect=True)


def fuse_batchnorm(module: nn.Module) -> int:
    """Fold every Conv+BatchNorm pair (`ConvBN`) inside `module` into a single conv, for inference.

    Uses the BatchNorm running statistics, i.e. the eval-mode behaviour; afterwards the state dict has
    `<name>.c.bias` and no `<name>.bn.*` (so load checkpoints before fusing). Returns how many were fused.
    """
    return sum(1 for m in list(module.modules()) if isinstance(m, ConvBN) and m.fuse())


# ----------------------------------------------------------------------------------------------
# Checkpoint reading
# ----------------------------------------------------------------------------------------------
def _shape(t: Any) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """torch.load a plain state dict (weights_only, on the CPU); UserError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a checkpoint file (mobile_sam.pt)")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found (`python main.py download` fetches mobile_sam.pt)")
    state = utils.load_torch_file(path)  # one line saying what is wrong with an unreadable file
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{path}: not a state dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{path}: not a plain state dict (key {bad[0]!r} is a {type(state[bad[0]]).__name__})")
    return dict(state)


def encoder_state_from_checkpoint(state: Mapping[str, Tensor], model: nn.Module,
                                  source: str | Path = "checkpoint") -> dict[str, Tensor]:
    """Pick the `image_encoder.*` entries of a full MobileSAM state dict for `model`, checking them strictly.

    Every key of `model.state_dict()` must be present with the same shape, and no other encoder key may be
    present (apart from the classification head). The rest (prompt encoder, mask decoder, head) is ignored
    and logged once. Raises UserError naming `source` and the key.
    """
    expected = model.state_dict()
    if not any(k.startswith(CHECKPOINT_PREFIX) for k in state):
        raise UserError(f"{source}: no '{CHECKPOINT_PREFIX}*' keys; not a MobileSAM checkpoint "
                        f"(first key: {next(iter(state), None)!r})")
    selected: dict[str, Tensor] = {}
    ignored: Counter[str] = Counter()
    for key, value in state.items():
        if key.startswith(IGNORED_ENCODER_PREFIXES):
            ignored["image encoder classification head"] += 1
        elif key.startswith(CHECKPOINT_PREFIX):
            name = key[len(CHECKPOINT_PREFIX):]
            if name not in expected:
                raise UserError(f"{source}: unexpected key {key!r} {_shape(value)}; this encoder is "
                                f"MobileSAM's TinyViT-5M (is the file a different SAM variant?)")
            selected[name] = value
        else:
            ignored[key.split(".", 1)[0]] += 1
    for name, ref in expected.items():
        key = CHECKPOINT_PREFIX + name
        if name not in selected:
            raise UserError(f"{source}: missing key {key!r} (expected shape {_shape(ref)})")
        if tuple(selected[name].shape) != tuple(ref.shape):
            raise UserError(f"{source}: key {key!r} has shape {_shape(selected[name])}, "
                            f"expected {_shape(ref)}")
        if selected[name].is_floating_point() != ref.is_floating_point():
            raise UserError(f"{source}: key {key!r} has dtype {selected[name].dtype}, expected {ref.dtype}")
    if ignored:
        parts = ", ".join(f"{name}: {n}" for name, n in sorted(ignored.items()))
        log.info("%s: loaded %d image-encoder tensors; ignored %d keys not used by the encoder (%s)",
                 source, len(selected), sum(ignored.values()), parts)
    return selected


def load_mobile_sam_encoder(checkpoint: str | Path | None) -> MobileSAMEncoder:
    """The MobileSAM image encoder in eval mode, with the weights of the official `mobile_sam.pt`.

    `checkpoint=None` gives an explicitly random initialisation (logged as a warning). Loading is strict:
    a missing, unexpected or misshaped encoder key raises UserError naming the file and the key.
    """
    state = None if checkpoint is None else read_state_dict(checkpoint)
    model = MobileSAMEncoder()
    if state is None:
        log.warning("MobileSAM encoder: no checkpoint given, the weights are RANDOM (not pretrained)")
    else:
        model.load_state_dict(encoder_state_from_checkpoint(state, model, source=Path(checkpoint)), strict=True)
    return model.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "normalize_image", "MobileSAMEncoder", "TinyViTBlock",
    "WindowAttention", "ConvBN", "fuse_batchnorm", "load_mobile_sam_encoder", "read_state_dict",
    "encoder_state_from_checkpoint", "count_parameters", "relative_offset_index", "ATTENTION_IMPLS",
]
