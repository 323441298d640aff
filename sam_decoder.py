"""MobileSAM's prompt encoder and two-way-transformer mask decoder in plain PyTorch, reading the official
checkpoint strictly; also the promptless `SAMHead` used by `train --head sam`.

MobileSAM keeps SAM's prompt encoder and mask decoder unchanged (only the image encoder is replaced), so
this module is our own implementation of SAM's published design, written to compute what the official
`prompt_encoder` + `mask_decoder` pair computes (checked against a golden reference in the tests):

Prompt encoder (`PromptEncoder`, 6,220 parameters + a 2 x 128 buffer):
- positions are encoded with random Fourier features: a point (x, y) in the input frame is shifted to the
  pixel centre (+0.5), divided by the frame size, mapped to [-1, 1], multiplied by a fixed Gaussian matrix
  (2 x 128, `pe_layer.positional_encoding_gaussian_matrix`, a buffer, never trained) and turned into
  [sin(2 pi v), cos(2 pi v)] (256 values);
- a point adds `point_embeddings[label]` (0 negative, 1 positive); when points come without a box one
  padding point (label -1: zero encoding + `not_a_point_embed`) is appended; a box becomes its two corners
  with `point_embeddings[2]` and `[3]`;
- the dense embedding is `no_mask_embed` at every grid cell (a mask prompt would go through
  `mask_downscaling`; it is implemented for completeness of the checkpoint layout);
- the dense positional encoding of the embedding grid evaluates the same features at the cell centres.

Mask decoder (`MaskDecoder`, 4,058,340 parameters): output tokens = IoU token + 4 mask tokens, followed
by the prompt tokens; a two-way transformer (depth 2, width 256, 8 heads, MLP 2048 with ReLU; token <->
image cross attention at half width) updates tokens and image embedding; the image embedding is upscaled
4x by two 2x2 transposed convolutions (LayerNorm2d + GELU, then GELU); each mask token goes through its
own 3-layer MLP to 32 weights that are dotted with the upscaled embedding (one mask each); the IoU token
goes through a 3-layer MLP to 4 predicted IoUs. `multimask_output=False` returns mask 0, `True` masks 1-3.

Frame. The official code fixes the input frame at 1024 x 1024 and the grid at 64 x 64. Here the frame is
16 x the grid of the given embedding (1024 for a 64 x 64 embedding, so the official case is unchanged),
which lets the decoder run on the embedding of any input size the encoder accepts.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import LayerNorm2d, read_state_dict  # LayerNorm over channels, eps 1e-6, as in SAM
from utils import UserError

log = logging.getLogger(__name__)

EMBED_DIM = 256
NUM_POS_FEATS = 128
MASK_IN_CHANS = 16
NUM_MASK_TOKENS = 4        # 1 single-mask output + 3 multimask outputs
TRANSFORMER_DEPTH = 2
NUM_HEADS = 8
MLP_DIM = 2048
ATTENTION_DOWNSAMPLE = 2   # token <-> image cross attention runs at EMBED_DIM / 2
IOU_HEAD_DEPTH = 3
IOU_HEAD_HIDDEN = 256
PATCH = 16                 # input pixels per embedding cell (the image encoder's stride)
PREFIXES = ("prompt_encoder.", "mask_decoder.")


# ----------------------------------------------------------------------------------------------
# Prompt encoder
# ----------------------------------------------------------------------------------------------
class RandomFourierPositions(nn.Module):
    """Random Fourier features of 2-D positions (checkpoint name `pe_layer`)."""

    def __init__(self, num_pos_feats: int = NUM_POS_FEATS) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, unit_xy: Tensor) -> Tensor:
        """(..., 2) positions in [0, 1] (x, y) -> (..., 2 * num_pos_feats)."""
        g = self.positional_encoding_gaussian_matrix
        v = (2.0 * unit_xy.to(g.dtype) - 1.0) @ g
        v = 2.0 * math.pi * v
        return torch.cat([torch.sin(v), torch.cos(v)], dim=-1)

    def grid(self, height: int, width: int) -> Tensor:
        """(C, height, width) encoding of the cell centres of a height x width grid."""
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(height, device=g.device, dtype=g.dtype) + 0.5) / height
        xs = (torch.arange(width, device=g.device, dtype=g.dtype) + 0.5) / width
        xy = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1)
        return self.encode(xy).permute(2, 0, 1)

    def points(self, xy: Tensor, frame_hw: tuple[int, int]) -> Tensor:
        """(..., 2) positions (x, y) in a frame of frame_hw = (H, W) pixels -> (..., C)."""
        scale = xy.new_tensor([1.0 / frame_hw[1], 1.0 / frame_hw[0]])
        return self.encode(xy.float() * scale)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder (checkpoint prefix `prompt_encoder.`)."""

    def __init__(self, embed_dim: int = EMBED_DIM, mask_in_chans: int = MASK_IN_CHANS) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans),
            nn.GELU(), nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self, grid_hw: tuple[int, int]) -> Tensor:
        """(1, C, h, w) positional encoding of the embedding grid (`get_dense_pe` of the official code)."""
        return self.pe_layer.grid(int(grid_hw[0]), int(grid_hw[1]))[None]

    def embed_points(self, coords: Tensor, labels: Tensor, pad: bool, frame_hw: tuple[int, int]) -> Tensor:
        coords = coords.float() + 0.5  # pixel centres
        labels = labels.to(coords.device)
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.points(coords, frame_hw)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + (lab == 0).to(emb.dtype) * self.point_embeddings[0].weight
        emb = emb + (lab == 1).to(emb.dtype) * self.point_embeddings[1].weight
        return emb

    def embed_boxes(self, boxes: Tensor, frame_hw: tuple[int, int]) -> Tensor:
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.points(corners, frame_hw)
        corner_emb = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], 0)
        return emb + corner_emb[None]

    def forward(self, grid_hw: tuple[int, int], points: tuple[Tensor, Tensor] | None = None,
                boxes: Tensor | None = None, masks: Tensor | None = None,
                batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(sparse (B, N, C), dense (B, C, h, w)) embeddings of the prompts for a grid of grid_hw cells
        (input frame 16 x the grid). With no prompt at all the batch size is `batch_size` (default 1)."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        frame = (h * PATCH, w * PATCH)
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = batch_size or 1
        ref = self.no_mask_embed.weight
        sparse = ref.new_zeros(bs, 0, self.embed_dim)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, boxes is None, frame)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes, frame)], 1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = ref.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


# ----------------------------------------------------------------------------------------------
# Two-way transformer and mask decoder
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections, optionally at a reduced inner width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError("num_heads must divide the inner width")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    """lin2(ReLU(lin1(x))) (the transformer blocks' MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self attention, token -> image cross attention, token MLP, image -> token cross attention,
    each followed by a residual sum and a LayerNorm (the first block's self attention has no positional
    term and no residual)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = TRANSFORMER_DEPTH, dim: int = EMBED_DIM, num_heads: int = NUM_HEADS,
                 mlp_dim: int = MLP_DIM, downsample: int = ATTENTION_DOWNSAMPLE) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, downsample, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image, image_pe (B, C, h, w); tokens (B, N, C) -> (tokens (B, N, C), image tokens (B, h*w, C))."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (checkpoint names `layers.<i>`)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder (checkpoint prefix `mask_decoder.`)."""

    def __init__(self, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(NUM_MASK_TOKENS))
        self.iou_prediction_head = MLP(dim, IOU_HEAD_HIDDEN, NUM_MASK_TOKENS, IOU_HEAD_DEPTH)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                multimask_output: bool = False, num_masks: int | None = None) -> tuple[Tensor, Tensor]:
        """image_embeddings (Bi, C, h, w), repeated to the prompt batch B (Bi = 1 or B); image_pe (1, C, h, w);
        sparse (B, N, C); dense (B or 1, C, h, w) -> (mask logits (B, M, 4h, 4w), IoU predictions (B, M)),
        M = 3 with `multimask_output` (masks 1-3), else 1 (mask 0). `num_masks` = k computes only the
        first k mask tokens' masks (training uses 1)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens[None].expand(b, -1, -1).to(sparse.dtype), sparse], 1)
        if image_embeddings.shape[0] != b:
            if image_embeddings.shape[0] != 1:
                raise ValueError(f"image batch {image_embeddings.shape[0]} does not match prompt batch {b}")
            image_embeddings = image_embeddings.expand(b, -1, -1, -1)
        src = image_embeddings + dense
        pos = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_pred = self.iou_prediction_head(hs[:, 0])
        first, last = (1, NUM_MASK_TOKENS) if multimask_output else (0, 1)
        if num_masks is not None:
            last = min(last, first + int(num_masks))
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(first, last)], 1)
        bu, cu, hu, wu = upscaled.shape
        masks = (hyper @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, -1, hu, wu)
        return masks, iou_pred[:, first:last]


# ----------------------------------------------------------------------------------------------
# The pair, as used with prompts and as a training head
# ----------------------------------------------------------------------------------------------
class SAMPromptDecoder(nn.Module):
    """prompt_encoder + mask_decoder. `forward(image_embeddings, points=None, boxes=None,
    multimask_output=False)`: image_embeddings (1 or B, 256, h, w); points = (coords (B, N, 2) as (x, y) in
    the input frame (16h x 16w, i.e. 1024 x 1024 for the official 64 x 64 grid), labels (B, N): 1 positive,
    0 negative); boxes (B, 4) as (x0, y0, x1, y1) in the same frame. Returns (low-res mask logits
    (B, M, 4h, 4w), IoU predictions (B, M)), exactly like the official prompt_encoder + mask_decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def forward(self, image_embeddings: Tensor, points: tuple[Tensor, Tensor] | None = None,
                boxes: Tensor | None = None, multimask_output: bool = False,
                masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        grid = tuple(image_embeddings.shape[-2:])
        sparse, dense = self.prompt_encoder(grid, points=points, boxes=boxes, masks=masks,
                                            batch_size=image_embeddings.shape[0])
        pe = self.prompt_encoder.dense_pe(grid)
        return self.mask_decoder(image_embeddings, pe, sparse.to(image_embeddings.dtype),
                                 dense.to(image_embeddings.dtype), multimask_output)


class SAMHead(SAMPromptDecoder):
    """The `train --head sam` head: the mask decoder run without prompts (no sparse tokens, the
    `no_mask_embed` dense embedding) on the neck embedding; its single mask (token 0), 4x the grid, is
    upsampled bilinearly to the input size. `forward(image, feats) -> {"foreground": logits (B,1,S,S)}`
    (the `nuclei_model` head interface; `image` only gives the output size)."""

    def forward_head(self, image: Tensor, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        emb = feats["neck"]
        grid = tuple(emb.shape[-2:])
        sparse, dense = self.prompt_encoder(grid, batch_size=emb.shape[0])
        pe = self.prompt_encoder.dense_pe(grid)
        low, _ = self.mask_decoder(emb, pe.to(emb.dtype), sparse.to(emb.dtype), dense.to(emb.dtype),
                                   multimask_output=False, num_masks=1)
        logits = F.interpolate(low, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return {"foreground": logits}

    def forward(self, image: Tensor, feats: Mapping[str, Tensor] | None = None,  # type: ignore[override]
                points: tuple[Tensor, Tensor] | None = None, boxes: Tensor | None = None,
                multimask_output: bool = False):
        """With `feats` (a mapping): the head interface; otherwise `image` is an image embedding and this is
        `SAMPromptDecoder.forward` (prompts on a trained head)."""
        if isinstance(feats, Mapping):
            return self.forward_head(image, feats)
        return super().forward(image, points=points, boxes=boxes, multimask_output=multimask_output)

    def untrained_modules(self) -> list[nn.Module]:
        """What the promptless single-mask loss cannot train: the prompt encoder (only its constant
        `no_mask_embed` is used, kept as loaded), the IoU head and the hypernetworks of masks 1-3."""
        return [self.prompt_encoder, self.mask_decoder.iou_prediction_head,
                *self.mask_decoder.output_hypernetworks_mlps[1:]]

    def freeze_untrained(self) -> None:
        """Freeze `untrained_modules` (they stay as loaded: pretrained, or the recorded random init)."""
        for module in self.untrained_modules():
            for p in module.parameters():
                p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Checkpoint reading
# ----------------------------------------------------------------------------------------------
def _shape(t: Any) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def decoder_state_from_checkpoint(state: Mapping[str, Tensor], module: nn.Module,
                                  source: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The `prompt_encoder.*` and `mask_decoder.*` entries of a full MobileSAM state dict for `module`
    (a SAMPromptDecoder), checked strictly: every key present with its shape, no unknown key under those
    prefixes. Raises UserError naming `source` and the key."""
    expected = module.state_dict()
    if not any(k.startswith(PREFIXES) for k in state):
        raise UserError(f"{source}: no 'prompt_encoder.*' / 'mask_decoder.*' keys; not a full MobileSAM "
                        f"checkpoint (first key: {next(iter(state), None)!r})")
    selected = {k: v for k, v in state.items() if k.startswith(PREFIXES)}
    for key, value in selected.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected key {key!r} {_shape(value)}; this decoder is SAM's prompt "
                            f"encoder + mask decoder (is the file a different SAM variant?)")
    for key, ref in expected.items():
        if key not in selected:
            raise UserError(f"{source}: missing key {key!r} (expected shape {_shape(ref)})")
        if tuple(selected[key].shape) != tuple(ref.shape):
            raise UserError(f"{source}: key {key!r} has shape {_shape(selected[key])}, expected {_shape(ref)}")
        if not selected[key].is_floating_point():
            raise UserError(f"{source}: key {key!r} has dtype {selected[key].dtype}, expected {ref.dtype}")
    return selected


def load_decoder_weights(module: nn.Module, checkpoint: str | Path | Mapping[str, Tensor],
                         source: str | Path | None = None) -> None:
    """Load the official prompt encoder + mask decoder weights (a file or a state dict) into `module`."""
    if isinstance(checkpoint, Mapping):
        state, name = checkpoint, source or "checkpoint"
    else:
        state, name = read_state_dict(checkpoint), Path(checkpoint)
    module.load_state_dict(decoder_state_from_checkpoint(state, module, name), strict=True)


def load_mobile_sam_decoder(checkpoint: str | Path | Mapping[str, Tensor] | None) -> SAMPromptDecoder:
    """MobileSAM's prompt encoder + mask decoder in eval mode, with the weights of the official
    `mobile_sam.pt` (path or state dict); None gives a random initialisation (logged as a warning)."""
    net = SAMPromptDecoder()
    if checkpoint is None:
        log.warning("MobileSAM mask decoder: no checkpoint given, the weights are RANDOM (not pretrained)")
    else:
        load_decoder_weights(net, checkpoint)
    return net.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "PromptEncoder", "MaskDecoder", "TwoWayTransformer", "SAMPromptDecoder", "SAMHead",
    "decoder_state_from_checkpoint", "load_decoder_weights", "load_mobile_sam_decoder", "count_parameters",
]
