"""LoRA adapters for the linear layers of the encoder's transformer blocks, and trainable-parameter control.

LoRA (low-rank adaptation) keeps a pretrained linear layer W frozen and learns a low-rank update:
y = W x + b + (alpha / rank) * B A dropout(x), with A (rank x in) and B (out x rank). B starts at zero, so a
freshly wrapped model computes exactly what it computed before. After training the update can be merged
into W (`merge_lora`) so inference costs nothing extra.

Which layers: every transformer block of the encoder (a module with an `attn` child holding `qkv` and
`proj` linears, and an `mlp` child holding `fc1`/`fc2`). TinyViT's `qkv` output is laid out per head
([q, k, v] of head 0, then head 1, ...), so the adapter wraps the whole qkv projection.

Also here: `mark_trainable` (freeze all but LoRA and chosen heads), `parameter_report`, `lora_state_dict`
and `freeze_frozen_batchnorm` (BatchNorm layers whose parameters are frozen keep their running statistics
while the rest of the model trains).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import UserError

log = logging.getLogger(__name__)

ATTENTION_TARGETS = ("qkv", "proj")
MLP_TARGETS = ("fc1", "fc2")
VALID_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRALinear(nn.Module):
    """`base(x) + (alpha / rank) * lora_B(lora_A(dropout(x)))` around a frozen-or-not `nn.Linear`.

    Parameters `lora_A` (rank, in_features; Kaiming-uniform) and `lora_B` (out_features, rank; zeros).
    The wrapped layer stays under `base.` (`base.weight`, `base.bias`) in the state dict.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise UserError(f"LoRA rank {rank}: must be an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout {dropout}: must be in [0, 1)")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + (alpha / rank) * B A, in the base weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _transformer_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with an `attn` child holding `qkv` and `proj`, and an `mlp` child (TinyViT blocks)."""
    blocks = []
    for name, m in module.named_modules():
        attn = getattr(m, "attn", None)
        if isinstance(attn, nn.Module) and hasattr(attn, "qkv") and hasattr(attn, "proj") \
                and isinstance(getattr(m, "mlp", None), nn.Module):
            blocks.append((name, m))
    return blocks


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str] = ATTENTION_TARGETS,
               dropout: float = 0.0) -> int:
    """Wrap the chosen linears (`qkv`, `proj` of the attention; `fc1`, `fc2` of the MLP) of every
    transformer block in `LoRALinear`. Layers already wrapped are left alone. Returns how many were wrapped."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown or not targets:
        raise UserError(f"LoRA targets {','.join(targets) or '(empty)'}: unknown target "
                        f"{unknown[0] if unknown else '(none given)'!r}; valid: {', '.join(VALID_TARGETS)}")
    if int(rank) != rank or rank < 1:
        raise UserError(f"LoRA rank {rank}: must be an integer >= 1")
    wrapped = 0
    for _, block in _transformer_blocks(module):
        for target in targets:
            parent = block.attn if target in ATTENTION_TARGETS else block.mlp
            layer = getattr(parent, target, None)
            if isinstance(layer, nn.Linear):
                setattr(parent, target, LoRALinear(layer, int(rank), alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        log.warning("apply_lora: no layer wrapped (targets %s; no unwrapped transformer-block linears found)",
                    ",".join(targets))
    else:
        log.info("LoRA: wrapped %d linear layers (targets %s, rank %d, alpha %g)",
                 wrapped, ",".join(targets), rank, alpha)
    return wrapped


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Replace every `LoRALinear` by a plain `nn.Linear` holding the merged weight. Returns the count."""
    merged = 0
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            if isinstance(sub, LoRALinear):
                base = sub.base
                linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                   device=base.weight.device, dtype=base.weight.dtype)
                linear.weight.copy_(sub.merged_weight())
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
                linear.weight.requires_grad_(base.weight.requires_grad)
                if linear.bias is not None:
                    linear.bias.requires_grad_(base.bias.requires_grad)
                setattr(child, child_name, linear)
                merged += 1
    return merged


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (names containing `lora`), detached, as in `module.state_dict()`."""
    return {k: v for k, v in module.state_dict().items() if "lora" in k}


def mark_trainable(model: nn.Module, train_only_lora: bool, always_trainable: Sequence[str] = ()) -> None:
    """With `train_only_lora`, only parameters whose name contains `lora` or starts with one of the
    `always_trainable` prefixes (e.g. "head.") require grad; otherwise every parameter does."""
    if isinstance(always_trainable, str):
        always_trainable = (always_trainable,)
    prefixes = tuple(always_trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(not train_only_lora or "lora" in name or (bool(prefixes) and name.startswith(prefixes)))


def parameter_report(model: nn.Module) -> dict:
    """{"total": parameters, "trainable": those requiring grad, "percent": 100 * trainable / total}."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable),
            "percent": 100.0 * trainable / total if total else 0.0}


def freeze_frozen_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm whose affine parameters are all frozen into eval mode, so training does not
    change its running statistics. Call after every `model.train()`. BatchNorm layers without affine
    parameters are left as they are. Returns how many were put into eval mode."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
                count += 1
    return count


__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_state_dict", "mark_trainable", "parameter_report",
           "freeze_frozen_batchnorm", "VALID_TARGETS"]
