"""Pictures of segmentations: contours, instance fills, error colouring, multi-panel figures and plots.

Image helpers take and return `uint8` RGB arrays `(H, W, 3)` and never modify their input:

- `draw_contours(image, labels, color, thickness)` draws the boundary of every instance.
- `overlay_instances(image, labels, alpha)` fills every instance with its own colour (the colour depends
  only on the id, so the same nucleus keeps its colour between pictures).
- `classify_errors(true, pred)` sorts the mistakes of a prediction into missed, false positive, split
  and merged nuclei; `error_overlay(image, true, pred, zoom_factor=...)` paints them (see `ERROR_COLORS`:
  colours outside the H&E hues) with the true and predicted contours on top, on a picture enlarged by
  `overlay_zoom` for small images, and `add_legend(image, entries)` appends a colour key below a picture.
- `save_png(path, image)` writes a PNG atomically; `figure_panels(panels, path)` writes a row of titled
  panels as one matplotlib figure.
- `plot_tissue_bars`, `plot_distributions`, `plot_learning_curves` write the evaluation plots.
- `slide_overview` / `save_slide_overview` draw a whole slide: thumbnail, tissue outline and a heat map of
  nuclei per mm² (`nuclei_density`) with its colour bar.

Matplotlib is used through its object API with the Agg canvas only (no pyplot state, no display needed),
so these functions are safe to call from worker processes and threads.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

import utils

# Colours (RGB) used by `error_overlay` / `error_contours`; the legend shows these names. H&E itself fills the
# purple-pink-magenta hues (haematoxylin ~(90, 60, 140), hue 262 deg; eosin ~(230, 150, 190), hue 330 deg), so
# every colour here lies outside HE_HUE_BAND and at CIE76 Delta E >= 50 from both stains (checked by
# tests/test_visualize.py): five are the Okabe-Ito colour-blind-safe palette (Okabe & Ito 2008) without its
# reddish purple (Delta E 11 from eosin), blue (37 from haematoxylin) and black (dark nuclei); merged is cyan.
# Delta E (eosin, haematoxylin): yellow 99/136, bluish green 85/97, vermillion 74/106, sky blue 55/58,
# orange 85/122, cyan 86/102 (the former magenta merged colour: hue 300, inside the H&E band).
HE_EOSIN, HE_HAEMATOXYLIN = (230, 150, 190), (90, 60, 140)
HE_HUE_BAND = (250.0, 345.0)           # hue degrees (HSV) from haematoxylin purple to eosin pink
TRUE_CONTOUR_COLOR = (240, 228, 66)    # ground-truth outlines: yellow (Okabe-Ito)
PRED_CONTOUR_COLOR = (0, 158, 115)     # predicted outlines: bluish green (Okabe-Ito)
ERROR_COLORS: dict[str, tuple[int, int, int]] = {
    "missed": (213, 94, 0),            # true nucleus without a matching prediction: vermillion (Okabe-Ito)
    "false_positive": (86, 180, 233),  # prediction without a matching true nucleus: sky blue (Okabe-Ito)
    "split": (230, 159, 0),            # true nucleus cut into >= 2 predictions: orange (Okabe-Ito)
    "merged": (0, 255, 255),           # prediction covering >= 2 true nuclei: cyan
}
ERROR_COLOR_NAMES = {"missed": "vermillion", "false_positive": "sky blue", "split": "orange", "merged": "cyan"}
# Error overlays of small images are enlarged (nearest neighbour) before their 1-pixel outlines are drawn, so
# an outline is a fraction of a nucleus wide: `overlay_zoom` picks the factor that brings the long side to
# about OVERLAY_TARGET_SIDE pixels (256 px -> 4x, 512 px -> 2x, 1000 px -> 1x), at most OVERLAY_MAX_ZOOM.
OVERLAY_TARGET_SIDE = 1024
OVERLAY_MAX_ZOOM = 4
ERROR_LABELS = {
    "missed": "missed (false negative)",
    "false_positive": "false positive",
    "split": "split (1 true -> >=2 pred)",
    "merged": "merged (>=2 true -> 1 pred)",
}

METRIC_LABELS = {"pq": "PQ", "sq": "SQ", "rq": "RQ", "aji": "AJI", "aji_plus": "AJI+", "dice": "Dice",
                 "iou": "IoU", "f1": "F1", "precision": "precision", "recall": "recall"}

MATCH_IOU = 0.5          # a true/predicted pair with IoU above this is a correct detection (as for PQ)
PART_OF_FRACTION = 0.5   # a nucleus "lies inside" another when this fraction of its own area overlaps it
MIN_PIECE_FRACTION = 0.1  # ... and the piece covers at least this fraction of the larger one


# ----------------------------------------------------------------------------------------------
# Basic drawing
# ----------------------------------------------------------------------------------------------
def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        if image.dtype.kind == "f" and image.size and float(np.nanmax(image)) <= 1.0:
            image = image * 255.0
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def _check_labels(labels: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {labels.shape}")
    if image is not None and labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} and image {image.shape[:2]} differ in size")
    return labels


def boundaries(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean mask of the instance boundaries (inner pixels of each instance), `thickness` pixels wide."""
    labels = _check_labels(labels)
    mask = find_boundaries(labels, connectivity=1, mode="inner", background=0)
    if thickness > 1:
        mask = ndimage.binary_dilation(mask, iterations=thickness - 1) & (labels > 0)
    return mask


def draw_contours(image: np.ndarray, labels: np.ndarray, color: Sequence[int] = (0, 255, 0),
                  thickness: int = 1) -> np.ndarray:
    """A copy of `image` (uint8 RGB) with the outline of every instance of `labels` drawn in `color`."""
    out = _check_image(image).copy()
    labels = _check_labels(labels, out)
    out[boundaries(labels, thickness)] = np.asarray(color, dtype=np.uint8)
    return out


def instance_colors(ids: np.ndarray) -> np.ndarray:
    """A bright pseudo-random RGB colour (uint8, (N, 3)) for every id; depends only on the id."""
    x = np.asarray(ids, dtype=np.uint64).ravel() + np.uint64(0x9E3779B97F4A7C15)
    # splitmix64 finaliser: a fixed, well-mixed hash of the id
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    channels = [(x >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(3)]
    rgb = np.stack(channels, axis=1).astype(np.float64)
    return (60 + rgb * (195 / 255)).astype(np.uint8)   # keep away from black


def overlay_instances(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """`image` with every instance filled in its own colour (blended with weight `alpha`), outlines opaque."""
    out = _check_image(image).copy()
    labels = _check_labels(labels, out)
    fg = labels > 0
    if not fg.any():
        return out
    ids, inverse = np.unique(labels[fg], return_inverse=True)
    colors = instance_colors(ids)[inverse.ravel()].astype(np.float32)
    blended = (1.0 - alpha) * out[fg].astype(np.float32) + alpha * colors
    out[fg] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    edge = boundaries(labels)
    edge_ids = np.searchsorted(ids, labels[edge])
    out[edge] = instance_colors(ids)[edge_ids]
    return out


# ----------------------------------------------------------------------------------------------
# Error classification
# ----------------------------------------------------------------------------------------------
def _overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """(true ids, pred ids, intersection matrix, true areas, pred areas) from one joint histogram."""
    t_ids, t_idx = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_idx = np.unique(pred.ravel(), return_inverse=True)
    t_idx = t_idx.ravel().astype(np.int64)
    p_idx = p_idx.ravel().astype(np.int64)
    # make index 0 the background whether or not the map has background pixels
    if t_ids.size == 0 or t_ids[0] != 0:
        t_ids = np.concatenate([[0], t_ids]).astype(t_ids.dtype if t_ids.size else np.int64)
        t_idx += 1
    if p_ids.size == 0 or p_ids[0] != 0:
        p_ids = np.concatenate([[0], p_ids]).astype(p_ids.dtype if p_ids.size else np.int64)
        p_idx += 1
    nt, np_ = t_ids.size, p_ids.size
    joint = np.bincount(t_idx * np_ + p_idx, minlength=nt * np_).reshape(nt, np_)
    area_t = joint[1:, :].sum(axis=1)
    area_p = joint[:, 1:].sum(axis=0)
    return t_ids[1:], p_ids[1:], joint[1:, 1:], area_t, area_p


def classify_errors(true: np.ndarray, pred: np.ndarray) -> dict[str, list[int]]:
    """Sort the mistakes of the instance map `pred` against the ground truth `true`.

    Returns lists of ids (each sorted):

    - ``"matched_true"`` / ``"matched_pred"``: pairs with IoU > 0.5 (the PQ true positives);
    - ``"split"`` (true ids): a true nucleus with at least two predictions lying mostly inside it
      (>= 50% of the prediction's area) that each cover at least 10% of it;
    - ``"merged"`` (pred ids): a prediction that covers most (>= 50%) of at least two true nuclei;
    - ``"missed"`` (true ids): true nuclei neither matched nor split nor part of a merge;
    - ``"false_positive"`` (pred ids): predictions neither matched nor a piece of a split nor a merge.

    A split nucleus may also be "matched" when one of its pieces has IoU > 0.5 with it; the other lists
    are disjoint, so every unmatched nucleus is coloured by exactly one error type.
    """
    true = _check_labels(true)
    pred = _check_labels(pred)
    if true.shape != pred.shape:
        raise ValueError(f"ground truth {true.shape} and prediction {pred.shape} differ in size")
    t_ids, p_ids, inter, area_t, area_p = _overlaps(true, pred)
    result: dict[str, list[int]] = {k: [] for k in
                                    ("matched_true", "matched_pred", "missed", "false_positive", "split", "merged")}
    if t_ids.size == 0 or p_ids.size == 0:
        result["missed"] = [int(i) for i in t_ids]
        result["false_positive"] = [int(i) for i in p_ids]
        return result
    inter = inter.astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matched = iou > MATCH_IOU
    t_matched = matched.any(axis=1)
    p_matched = matched.any(axis=0)

    # split: predictions lying mostly inside one true nucleus, each covering a real part of it
    piece = (inter >= PART_OF_FRACTION * area_p[None, :]) & (inter >= MIN_PIECE_FRACTION * area_t[:, None])
    t_split = piece.sum(axis=1) >= 2
    p_in_split = (piece & t_split[:, None]).any(axis=0)
    # merge: true nuclei mostly covered by one prediction, at least two of them
    covered = (inter >= PART_OF_FRACTION * area_t[:, None]) & (inter >= MIN_PIECE_FRACTION * area_p[None, :])
    p_merged = covered.sum(axis=0) >= 2
    t_in_merge = (covered & p_merged[None, :]).any(axis=1)

    result["matched_true"] = [int(i) for i in t_ids[t_matched]]
    result["matched_pred"] = [int(i) for i in p_ids[p_matched]]
    result["split"] = [int(i) for i in t_ids[t_split]]
    result["merged"] = [int(i) for i in p_ids[p_merged]]
    result["missed"] = [int(i) for i in t_ids[~t_matched & ~t_split & ~t_in_merge]]
    result["false_positive"] = [int(i) for i in p_ids[~p_matched & ~p_in_split & ~p_merged]]
    return result


def overlay_zoom(shape: Sequence[int]) -> int:
    """Enlargement of an error overlay for an image of `shape` (H, W, ...): the largest integer that keeps the
    long side at most OVERLAY_TARGET_SIDE (at least 1, at most OVERLAY_MAX_ZOOM)."""
    side = max(int(shape[0]), int(shape[1]), 1)
    return int(max(1, min(OVERLAY_MAX_ZOOM, OVERLAY_TARGET_SIDE // side)))


def error_overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, alpha: float = 0.6,
                  legend: bool = False, zoom_factor: int = 1) -> tuple[np.ndarray, dict[str, int]]:
    """The image with the segmentation errors of `pred` painted in and both sets of contours drawn.

    Missed true nuclei are filled vermillion, false-positive predictions sky blue, split true nuclei orange
    and merged predictions cyan (`ERROR_COLORS`); ground-truth outlines are yellow, predicted outlines
    bluish green. The fills are blended with weight `alpha` (0.6: over a dark nucleus the closest two,
    vermillion and orange, stay about CIE76 Delta E 23 apart, against 19 at 0.45). The picture is enlarged
    `zoom_factor` times (nearest neighbour, `zoom`) before the outlines are drawn, max(1, zoom_factor // 2)
    pixels wide, so they stay a fraction of a source pixel on crowded tiles (`overlay_zoom` chooses it). With
    `legend=True` a colour key is appended below the picture. Returns the picture and the number of nuclei
    in each category: ``{"matched", "missed", "false_positive", "split", "merged", "num_true", "num_pred"}``.
    """
    out = _check_image(image)
    true = _check_labels(true, out)
    pred = _check_labels(pred, out)
    errors = classify_errors(true, pred)
    factor = max(1, int(zoom_factor))
    out, true, pred = zoom(out, factor).copy(), zoom(true, factor), zoom(pred, factor)
    fill = np.zeros(out.shape[:2], dtype=bool)
    colour_map = np.zeros(out.shape, dtype=np.float32)
    # predictions first, so true nuclei missed under a large false-positive blob stay visible
    for kind, labels in (("false_positive", pred), ("merged", pred), ("missed", true), ("split", true)):
        ids = errors[kind]
        if not ids:
            continue
        mask = np.isin(labels, ids)
        colour_map[mask] = ERROR_COLORS[kind]
        fill |= mask
    if fill.any():
        blended = (1.0 - alpha) * out[fill].astype(np.float32) + alpha * colour_map[fill]
        out[fill] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    line = max(1, factor // 2)   # a quarter to a half of a source pixel wide
    out[boundaries(true, line)] = TRUE_CONTOUR_COLOR
    out[boundaries(pred, line)] = PRED_CONTOUR_COLOR
    counts = {
        "matched": len(errors["matched_true"]),
        "missed": len(errors["missed"]),
        "false_positive": len(errors["false_positive"]),
        "split": len(errors["split"]),
        "merged": len(errors["merged"]),
        "num_true": int(len(np.unique(true[true > 0]))),
        "num_pred": int(len(np.unique(pred[pred > 0]))),
    }
    if legend:
        out = add_legend(out, error_legend_entries(counts))
    return out, counts


def zoom(array: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel repeated `factor` x `factor` times (images and label maps alike)."""
    if factor <= 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def error_contours(image: np.ndarray, true: np.ndarray, pred: np.ndarray, zoom_factor: int = 2,
                   thickness: int = 2) -> tuple[np.ndarray, dict[str, int]]:
    """The errors of `pred` drawn as outlines, readable on crowded tiles (hundreds of nuclei in 256 px):
    the picture is enlarged `zoom_factor` times (nearest neighbour) so outlines are thinner than a nucleus,
    matched nuclei get a thin predicted outline (`PRED_CONTOUR_COLOR`), and each error nucleus a
    `thickness`-pixel outline in its `ERROR_COLORS` colour (missed and split: the true nucleus; false
    positive and merged: the prediction). Nothing is filled, so the tissue stays visible inside every
    nucleus. Returns the picture and the counts of `error_overlay`."""
    base = _check_image(image)
    true = _check_labels(true, base)
    pred = _check_labels(pred, base)
    errors = classify_errors(true, pred)
    out = zoom(base, zoom_factor).copy()
    true_z, pred_z = zoom(true, zoom_factor), zoom(pred, zoom_factor)
    matched = np.isin(pred_z, errors["matched_pred"]) if errors.get("matched_pred") else np.zeros_like(pred_z, bool)
    out[boundaries(np.where(matched, pred_z, 0))] = PRED_CONTOUR_COLOR
    for kind, labels in (("false_positive", pred_z), ("merged", pred_z), ("missed", true_z), ("split", true_z)):
        if errors[kind]:
            out[boundaries(np.where(np.isin(labels, errors[kind]), labels, 0), thickness)] = ERROR_COLORS[kind]
    counts = {
        "matched": len(errors["matched_true"]), "missed": len(errors["missed"]),
        "false_positive": len(errors["false_positive"]), "split": len(errors["split"]),
        "merged": len(errors["merged"]), "num_true": int(len(np.unique(true[true > 0]))),
        "num_pred": int(len(np.unique(pred[pred > 0]))),
    }
    return out, counts


def error_contour_legend(counts: Mapping[str, int] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, colour) pairs describing `error_contours`' outlines, with the counts when given."""
    def text(key: str, label: str) -> str:
        return f"{label}: {counts[key]}" if counts is not None and key in counts else label
    return ([(text("matched", "matched (predicted outline)"), PRED_CONTOUR_COLOR)]
            + [(text(k, ERROR_LABELS[k]), ERROR_COLORS[k]) for k in ERROR_COLORS])


def error_legend_entries(counts: Mapping[str, int] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, colour) pairs describing `error_overlay`'s colours, with the counts when given."""
    def text(key: str, label: str) -> str:
        return f"{label}: {counts[key]}" if counts is not None and key in counts else label
    entries = [(text("num_true", "true contour"), TRUE_CONTOUR_COLOR),
               (text("num_pred", "predicted contour"), PRED_CONTOUR_COLOR)]
    entries += [(text(k, ERROR_LABELS[k]), ERROR_COLORS[k]) for k in ERROR_COLORS]
    return entries


def add_legend(image: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]],
               min_width: int = 360) -> np.ndarray:
    """`image` with a white strip below it holding a colour square and a text for each entry.

    The picture is widened (white on the right) to at least `min_width` pixels so the text of the legend
    stays readable below small images; the image itself is never scaled.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = _check_image(image)
    h, w = image.shape[:2]
    font = ImageFont.load_default()
    line_h, box, pad = 14, 10, 4
    # lay the entries out left to right, wrapping to new lines as needed
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [int(math.ceil(probe.textlength(text, font=font))) + box + 3 * pad for text, _ in entries]
    canvas_w = max(w, int(min_width), max(widths, default=0) + 2 * pad)
    positions, x, y = [], pad, pad
    for width in widths:
        if x > pad and x + width > canvas_w:
            x, y = pad, y + line_h
        positions.append((x, y))
        x += width
    strip_h = y + line_h + pad
    canvas = Image.new("RGB", (canvas_w, h + strip_h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (text, color), (x, y) in zip(entries, positions):
        top = h + y + (line_h - box) // 2
        draw.rectangle([x, top, x + box, top + box], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((x + box + pad, h + y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


# ----------------------------------------------------------------------------------------------
# Files and figures
# ----------------------------------------------------------------------------------------------
PNG_LEVEL = 3   # zlib level of `save_png`


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8 image as PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3:
        image = _check_image(image)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    # zlib level 3: a 900 x 855 slide overview in 0.08 s instead of 0.29 s at Pillow's default 6, 10 % larger
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=PNG_LEVEL)
    return utils.atomic_write_bytes(path, buf.getvalue())


def import_matplotlib() -> None:
    """Import the parts of matplotlib the figures here use (about 0.3 s of CPU the first time in a process), for a
    process to pay that before it is asked for a figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from matplotlib.patches import Patch  # noqa: F401


def new_figure(width: float, height: float):
    """A matplotlib Figure with an Agg canvas (no pyplot: safe in worker processes and without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` atomically to `path`, in the format its suffix names (png by default)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return utils.atomic_write_bytes(path, buf.getvalue())


def figure_panels(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike,
                  suptitle: str | None = None, legend: Sequence[tuple[str, Sequence[int]]] | None = None,
                  panel_inches: float = 4.0, dpi: int = 100) -> Path:
    """One figure with the given (title, image) panels side by side, written atomically to `path`.

    `legend`: optional (text, RGB colour) entries shown as a colour key below the panels (e.g.
    `error_legend_entries(counts)`).
    """
    if not panels:
        raise ValueError("figure_panels: no panels")
    n = len(panels)
    first = np.asarray(panels[0][1])
    aspect = first.shape[0] / max(first.shape[1], 1)
    extra = (0.9 if suptitle else 0.6) + (0.5 if legend else 0.0)
    fig = new_figure(panel_inches * n, panel_inches * aspect + extra)
    for i, (title, image) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        image = np.asarray(image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=np.asarray(c, dtype=float) / 255.0, edgecolor="black", label=text)
                   for text, c in legend]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08 if n > 2 else 0.14, 1, 1))
    else:
        fig.tight_layout()
    return save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------
# Plots of evaluation results
# ----------------------------------------------------------------------------------------------
def _values(rows: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    vals = []
    for row in rows:
        try:
            v = float(row[name])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(v):
            vals.append(v)
    return np.asarray(vals, dtype=np.float64)


def plot_tissue_bars(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     metrics: Sequence[str] = ("pq", "aji", "dice"), key: str = "tissue") -> Path:
    """Grouped bars: mean of each metric per tissue (from per-image rows), error bars = sd over images."""
    groups = sorted({str(r[key]) for r in rows})
    if not groups:
        raise ValueError("plot_tissue_bars: no rows")
    width = 0.8 / len(metrics)
    x = np.arange(len(groups))
    fig = new_figure(max(6.0, 0.55 * len(groups) * len(metrics) / 2 + 3), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for j, name in enumerate(metrics):
        means, sds = [], []
        for g in groups:
            v = _values([r for r in rows if str(r[key]) == g], name)
            means.append(v.mean() if v.size else np.nan)
            sds.append(v.std(ddof=1) if v.size > 1 else 0.0)
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, means, width, yerr=sds, capsize=2,
               label=METRIC_LABELS.get(name, name), error_kw={"elinewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over images (± sd)")
    ax.set_title(f"Scores per {key}")
    ax.legend(fontsize=8, ncol=len(metrics))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_distributions(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                       metrics: Sequence[str] = ("pq", "aji", "dice", "sq", "rq")) -> Path:
    """Per-image score distributions: a histogram per metric (top) and box plots side by side (bottom)."""
    n = len(metrics)
    fig = new_figure(3.0 * n, 6.0)
    data = [_values(rows, name) for name in metrics]
    for i, (name, v) in enumerate(zip(metrics, data)):
        ax = fig.add_subplot(2, n, i + 1)
        ax.hist(v, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
        if v.size:
            ax.axvline(v.mean(), color="tab:red", linewidth=1, label=f"mean {v.mean():.3f}")
            ax.legend(fontsize=7)
        ax.set_title(METRIC_LABELS.get(name, name), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score", fontsize=8)
        if i == 0:
            ax.set_ylabel("images", fontsize=8)
    ax = fig.add_subplot(2, 1, 2)
    ax.boxplot([v if v.size else np.array([np.nan]) for v in data], showmeans=True)
    ax.set_xticks(np.arange(1, n + 1))
    ax.set_xticklabels([METRIC_LABELS.get(m, m) for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("per-image score")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


LEARNING_CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train_loss", "val_loss")),
    ("validation PQ", ("val_pq",)),
    ("validation AJI", ("val_aji",)),
    ("validation Dice", ("val_dice",)),
)
_NOT_CURVES = {"lr", "learning_rate", "time", "seconds", "epoch_time", "elapsed", "best"}


def plot_learning_curves(histories: Mapping[Any, Sequence[Mapping[str, Any]]], path: str | os.PathLike,
                         panels: Sequence[tuple[str, Sequence[str]]] | None = None,
                         x_key: str = "epoch") -> Path:
    """Training curves of every fold, one colour per fold, written to `path`.

    `histories` maps a fold name to its rows (e.g. read from `fold_k/history.csv`). `panels` lists
    (title, columns) to draw, each column its own line style (solid, dashed, ...); by default
    `LEARNING_CURVE_PANELS` (losses, validation PQ/AJI/Dice), keeping the panels whose columns exist, or
    else one panel per numeric column. Values are plotted against `x_key` (or the row number).
    """
    if not histories:
        raise ValueError("plot_learning_curves: no histories")
    all_rows = [r for rows in histories.values() for r in rows]
    present = []
    for row in all_rows:
        for k in row:
            if k != x_key and k not in present and _values([row], k).size:
                present.append(k)
    if panels is None:
        panels = [(title, [c for c in cols if c in present]) for title, cols in LEARNING_CURVE_PANELS]
        panels = [(t, c) for t, c in panels if c]
        if not panels:
            panels = [(c, [c]) for c in present if c not in _NOT_CURVES] or [(c, [c]) for c in present]
    else:
        panels = [(t, [c for c in cols if c in present]) for t, cols in panels]
        panels = [(t, c) for t, c in panels if c]
    if not panels:
        raise ValueError("plot_learning_curves: the histories have no numeric columns")
    ncols = min(len(panels), 4)
    nrows = int(math.ceil(len(panels) / ncols))
    fig = new_figure(4.0 * ncols, 3.2 * nrows)
    styles = ("-", "--", ":", "-.")
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for i, (title, cols) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for color, (fold, rows) in zip(colors, histories.items()):
            for style, col in zip(styles * 4, cols):
                xs, ys = [], []
                for j, row in enumerate(rows):
                    y = _values([row], col)
                    if not y.size:
                        continue
                    x = _values([row], x_key)
                    xs.append(x[0] if x.size else j + 1)
                    ys.append(y[0])
                if xs:
                    label = f"{fold}" + (f" {col}" if len(cols) > 1 else "")
                    ax.plot(xs, ys, linestyle=style, color=color, marker="o" if len(xs) < 30 else None,
                            markersize=3, linewidth=1, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Whole-slide overview
# ----------------------------------------------------------------------------------------------
def _bin_counts(centroids_level0: np.ndarray, dimensions: tuple[float, float], mpp0: float, bin_um: float,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(per square bin of `bin_um` micrometres laid from the slide's top-left corner over level-0 `dimensions`
    (width, height): the number of centroids, or the sum of their `weights`; bin side in level-0 pixels)."""
    if not (mpp0 and mpp0 > 0):
        raise ValueError(f"mpp0 must be positive, got {mpp0}")
    width, height = float(dimensions[0]), float(dimensions[1])
    side = float(bin_um) / float(mpp0)
    cols, rows = max(1, math.ceil(width / side)), max(1, math.ceil(height / side))
    points = np.asarray(centroids_level0, dtype=np.float64).reshape(-1, 2)
    counts = np.zeros((rows, cols), dtype=np.float64)
    if len(points):
        c = np.clip((points[:, 0] // side).astype(np.int64), 0, cols - 1)
        r = np.clip((points[:, 1] // side).astype(np.int64), 0, rows - 1)
        np.add.at(counts, (r, c), 1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    return counts, side


def nuclei_density(centroids_level0: np.ndarray, dimensions: tuple[int, int], mpp0: float,
                   bin_um: float = 250.0) -> tuple[np.ndarray, float]:
    """(density (rows, cols) in nuclei per mm^2, bin side in level-0 pixels): nuclei counted in square bins
    of `bin_um` micrometres laid from the slide's top-left corner over level-0 `dimensions` (width, height),
    divided by the bin's area (edge bins by their part inside the slide)."""
    counts, side = _bin_counts(centroids_level0, dimensions, mpp0, bin_um)
    rows, cols = counts.shape
    width, height = float(dimensions[0]), float(dimensions[1])
    bin_w = np.minimum((np.arange(cols) + 1) * side, width) - np.arange(cols) * side
    bin_h = np.minimum((np.arange(rows) + 1) * side, height) - np.arange(rows) * side
    area_mm2 = np.outer(bin_h, bin_w) * (float(mpp0) / 1000.0) ** 2
    return counts / area_mm2, side


def overview_bin_um(width_um: float, height_um: float) -> float:
    """Heat-map bin side for a slide of that size: 250 um on a whole slide, smaller on a small image so its
    longest side still has about 32 bins, never below 50 um (fewer nuclei per bin would be noise)."""
    return float(min(250.0, max(50.0, max(width_um, height_um) / 32.0)))


def tissue_density(centroids_level0: np.ndarray, tissue, dimensions: tuple[float, float], mpp0: float,
                   bin_um: float) -> tuple[np.ma.MaskedArray, float]:
    """(nuclei per mm^2 of tissue per bin, masked where tissue covers less than a quarter of the bin (a thin rim of
    tissue would divide by almost nothing); bin side
    in level-0 pixels): `nuclei_density`'s counts divided by the area of `tissue` (a `tissue.TissueMask`,
    its pixels counted by their centre) inside each bin instead of the bin's whole area."""
    density, side = nuclei_density(centroids_level0, dimensions, mpp0, bin_um)
    rows, cols = density.shape
    width0, height0 = float(dimensions[0]), float(dimensions[1])
    mask = np.asarray(tissue.mask, dtype=bool)
    counts = np.zeros(rows * cols, dtype=np.int64)
    if mask.any():   # each tissue pixel in its bin by its centre (one bincount: np.add.at is about 10x slower)
        row_bin = np.clip(((np.arange(mask.shape[0]) + 0.5) * tissue.downsample // side).astype(np.int64), 0, rows - 1)
        col_bin = np.clip(((np.arange(mask.shape[1]) + 0.5) * tissue.downsample // side).astype(np.int64), 0, cols - 1)
        mr, mc = np.nonzero(mask)
        counts = np.bincount(row_bin[mr] * cols + col_bin[mc], minlength=rows * cols)
    tissue_px = counts.reshape(rows, cols) * float(tissue.downsample) ** 2
    bin_w = np.minimum((np.arange(cols) + 1) * side, width0) - np.arange(cols) * side
    bin_h = np.minimum((np.arange(rows) + 1) * side, height0) - np.arange(rows) * side
    fraction = np.clip(tissue_px / np.outer(bin_h, bin_w), 0.0, 1.0)
    shown = fraction >= 0.25
    per_tissue = np.divide(density, fraction, out=np.zeros_like(density), where=shown)
    return np.ma.masked_array(per_tissue, mask=~shown), side


def _slide_frame(thumbnail: np.ndarray, downsample: float, tissue, mpp0: float,
                 bin_um: float | None) -> tuple[np.ndarray, float, float, float]:
    """(thumbnail, level-0 width, level-0 height, bin size in µm) of an overview picture."""
    thumb = _check_image(thumbnail)
    th, tw = thumb.shape[:2]
    width0, height0 = tw * float(downsample), th * float(downsample)
    if getattr(tissue, "dimensions", None):
        width0, height0 = float(tissue.dimensions[0]), float(tissue.dimensions[1])
    if bin_um is None:
        bin_um = overview_bin_um(width0 * float(mpp0), height0 * float(mpp0))
    return thumb, width0, height0, float(bin_um)


def tissue_outline(mask: np.ndarray, pixel: float) -> list[np.ndarray]:
    """The outline of a tissue `mask` (bool, one pixel = `pixel` units, its centre at (k + 0.5) * pixel): the lines
    (each an (n, 2) array of x, y) where the mask, as floats 0 and 1, crosses 0.5, by contourpy (the tracer matplotlib's
    own `contour` uses), traced in pixel indices and then scaled; matplotlib's `contour` with the pixels' coordinates
    gives the same lines and first builds two full coordinate grids and masked copies of the mask (0.2 s of a 2048²
    mask against about 0.02 s)."""
    import contourpy

    z = np.ascontiguousarray(mask, dtype=np.float64)
    lines, _ = contourpy.contour_generator(z=z, name="mpl2014", line_type="SeparateCode").lines(0.5)
    return [(np.asarray(line, dtype=np.float64) + 0.5) * pixel for line in lines]


REDUCE_FROM = 2   # `_binned_overview` box-averages a thumbnail at least this many times wider than its figure


def _binned_overview(thumb: np.ndarray, downsample: float, tissue, size0: tuple[float, float], mpp0: float,
                     shown: np.ma.MaskedArray, side: float, heat: dict, bar_label: str, title: str,
                     width_inches: float) -> np.ndarray:
    """The one overview drawing: the thumbnail in mm, the per-bin map `shown` (bins of `side` level-0 pixels,
    matplotlib `imshow` options `heat`), the tissue outline (green), a colour bar and a title; uint8 RGB."""
    th, tw = thumb.shape[:2]
    mm = float(mpp0) / 1000.0  # mm per level-0 pixel
    width0, height0 = size0
    rows, cols = shown.shape
    mask = np.asarray(tissue.mask, dtype=bool)
    from matplotlib.collections import LineCollection

    fig = new_figure(width_inches, max(2.5, width_inches * (th / max(tw, 1)) * 0.85 + 0.9))
    ax = fig.add_subplot(1, 1, 1)
    # matplotlib converts and resamples every pixel it is given (RGBA copies: 0.4 s for a 2048² thumbnail); a
    # thumbnail two or more times wider than the figure is first box-averaged by that whole factor f (Pillow's
    # `reduce`: a last, partial box is the mean of its pixels), each pixel then standing for f x f of them (the
    # axes' limits clip what the partial boxes add beyond the slide)
    factor = int(tw // max(int(width_inches * fig.dpi), 1))
    if factor >= REDUCE_FROM:
        from PIL import Image

        thumb = np.asarray(Image.fromarray(np.ascontiguousarray(thumb)).reduce(factor))
        downsample = downsample * factor
        th, tw = thumb.shape[:2]
    ax.imshow(thumb, extent=(0, tw * downsample * mm, th * downsample * mm, 0), interpolation="bilinear")
    image = ax.imshow(shown, extent=(0, cols * side * mm, rows * side * mm, 0), interpolation="nearest", **heat)
    if mask.any() and mask.shape[0] > 1 and mask.shape[1] > 1:
        ax.add_collection(LineCollection(tissue_outline(mask, float(tissue.downsample) * mm), colors=["#00c000"],
                                         linewidths=1.0))
    ax.set_xlim(0, width0 * mm)
    ax.set_ylim(height0 * mm, 0)
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(bar_label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def slide_overview(thumbnail: np.ndarray, downsample: float, tissue, centroids_level0: np.ndarray,
                   mpp0: float, bin_um: float | None = None, title: str | None = None,
                   width_inches: float = 9.0) -> np.ndarray:
    """uint8 RGB picture of a slide's results: the thumbnail (`downsample` level-0 pixels per pixel), the
    tissue outline (`tissue.TissueMask`, green) and a heat map of nuclei per mm^2 of tissue in square bins of
    `bin_um` micrometres (default `overview_bin_um`): each bin's nuclei divided by the tissue area inside it,
    drawn where tissue covers at least a quarter of the bin; a colour bar (up to the 98th percentile of the
    bins, so a few extreme bins do not wash out the rest) in nuclei per mm^2, axes in mm and a
    title (default: the nuclei count, tissue area and mean density)."""
    thumb, width0, height0, bin_um = _slide_frame(thumbnail, downsample, tissue, mpp0, bin_um)
    shown, side = tissue_density(centroids_level0, tissue, (width0, height0), mpp0, bin_um)
    vmax = float(np.percentile(shown.compressed(), 98)) if shown.count() else 0.0
    vmax = vmax if vmax > 0 else 1.0
    if title is None:
        count = len(np.asarray(centroids_level0).reshape(-1, 2))
        area = tissue.area_mm2(mpp0)
        per_mm2 = f", {count / area:.0f} per mm²" if area > 0 else ""
        title = f"{count} nuclei, tissue {area:.2f} mm²{per_mm2} (green: tissue outline)"
    return _binned_overview(thumb, downsample, tissue, (width0, height0), mpp0, shown, side,
                            dict(cmap="inferno", alpha=0.55, vmin=0.0, vmax=vmax),
                            f"nuclei per mm² of tissue (bins of {bin_um:g} µm)", title, width_inches)


def save_slide_overview(path: str | os.PathLike, thumbnail: np.ndarray, downsample: float, tissue,
                        centroids_level0: np.ndarray, mpp0: float, **kwargs) -> Path:
    """Write `slide_overview(...)` as a PNG, atomically."""
    return save_png(path, slide_overview(thumbnail, downsample, tissue, centroids_level0, mpp0, **kwargs))


def low_confidence_fraction(centroids_level0: np.ndarray, confidence: np.ndarray, dimensions: tuple[float, float],
                            mpp0: float, bin_um: float, threshold: float = 0.5,
                            min_nuclei: int = 5) -> tuple[np.ma.MaskedArray, float]:
    """(per square bin of `bin_um` micrometres, the fraction of its nuclei whose confidence is below `threshold`,
    masked where the bin holds fewer than `min_nuclei` nuclei; bin side in level-0 pixels). Bins as
    `nuclei_density`'s."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if len(conf) != len(np.asarray(centroids_level0).reshape(-1, 2)):
        raise ValueError(f"{len(conf)} confidences for {len(np.asarray(centroids_level0).reshape(-1, 2))} centroids")
    total, side = _bin_counts(centroids_level0, dimensions, mpp0, bin_um)
    low, _ = _bin_counts(centroids_level0, dimensions, mpp0, bin_um, weights=(conf < threshold).astype(np.float64))
    shown = total >= max(int(min_nuclei), 1)
    fraction = np.divide(low, total, out=np.zeros_like(low), where=shown)
    return np.ma.masked_array(fraction, mask=~shown), side


def confidence_overview(thumbnail: np.ndarray, downsample: float, tissue, centroids_level0: np.ndarray,
                        confidence: np.ndarray, mpp0: float, threshold: float = 0.5, bin_um: float | None = None,
                        width_inches: float = 9.0) -> np.ndarray:
    """uint8 RGB picture of where a slide's doubtful nuclei are: the thumbnail, the tissue outline (green) and,
    per bin (`overview_bin_um` by default), the fraction of the bin's nuclei whose confidence (mean foreground
    probability) is below `threshold`, on a fixed 0..1 colour scale with a colour bar; bins with fewer than 5
    nuclei are left blank. The title gives the slide's count and share of such nuclei."""
    thumb, width0, height0, bin_um = _slide_frame(thumbnail, downsample, tissue, mpp0, bin_um)
    shown, side = low_confidence_fraction(centroids_level0, confidence, (width0, height0), mpp0, bin_um, threshold)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    n_low = int((conf < threshold).sum())
    share = f" ({100.0 * n_low / len(conf):.1f} %)" if len(conf) else ""
    return _binned_overview(thumb, downsample, tissue, (width0, height0), mpp0, shown, side,
                            dict(cmap="viridis", alpha=0.6, vmin=0.0, vmax=1.0),
                            f"fraction of nuclei with confidence < {threshold:g} (bins of {bin_um:g} µm)",
                            f"Low-confidence nuclei: {n_low} of {len(conf)}{share} below {threshold:g}", width_inches)


def save_confidence_overview(path: str | os.PathLike, thumbnail: np.ndarray, downsample: float, tissue,
                             centroids_level0: np.ndarray, confidence: np.ndarray, mpp0: float, **kwargs) -> Path:
    """Write `confidence_overview(...)` as a PNG, atomically."""
    return save_png(path, confidence_overview(thumbnail, downsample, tissue, centroids_level0, confidence, mpp0,
                                              **kwargs))
