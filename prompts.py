"""Prompt mode of `predict`: a nucleus mask from a point or a box, with MobileSAM's prompt encoder + mask decoder.

`python main.py predict --model_path M --input IMAGE --points points.csv [--boxes boxes.csv]
[--merge_into LABELS.tif]`, for correcting a result by hand: each prompt (one point, or one box) gives one
mask, written as one instance. M is either the official `mobile_sam.pt` (no training needed) or a model
trained with `--head sam` (its LoRA-adapted encoder and fine-tuned decoder).

Window. The image is cut into the same overlapping windows `predict` uses (`--tile_size`, `--overlap`); each
prompt goes to the window where it lies farthest from the window's edges (a box must fit inside one window).
The encoder runs once per window that holds a prompt, and the decoder once per prompt, batched.

Frame (what the network sees):
- official `mobile_sam.pt`: SAM's own convention. The window (default 1024 x 1024 image pixels, or the whole
  image when it is smaller) is resized so its longer side is 1024 (the toolkit's bilinear resize; aspect
  ratio kept), padded at the bottom/right to 1024 x 1024 with SAM's pixel mean (0 after normalisation), and
  encoded; prompt coordinates are scaled by the same factors. A point prompt asks for SAM's three candidate
  masks and keeps the one with the highest predicted IoU (SAM's advice for one ambiguous point); a box
  prompt uses the single-mask output.
- a `--head sam` model: its training convention. The window is the training tile (`tile_size` of its
  config, mirrored padding when the image is smaller, as in `predict`) resized to the input size; the
  single (trained) mask output is used for points and boxes.
The low-resolution mask logits are upsampled to the frame, cropped to the image content and upsampled to the
window (bilinear, as SAM's `postprocess_masks`), and thresholded at 0 (SAM's mask threshold). The mask is
kept as the decoder gives it (it may have several pieces).

Output: the masks become instances 1..N in prompt order (points first, then boxes); where masks overlap the
pixel goes to the prompt with the highest logit there. With `--merge_into LABELS.tif` (same height and width
as the image), they get new ids above the label map's largest id and overwrite it where they cover it
(overlaps resolved in favour of the prompt). Files, named after the image's stem: `<stem>_labels.tif`,
`<stem>.geojson`, `<stem>_nuclei.csv`, `<stem>_overlay.png` (as `predict`) and `<stem>_prompts.csv` (one row
per prompt: its id, area and predicted IoU, 0 / empty when it gave no mask).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

log = logging.getLogger(__name__)

SAM_FRAME = 1024            # the official input frame
DEFAULT_OFFICIAL_WINDOW = 1024  # image pixels per window with the official weights (1 px = 1 frame px)
DECODER_BATCH = 64          # prompts per decoder call


# ----------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------
def read_prompt_csv(path: str | Path, columns: int, what: str, option: str) -> tuple[np.ndarray, list[int]]:
    """Rows of `columns` numbers (comma or whitespace separated; an optional header row and `#` comments
    are skipped) -> (float64 array (N, columns), 1-based line number of each row)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    values, lines = [], []
    header_seen = False
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{option} {path}: cannot read ({type(e).__name__})") from None
    sample = text[:4096]
    delimiter = "," if "," in sample else None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        cells = ([c.strip() for c in next(csv.reader([stripped]))] if delimiter else stripped.split())
        cells = [c for c in cells if c != ""]
        try:
            row = [float(c) for c in cells]
        except ValueError:
            if not values and not header_seen:  # a header row such as "x,y"
                header_seen = True
                continue
            raise UserError(f"{option} {path}: line {number}: expected {what}, got {stripped!r}") from None
        if len(row) != columns or not all(math.isfinite(v) for v in row):
            raise UserError(f"{option} {path}: line {number}: expected {what} ({columns} numbers), got {stripped!r}")
        values.append(row)
        lines.append(number)
    if not values:
        raise UserError(f"{option} {path}: no prompts in the file (expected one row of {what} per prompt)")
    return np.asarray(values, dtype=np.float64), lines


def read_points(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """points.csv: one `x, y` row per prompt, image pixel coordinates (x to the right, y down)."""
    return read_prompt_csv(path, 2, "x, y", "--points")


def read_boxes(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """boxes.csv: one `x0, y0, x1, y1` row per prompt (top-left and bottom-right corners, image pixels)."""
    boxes, lines = read_prompt_csv(path, 4, "x0, y0, x1, y1", "--boxes")
    for box, line in zip(boxes, lines):
        if box[2] < box[0] or box[3] < box[1]:
            raise UserError(f"--boxes {path}: line {line}: box ({_num(box[0])}, {_num(box[1])}, {_num(box[2])}, "
                            f"{_num(box[3])}) has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)")
    return boxes, lines


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def check_inside(coords: np.ndarray, lines: Sequence[int], shape: tuple[int, int], source: str) -> None:
    """Every (x, y) pair of every row must lie in the image: 0 <= x < width, 0 <= y < height."""
    height, width = shape
    for row, line in zip(coords, lines):
        xs, ys = row[0::2], row[1::2]
        if (xs < 0).any() or (xs >= width).any() or (ys < 0).any() or (ys >= height).any():
            what = "point" if len(row) == 2 else "box"
            raise UserError(f"{source}: line {line}: {what} ({', '.join(_num(v) for v in row)}) lies outside the "
                            f"image ({width} x {height} pixels: 0 <= x < {width}, 0 <= y < {height})")


# ----------------------------------------------------------------------------------------------
# The network behind the prompts
# ----------------------------------------------------------------------------------------------
class PromptNet:
    """Image encoder + prompt decoder and the frame convention of one model source.

    `official=True`: the official MobileSAM checkpoint (SAM's longest-side-1024 convention, point prompts
    with three candidates); else a `--head sam` model (square resize to its input size, single mask)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, frame: int, official: bool, window: int,
                 device: torch.device, scale: float | None = None) -> None:
        self.encoder = encoder.to(device).eval()
        self.decoder = decoder.to(device).eval()
        self.frame = int(frame)
        self.official = official
        self.window = int(window)
        self.device = device
        # a trained model: network pixels per image pixel (its input size / training tile, as in predict), so a
        # --tile_size other than the training tile changes the window, never the magnification
        self.scale = scale

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the window's image inside the frame."""
        if not self.official:
            return int(height * self.scale + 0.5), int(width * self.scale + 0.5)
        scale = self.frame / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    @torch.no_grad()
    def embed(self, window: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (h, w, 3) window -> (embedding (1, 256, F/16, F/16), content size in the frame)."""
        import dataset
        import model as mobile_sam

        h, w = window.shape[:2]
        ch, cw = self.content_size(h, w)
        resized = dataset.resize_image(window, (ch, cw))
        x = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1)[None].float()
        if (ch, cw) != (self.frame, self.frame):  # pad with the pixel mean: zero after normalisation
            mean = torch.tensor(mobile_sam.SAM_PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
            canvas = mean.expand(1, 3, self.frame, self.frame).clone()
            canvas[:, :, :ch, :cw] = x
            x = canvas
        return self.encoder(mobile_sam.normalize_image(x)), (ch, cw)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, points: np.ndarray | None, boxes: np.ndarray | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame coordinates -> (low-res logits (B, 1, F/4, F/4), predicted IoU (B,)) of the chosen mask."""
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=self.device)
            masks, iou = self.decoder(embedding, points=(coords, labels), multimask_output=self.official)
        else:
            masks, iou = self.decoder(embedding, boxes=torch.as_tensor(boxes, dtype=torch.float32,
                                                                         device=self.device))
        best = iou.argmax(1)
        index = torch.arange(masks.shape[0], device=masks.device)
        return masks[index, best][:, None], iou[index, best]


def load_prompt_net(model_path: str | Path, device: torch.device, pretrained: str | None = None,
                    tile_size: int | None = None) -> PromptNet:
    """The official `mobile_sam.pt` (a plain state dict) or a `--head sam` checkpoint / CV folder."""
    import model as mobile_sam
    import inference
    import nuclei_model
    import sam_decoder

    path = Path(model_path)
    ckpt_path = path / "best_model.pth" if path.is_dir() else path
    if not ckpt_path.is_file():
        raise UserError(f"--model_path {path}: not found")
    try:
        raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / foreign file
        raise UserError(f"--model_path {ckpt_path}: not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(raw, dict) and raw.get("format") in (nuclei_model.CHECKPOINT_FORMAT, nuclei_model.MODEL_SET_FORMAT):
        model_set = nuclei_model.load_model_set(path, device, pretrained=pretrained)
        if model_set.head != "sam":
            raise UserError(f"--model_path {path}: a --head {model_set.head} model has no prompt decoder; prompts "
                            f"need the official mobile_sam.pt or a model trained with --head sam")
        net = nuclei_model.prepare_for_inference(inference.select_models(model_set, ensemble=False)[0])
        window = tile_size or inference.model_tile_size(model_set)
        scale = inference.network_scale(model_set)
        frame = nuclei_model.network_size(window, scale)[1]
        return PromptNet(net.encoder, net.head, frame, False, window, device, scale=scale)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"--model_path {ckpt_path}: neither the official mobile_sam.pt nor a checkpoint of this "
                        f"toolkit")
    encoder = mobile_sam.MobileSAMEncoder()
    encoder.load_state_dict(mobile_sam.encoder_state_from_checkpoint(raw, encoder, source=ckpt_path), strict=True)
    encoder.eval()
    mobile_sam.fuse_batchnorm(encoder)
    decoder = sam_decoder.SAMPromptDecoder()
    sam_decoder.load_decoder_weights(decoder, raw, source=ckpt_path)
    return PromptNet(encoder, decoder, SAM_FRAME, True, tile_size or DEFAULT_OFFICIAL_WINDOW, device)


# ----------------------------------------------------------------------------------------------
# Prompts -> masks
# ----------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    kind: str                 # "point" or "box"
    coords: np.ndarray        # (2,) x, y or (4,) x0, y0, x1, y1, image pixels
    source: str               # "<file>:<line>"


@dataclass
class PromptMask:
    prompt: Prompt
    window: tuple[int, int, int, int]   # y0, x0, height, width of the window in the image
    origin: tuple[int, int]             # y, x of `mask` / `logits` in the image
    mask: np.ndarray                    # bool, the mask's bounding box (empty (0, 0) when no pixel is set)
    logits: np.ndarray                  # float32 logits over the same box
    iou: float                          # the decoder's IoU prediction

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def choose_window(extent: Sequence[float], starts_y: Sequence[int], starts_x: Sequence[int], size_y: int,
                  size_x: int) -> tuple[int, int] | None:
    """The window start (y0, x0) in which `extent` (x0, y0, x1, y1) lies farthest from the edges, or None
    when it fits in no window."""
    ex0, ey0, ex1, ey1 = extent
    best, best_margin = None, -1.0
    for y in starts_y:
        for x in starts_x:
            margin = min(ex0 - x, ey0 - y, x + size_x - 1 - ex1, y + size_y - 1 - ey1)
            if margin >= 0 and margin > best_margin:
                best, best_margin = (y, x), margin
    return best


def segment_prompts(net: PromptNet, image: np.ndarray, prompts: Sequence[Prompt], overlap: int | None = None,
                    progress: bool = False) -> Iterator[PromptMask]:
    """One PromptMask per prompt (grouped by window, in prompt order inside a window)."""
    from tqdm import tqdm

    import inference

    height, width = image.shape[:2]
    size = net.window
    if net.official:  # SAM's convention: a smaller image is its own window (no padding to a tile)
        win_h, win_w, padded = min(size, height), min(size, width), image
    else:  # the training convention: always a full tile, mirrored padding as in predict
        win_h = win_w = size
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric") if pad_h or pad_w else image
    overlap = size // 4 if overlap is None else int(overlap)
    starts_y = inference.tile_starts(padded.shape[0], win_h, overlap)
    starts_x = inference.tile_starts(padded.shape[1], win_w, overlap)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        extent = (p.coords[0], p.coords[1], p.coords[0], p.coords[1]) if p.kind == "point" else tuple(p.coords)
        start = choose_window(extent, starts_y, starts_x, win_h, win_w)
        if start is None:
            raise UserError(f"{p.source}: box ({', '.join(_num(v) for v in p.coords)}) is larger than a window "
                            f"({win_w} x {win_h} pixels); pass a larger --tile_size")
        groups.setdefault(start, []).append(i)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", leave=False, disable=not progress)
    for (y0, x0), members in groups.items():
        window = np.ascontiguousarray(padded[y0:y0 + win_h, x0:x0 + win_w])
        embedding, (ch, cw) = net.embed(window)
        sy, sx = ch / win_h, cw / win_w
        for kind in ("point", "box"):
            idx = [i for i in members if prompts[i].kind == kind]
            for first in range(0, len(idx), DECODER_BATCH):
                chunk = idx[first:first + DECODER_BATCH]
                coords = np.stack([prompts[i].coords for i in chunk]).astype(np.float64)
                coords[:, 0::2] = (coords[:, 0::2] - x0) * sx
                coords[:, 1::2] = (coords[:, 1::2] - y0) * sy
                low, iou = net.decode(embedding, coords if kind == "point" else None,
                                      coords if kind == "box" else None)
                logits = F.interpolate(low.float(), size=(net.frame, net.frame), mode="bilinear", align_corners=False)
                logits = logits[..., :ch, :cw]
                logits = F.interpolate(logits, size=(win_h, win_w), mode="bilinear", align_corners=False)
                # the part of the window inside the image (a padded tile may reach past it)
                logits = logits[:, 0, :max(0, min(win_h, height - y0)), :max(0, min(win_w, width - x0))]
                for j, i in enumerate(chunk):
                    yield _crop(prompts[i], (y0, x0, win_h, win_w), logits[j].cpu().numpy(), float(iou[j]))
                bar.update(len(chunk))
    bar.close()


def _crop(prompt: Prompt, window: tuple[int, int, int, int], logits: np.ndarray, iou: float) -> PromptMask:
    mask = logits > 0.0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, x0 = window[0], window[1]
    if rows.size == 0:
        empty = np.zeros((0, 0), dtype=bool)
        return PromptMask(prompt, window, (y0, x0), empty, empty.astype(np.float32), iou)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return PromptMask(prompt, window, (y0 + int(r0), x0 + int(c0)), mask[r0:r1, c0:c1].copy(),
                      logits[r0:r1, c0:c1].astype(np.float32), iou)


def compose(masks: Sequence[PromptMask] | Iterator[PromptMask], shape: tuple[int, int],
            base: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[PromptMask, int]]]:
    """Instance labels (uint32) of the prompt masks: ids 1..N in order (above `base.max()` when merging into
    `base`), the highest logit winning where masks overlap, prompts winning over `base`. Returns (labels,
    [(mask, id or 0 when empty)])."""
    offset = int(base.max()) if base is not None and base.size else 0
    prompt_ids = np.zeros(shape, dtype=np.uint32)
    best = np.full(shape, -np.inf, dtype=np.float32)
    assigned = []
    next_id = offset
    for pm in masks:
        if pm.area == 0:
            assigned.append((pm, 0))
            continue
        next_id += 1
        y, x = pm.origin
        h, w = pm.mask.shape
        region = (slice(y, y + h), slice(x, x + w))
        wins = pm.mask & (pm.logits > best[region])
        prompt_ids[region][wins] = next_id
        best[region][wins] = pm.logits[wins]
        assigned.append((pm, next_id))
    if base is None:
        return prompt_ids, assigned
    merged = np.asarray(base).astype(np.uint32, copy=True)
    merged[prompt_ids > 0] = prompt_ids[prompt_ids > 0]
    return merged, assigned


def read_merge_labels(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--merge_into {path}: file not found")
    try:
        import tifffile

        labels = np.asarray(tifffile.imread(path))
    except Exception as e:  # any decoder error
        raise UserError(f"--merge_into {path}: cannot read a label TIFF ({type(e).__name__})") from None
    labels = np.squeeze(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "uib":
        raise UserError(f"--merge_into {path}: expected a 2-D integer label map, got {labels.dtype} {labels.shape}")
    if labels.shape != tuple(shape):
        raise UserError(f"--merge_into {path}: label map is {labels.shape[1]} x {labels.shape[0]} pixels, the image "
                        f"{shape[1]} x {shape[0]}")
    if labels.dtype.kind == "i" and labels.min(initial=0) < 0:
        raise UserError(f"--merge_into {path}: negative label ids")
    return labels


# ----------------------------------------------------------------------------------------------
# Prompt files (read by the prompt mode of predict: `predict.run_prompts`)
# ----------------------------------------------------------------------------------------------
def load_prompts(points_path: str | None, boxes_path: str | None, shape: tuple[int, int]) -> list[Prompt]:
    prompts: list[Prompt] = []
    if points_path:
        points, lines = read_points(points_path)
        check_inside(points, lines, shape, f"--points {points_path}")
        prompts += [Prompt("point", p, f"{points_path}:{n}") for p, n in zip(points, lines)]
    if boxes_path:
        boxes, lines = read_boxes(boxes_path)
        check_inside(boxes, lines, shape, f"--boxes {boxes_path}")
        prompts += [Prompt("box", b, f"{boxes_path}:{n}") for b, n in zip(boxes, lines)]
    return prompts


__all__ = ["read_points", "read_boxes", "check_inside", "PromptNet", "load_prompt_net", "Prompt", "PromptMask",
           "segment_prompts", "compose", "read_merge_labels", "load_prompts", "choose_window"]
