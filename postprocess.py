"""Turn the network's maps into a nuclei instance label map.

Two ways, chosen by `PostprocessConfig.mode`:

- `"hv"` (`hv_to_instances`, HoVer-Net style): the foreground probability is thresholded, and the
  horizontal/vertical distance maps (each nucleus' pixels hold their offset from its centre, scaled to
  [-1, 1]) tell nuclei apart: inside a nucleus they increase steadily, across the border between two
  touching nuclei they drop sharply. A Sobel derivative of each map gives that drop; its size is the
  "edge energy". Pixels of low energy inside the foreground form one marker core per nucleus, and a
  marker-controlled watershed on the smoothed energy grows the cores back to the whole foreground.
- `"binary"` (`binary_to_instances`, the baseline of earlier MobileSAM+LoRA NuInsSeg work): threshold and
  connected components, optionally split by a watershed on the distance transform.

Both return `int32` label maps with ids 1..N (0 = background), at the resolution of the input maps.
The parameters live in `PostprocessConfig`, which is saved with each trained model (`to_dict`/`from_dict`).
See `docs/metrics.md` for the steps and the round-trip figures of the default parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage import segmentation

import jit_kernels
from utils import UserError

try:   # connected-components-3d (requirements.txt): the same labelling as scipy's, in about half the time
    import cc3d
except ImportError:   # pragma: no cover - an install without it labels with scipy alone
    cc3d = None

MODES = ("hv", "binary")


@dataclass
class PostprocessConfig:
    """Parameters of the post-processing (saved with every trained model).

    mode: "hv" (foreground + HV maps, marker-controlled watershed) or "binary" (threshold + components).
    fg_threshold: foreground probability above which a pixel is nucleus.
    marker_threshold: edge energy (in units of the full HV range dropped across the Sobel window, so 1.0
        is the border between two touching nuclei, 0.5 the outer border of a nucleus) below which a
        foreground pixel belongs to a marker core.
    min_marker_area: marker cores smaller than this (pixels) are discarded.
    marker_opening: radius (pixels) of the disc used to open the marker cores (breaks thin bridges).
    min_area: instances (and foreground specks) smaller than this (pixels) are removed; foreground holes
        smaller than this are filled.
    sobel_ksize: size of the Sobel kernels (odd, 3..31); larger is smoother and more robust to noisy maps.
    smooth_sigma: Gaussian sigma (pixels) of the smoothing of the watershed surface.
    fill_holes: fill holes inside each instance.
    watershed: binary mode only: split touching nuclei by a watershed on the distance transform.
    peak_min_distance: binary mode watershed: minimum distance (pixels) between two nucleus centres.
    """

    mode: str = "hv"
    fg_threshold: float = 0.5
    marker_threshold: float = 0.1
    min_marker_area: int = 4
    marker_opening: int = 2
    min_area: int = 10
    sobel_ksize: int = 7
    smooth_sigma: float = 1.0
    fill_holes: bool = True
    watershed: bool = False
    peak_min_distance: int = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"postprocess mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0.0 <= float(self.fg_threshold) <= 1.0:
            raise UserError(f"postprocess fg_threshold {self.fg_threshold}: must lie in [0, 1]")
        if float(self.marker_threshold) <= 0.0:
            raise UserError(f"postprocess marker_threshold {self.marker_threshold}: must be > 0")
        for name in ("min_marker_area", "marker_opening", "min_area", "peak_min_distance"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"postprocess {name} {getattr(self, name)}: must be >= 0")
        k = int(self.sobel_ksize)
        if k < 3 or k > 31 or k % 2 == 0:
            raise UserError(f"postprocess sobel_ksize {self.sobel_ksize}: must be an odd number from 3 to 31")
        if float(self.smooth_sigma) < 0:
            raise UserError(f"postprocess smooth_sigma {self.smooth_sigma}: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PostprocessConfig":
        """Inverse of `to_dict`; unknown keys are an error (a config from another version or a typo)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"postprocess config: unknown key(s) {', '.join(unknown)} "
                            f"(known: {', '.join(known)})")
        casted: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(cls, name)
            try:
                if isinstance(default, bool):
                    if not isinstance(value, (bool, np.bool_)):
                        raise ValueError
                    casted[name] = bool(value)
                elif isinstance(default, int):
                    if float(value) != int(value):
                        raise ValueError
                    casted[name] = int(value)
                elif isinstance(default, float):
                    casted[name] = float(value)
                else:
                    casted[name] = str(value)
            except (TypeError, ValueError):
                raise UserError(f"postprocess config: {name}={value!r} is not a valid "
                                f"{type(default).__name__}") from None
        return cls(**casted)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _check_prob(foreground_prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(foreground_prob)
    if prob.ndim != 2:
        raise UserError(f"postprocess: foreground map must be 2-D (H, W), got shape {prob.shape}")
    return prob.astype(np.float32, copy=False)


def _label4(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """`ndi.label(mask)` of a 2-D mask (4-connected components, int32 ids 1..n), the same array and count.

    Through cc3d where it is installed: its two raster passes give each pixel a provisional label (a new one only
    where neither the pixel above nor the one to its left belongs to the mask) and renumber the components in the
    order of their smallest provisional label, which is the one made at the component's first pixel in raster
    order: the order `ndi.label` numbers them in. About 10 ms instead of 20-40 ms on a 2176² crop (the background's
    labelling, one large region, is the slowest for scipy); `tests/test_postprocess.py` checks the two agree."""
    mask = np.asarray(mask)
    if cc3d is None or mask.ndim != 2 or mask.size == 0:
        return ndi.label(mask)
    out, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=bool), connectivity=4, return_N=True,
                                       out_dtype=np.uint32)
    return out.view(np.int32), int(n)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius + radius  # '+ radius' makes small discs rounder


def _binary_opening_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`ndi.binary_opening(mask, structure=_disk(radius))` (outside the image is background), the same pixels;
    for radius 2 (the default) the 21-pixel disc is a 3 x 3 square dilated by a 4-cross, so erosion and
    dilation are each a few shifted AND / OR passes instead of one pass over 21 neighbours."""
    if radius != 2:
        return ndi.binary_opening(mask, structure=_disk(radius))
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if h < 5 or w < 5:
        return ndi.binary_opening(mask, structure=_disk(radius))

    def erode(x: np.ndarray, offsets) -> np.ndarray:
        out = x.copy()
        for dy, dx in offsets:
            shifted = np.zeros_like(x)
            shifted[max(dy, 0):h - max(-dy, 0), max(dx, 0):w - max(-dx, 0)] = \
                x[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
            out &= shifted
        return out

    square = [(0, -1), (0, 1)], [(-1, 0), (1, 0)]
    cross = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    eroded = erode(erode(erode(mask, square[0]), square[1]), cross)
    # dilation on a frame of 2 pixels, so that no intermediate result is cut at the image border
    big = np.zeros((h + 4, w + 4), bool)
    big[2:-2, 2:-2] = eroded
    H, W = big.shape
    for offsets in (cross, square[0], square[1]):
        grown = big.copy()
        for dy, dx in offsets:
            grown[max(dy, 0):H - max(-dy, 0), max(dx, 0):W - max(-dx, 0)] |= \
                big[max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
        big = grown
    return big[2:-2, 2:-2]


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Set labels with fewer than `min_area` pixels to 0 (in place) and return the array."""
    if min_area > 1 and labels.max() > 0:
        areas = np.bincount(labels.ravel())
        small = areas < min_area
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    return labels


def _small_components(comp: np.ndarray, min_area: int, inner_only: bool = False,
                      boxes: list | None = None) -> list[tuple[tuple[slice, slice], int]]:
    """(bounding box, id) of the components of `comp` (a 4-connected labelling, as `ndi.label`'s default
    gives) with fewer than `min_area` pixels; with `inner_only`, only those not reaching the image border.

    A 4-connected set spanning h rows and w columns has at least h + w - 1 pixels, so only components with
    h + w - 1 < min_area can be small: their pixels are counted on their own (tiny) boxes, and the image is
    never passed over again (one `find_objects` pass instead of a `bincount` and a gather over every pixel).
    `boxes`: `ndi.find_objects(comp)`, if known."""
    h, w = comp.shape
    small = []
    for k, box in enumerate(ndi.find_objects(comp) if boxes is None else boxes, 1):
        if box is None:
            continue
        ys, xs = box
        if (ys.stop - ys.start) + (xs.stop - xs.start) - 1 >= min_area:
            continue
        if inner_only and (ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w):
            continue   # background reaching the image border is not a hole
        if np.count_nonzero(comp[box] == k) < min_area:
            small.append((box, k))
    return small


def _clean_foreground(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove specks and fill holes smaller than `min_area` pixels (4-connected components of the mask and
    of its complement; a background region reaching the image border is not a hole)."""
    if min_area <= 1:
        return mask
    mask = np.array(mask, dtype=bool)
    comp, n = _label4(mask)
    for box, k in (_small_components(comp, min_area) if n else []):
        mask[box][comp[box] == k] = False
    holes, n = _label4(~mask)
    for box, k in (_small_components(holes, min_area, inner_only=True) if n else []):
        mask[box][holes[box] == k] = True
    return mask


# Up to this many holes (regions) to fill, one by one on their boxes; more: all at once (faster from about 1,000).
_FEW_HOLES = 512


def _clean_foreground_components(mask: np.ndarray, min_area: int
                                 ) -> tuple[np.ndarray, np.ndarray, int, list, tuple | None]:
    """`_clean_foreground` and the 4-connected components of its result: (mask, components, n, boxes, background).
    `components` has the ids of `ndi.label(mask)`'s labelling of the cleaned mask up to an increasing renumbering
    (the ids of the input mask's components: the dropped specks leave gaps), `boxes` their bounding boxes
    (`ndi.find_objects`, None for a gap), without labelling the cleaned mask again.

    Why the same: removing a speck removes a whole component; a filled hole is a 4-connected background region
    whose 4-neighbours all belong to the mask, so if they all belong to one component the hole joins that one:
    inside its bounding box, after its first pixel in raster order (`ndi.label` numbers the components in the
    raster order of their first pixels, so the order of the ids stays). Where a filled hole touches two or more
    components, they are one component now (`_join_components`).

    `background`: (labelling, n, filled, boxes) where `labelling` is `ndi.label` of the background after the specks
    are removed, `filled` marks its ids that were filled (the other ids label the background of the cleaned mask)
    and `boxes` are its `find_objects` boxes (`_fill_instance_holes` uses it); None where `min_area` <= 1."""
    mask = np.array(mask, dtype=bool)
    comp, n = _label4(mask)
    boxes = jit_kernels.find_objects(comp, n)
    if min_area <= 1 or n == 0:
        return mask, comp, n, boxes, None
    for box, k in _small_components(comp, min_area, boxes=boxes):
        sel = comp[box] == k
        mask[box][sel] = False
        comp[box][sel] = 0
        boxes[k - 1] = None
    holes, n_holes = _label4(~mask)
    hole_boxes = jit_kernels.find_objects(holes, n_holes)
    fills = _small_components(holes, min_area, inner_only=True, boxes=hole_boxes) if n_holes else []
    filled = np.zeros(n_holes + 1, bool)
    filled[[k for _, k in fills]] = True
    # components joined by a filled hole touching two or more: (smaller id, larger id) pairs
    links = []
    if len(fills) <= _FEW_HOLES:
        for (ys, xs), k in fills:
            # an inner hole: its box grown by one pixel lies inside the image
            hole = np.zeros((ys.stop - ys.start + 2, xs.stop - xs.start + 2), bool)
            hole[1:-1, 1:-1] = holes[ys, xs] == k
            around = np.zeros_like(hole)
            around[1:] |= hole[:-1]
            around[:-1] |= hole[1:]
            around[:, 1:] |= hole[:, :-1]
            around[:, :-1] |= hole[:, 1:]
            owners = comp[ys.start - 1:ys.stop + 1, xs.start - 1:xs.stop + 1][around & ~hole]
            inner = hole[1:-1, 1:-1]
            mask[ys, xs] |= inner
            first = owners.min()
            view = comp[ys, xs]
            view[inner] = first
            if (owners != first).any():   # the hole joins them: it may reach out of `first`'s box
                links.extend((int(first), int(o)) for o in np.unique(owners[owners != first]))
                boxes[first - 1] = _union_box(boxes[first - 1], (ys, xs))
    else:   # the same, for all holes at once
        ys, xs = np.nonzero(filled[holes])
        mask[ys, xs] = True
        hole_id = holes[ys, xs]
        first = np.full(n_holes + 1, np.iinfo(np.int64).max)
        pairs = []
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):   # inner holes: the neighbours lie inside the image
            owner = comp[ys + dy, xs + dx]
            fg_side = owner > 0   # a hole pixel's other 4-neighbours belong to the same hole
            np.minimum.at(first, hole_id[fg_side], owner[fg_side])
            pairs.append(np.stack([hole_id[fg_side], owner[fg_side]], axis=1))
        comp[ys, xs] = first[hole_id]
        pairs = np.concatenate(pairs)
        joined = pairs[:, 1] != first[pairs[:, 0]]
        if joined.any():
            links = [tuple(p) for p in np.unique(np.stack([first[pairs[joined, 0]], pairs[joined, 1]], axis=1),
                                                 axis=0).tolist()]
            for k in np.unique(pairs[joined, 0]).tolist():   # a joining hole may reach out of `first`'s box
                boxes[first[k] - 1] = _union_box(boxes[first[k] - 1], hole_boxes[k - 1])
    if links:
        _join_components(comp, boxes, links)
    return mask, comp, n, boxes, (holes, n_holes, filled, hole_boxes)


def _join_components(comp: np.ndarray, boxes: list, links: list[tuple[int, int]]) -> None:
    """Joins the components of each (id, id) link of `links` (in place): each set of linked components takes
    the smallest id of the set (the one `ndi.label` would give the joined component: it numbers the components in
    the raster order of their first pixels, and the joined component's first pixel is its first part's), its box
    becomes the union of their boxes, the others' boxes None."""
    root = {}

    def find(k: int) -> int:
        while root.get(k, k) != k:
            k = root[k]
        return k

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            root[max(ra, rb)] = min(ra, rb)
    for k in sorted(root):
        r = find(k)
        if r == k:
            continue
        box = boxes[k - 1]
        view = comp[box]
        view[view == k] = r
        boxes[r - 1] = _union_box(boxes[r - 1], box)
        boxes[k - 1] = None


def _union_box(a: tuple[slice, slice], b: tuple[slice, slice]) -> tuple[slice, slice]:
    return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
            slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the ids to 1..N keeping their order; int32."""
    flat = labels.ravel()
    if flat.max(initial=0) == 0:
        return np.zeros(labels.shape, dtype=np.int32)
    present = np.bincount(flat) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.int32)
    lut[0] = 0
    return lut[labels]


def _fill_instance_holes(labels: np.ndarray, background: tuple | None = None) -> np.ndarray:
    """Fill the holes of each instance: background regions (4-connected) that do not reach the image
    border and touch exactly one instance take that instance's id. Other instances are never changed.

    `background`: (holes, n, gone, boxes), a labelling `holes` (ids 1..n) whose ids not marked in `gone` label
    exactly the background `labels == 0`, each id one 4-connected region of it (the regions are not labelled
    again), and its `find_objects` boxes (or None): the pixels of the candidate regions are then taken from their
    boxes, not from a pass over the image."""
    boxes = None
    if background is None:
        holes, n = _label4(labels == 0)
        gone = None
    else:
        holes, n, gone, boxes = background
    if n == 0:
        return labels
    # Background regions on the image border are not holes.
    border = np.zeros(n + 1, dtype=bool)
    for edge in (holes[0, :], holes[-1, :], holes[:, 0], holes[:, -1]):
        border[edge] = True
    candidate = ~border
    candidate[0] = False
    if gone is not None:
        candidate &= ~gone
    if not candidate.any():
        return labels
    # (region, neighbouring instance) pairs across every 4-neighbour link, for the candidate regions only
    # (the pixels of the background regions that do not reach the border: few, whatever the image size).
    ids = np.flatnonzero(candidate)
    if boxes is not None and ids.size <= _FEW_HOLES:
        ys, xs = [], []
        for k in ids.tolist():
            box = boxes[k - 1]
            yy, xx = np.nonzero(holes[box] == k)
            ys.append(yy + box[0].start)
            xs.append(xx + box[1].start)
        ys, xs = np.concatenate(ys), np.concatenate(xs)   # in another order than np.nonzero's: no matter
    else:
        ys, xs = np.nonzero(candidate[holes])
    region = holes[ys, xs]
    h, w = labels.shape
    pairs = []
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        neighbour = labels[ny[ok], nx[ok]]
        sel = neighbour > 0
        pairs.append(np.stack([region[ok][sel], neighbour[sel]], axis=1))
    pairs = np.concatenate(pairs).astype(np.int64)
    if pairs.size == 0:
        return labels
    base = int(labels.max()) + 1
    keys = np.unique(pairs[:, 0] * base + pairs[:, 1])
    pairs = np.stack([keys // base, keys % base], axis=1)
    count = np.bincount(pairs[:, 0], minlength=n + 1)
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[pairs[:, 0]] = pairs[:, 1]
    fill = (count == 1) & ~border
    fill[0] = False
    if fill.any():
        take = fill[region]   # only pixels of the candidate regions can be filled
        labels = labels.copy()
        labels[ys[take], xs[take]] = owner[region[take]]
    return labels


def _finish(labels: np.ndarray, min_area: int, fill_holes: bool, background: tuple | None = None) -> np.ndarray:
    """`_remove_small`, then `_fill_instance_holes`, then `_relabel_sequential`, with the removal and the
    renumbering done by one lookup (ids of fewer than `min_area` pixels -> 0, the others -> 1..N in order)
    before the hole filling: the filling only writes ids of instances that stay, and it treats ids only as
    equal or not and in their order, which the renumbering keeps, so the result is the same. `background`: as
    `_fill_instance_holes`', for `labels == 0`; used only if no instance is removed (which would change the
    background)."""
    labels = labels.astype(np.int32, copy=False)
    flat = labels.ravel()
    if flat.max(initial=0) == 0:
        return np.zeros(labels.shape, dtype=np.int32)
    areas = np.bincount(flat)
    keep = areas > 0
    if min_area > 1:
        keep &= areas >= min_area
    keep[0] = False
    lut = np.cumsum(keep).astype(np.int32)
    lut[~keep] = 0
    removed = bool((areas[1:] > 0).sum() > keep.sum())
    labels = lut[labels]
    if fill_holes:
        labels = _fill_instance_holes(labels, None if removed else background)
    return labels


@lru_cache(maxsize=16)
def _sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable Sobel kernels of size `ksize`: (derivative, smoothing).

    Smoothing: binomial weights (sum 1). Derivative: binomial of size ksize-2 convolved with [-1, 0, 1],
    scaled so that a unit step gives a peak response of 1 (so the derivative of a map measures how much
    of its range is dropped across the kernel window).
    """
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    smooth /= smooth.sum()
    base = np.array([1.0])
    for _ in range(ksize - 3):
        base = np.convolve(base, [1.0, 1.0])
    deriv = np.convolve(base, [1.0, 0.0, -1.0])  # correlation form: right minus left
    deriv = deriv[::-1].copy()
    deriv /= deriv[deriv > 0].sum()
    return deriv.astype(np.float32), smooth.astype(np.float32)


def _normalise(channel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Min-max normalise a map to [0, 1] using its values inside `mask` (0 outside -> mid value)."""
    inside = channel[mask]   # one gather, then two small reductions (faster than two masked ones)
    if inside.size == 0:
        return np.zeros_like(channel)
    lo, hi = float(inside.min()), float(inside.max())
    if hi - lo < 1e-6:
        return np.zeros_like(channel)
    out = np.subtract(channel, lo, dtype=channel.dtype)   # the same float32 operations, without temporaries
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)


def edge_energy(hv: np.ndarray, foreground: np.ndarray, sobel_ksize: int = 7) -> np.ndarray:
    """Edge energy of the HV maps: for each channel, the drop of the (min-max normalised) map along its
    own axis (x for channel 0, y for channel 1) measured by a Sobel derivative, then the larger of the
    two. Inside a nucleus the maps rise, so the energy is ~0 there; it is ~1 on the border between two
    touching nuclei and ~0.5 on a nucleus' outer border."""
    deriv, smooth = _sobel_kernels(int(sobel_ksize))
    # compiled, where numba is installed: the same bits in about a third of the time (`jit_kernels`)
    energy = jit_kernels.edge_energy(hv[0], hv[1], foreground, deriv, smooth)
    if energy is not None:
        return energy
    energy = np.zeros(foreground.shape, dtype=np.float32)
    for channel, axis in ((0, 1), (1, 0)):
        # The map's range goes to [0, 1]: the full drop from +1 to -1 across a border measures 1.
        ch = _normalise(hv[channel].astype(np.float32, copy=False), foreground)
        d = _correlate1d(ch, deriv, axis)
        d = _correlate1d(d, smooth, 1 - axis)
        np.maximum(energy, np.negative(d, out=d), out=energy)
    return energy


_BAND = 48   # rows of one band of `_correlate1d` along the columns


def _correlate1d(image: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """`ndi.correlate1d(image, weights, axis=axis, mode="nearest")` of a 2-D float32 image, the same values.

    Along axis 0 the filter reads each column with a stride of a whole row, which is slower than along the rows;
    here the rows go through in bands of `_BAND` rows (views of the image, no copies), each with the kernel's reach
    of rows above and below it (the image's own rows, or the image's border where the band meets it, which the
    "nearest" mode replicates alike), and only the band's own rows of each result are kept: every output is the
    same sum of the same inputs. (Bands of 48 rows: about 23 ms per pass on a 2176² crop, against 35 ms for strips
    of 32 copied columns and 45 ms for the whole image at once.)"""
    h = image.shape[0]
    if axis == 1 or image.ndim != 2 or h <= 2 * _BAND:
        return ndi.correlate1d(image, weights, axis=axis, mode="nearest")
    reach = len(weights) // 2   # at least the kernel's reach on either side
    out = np.empty_like(image)
    for start in range(0, h, _BAND):
        stop = min(start + _BAND, h)
        y0, y1 = max(start - reach, 0), min(stop + reach, h)
        out[start:stop] = ndi.correlate1d(image[y0:y1], weights, axis=0, mode="nearest")[start - y0:stop - y0]
    return out


# The energy is computed on a mosaic of the components' boxes (`_edge_energy_on_boxes`) where the mosaic's tiles
# cover at most this share of the image; more (dense tissue where the boxes overlap much): on the whole image.
_ENERGY_MOSAIC_SHARE = 0.6


def _edge_energy_on_boxes(hv: np.ndarray, foreground: np.ndarray, sobel_ksize: int, boxes: list,
                          frame: int) -> np.ndarray:
    """`edge_energy(hv, foreground, sobel_ksize)` on each box of `boxes` (None entries skipped) grown by `frame`
    pixels and cut at the image border, the same values bit for bit (elsewhere 0, or the whole image's values where
    that is computed). The boxes must hold every foreground pixel (the components' boxes do).

    Each grown box, with a further halo of sobel_ksize // 2 pixels of the HV maps (replicated where the image ends,
    as the filter's "nearest" mode does), is one tile of a mosaic, and the mosaic goes through `edge_energy`
    itself: the normalisation's minimum and maximum are those of the foreground values the tiles hold, which are all
    of them (with repeats); each output of the two `correlate1d` passes (along one axis, then the other) is the same
    sum of the same inputs wherever it lies, and inside a grown box those inputs lie in its tile's halo. Sparse
    tissue costs its boxes' pixels instead of the whole image's; where the tiles would cover more than
    `_ENERGY_MOSAIC_SHARE` of the image, the whole image is computed instead."""
    h, w = foreground.shape
    margin = int(frame) + int(sobel_ksize) // 2
    sel = [b for b in boxes if b is not None]
    if not sel:
        return edge_energy(hv, foreground, sobel_ksize)
    y0 = np.array([b[0].start for b in sel], np.int64) - margin
    x0 = np.array([b[1].start for b in sel], np.int64) - margin
    heights = np.array([b[0].stop for b in sel], np.int64) + margin - y0
    widths = np.array([b[1].stop for b in sel], np.int64) + margin - x0
    if int((heights * widths).sum()) > _ENERGY_MOSAIC_SHARE * h * w:
        return edge_energy(hv, foreground, sobel_ksize)
    tops, lefts, mh, mw = _shelf_pack(heights, widths)
    maps = np.zeros((2, mh, mw), np.float32)
    inside = np.zeros((mh, mw), bool)
    for ty, tx, th, tw, top, left in zip(y0.tolist(), x0.tolist(), heights.tolist(), widths.tolist(),
                                         tops.tolist(), lefts.tolist()):
        cy0, cy1, cx0, cx1 = max(ty, 0), min(ty + th, h), max(tx, 0), min(tx + tw, w)
        tile = hv[:, cy0:cy1, cx0:cx1]
        if cy0 > ty or cx0 > tx or cy1 < ty + th or cx1 < tx + tw:
            tile = np.pad(tile, ((0, 0), (cy0 - ty, ty + th - cy1), (cx0 - tx, tx + tw - cx1)), mode="edge")
        maps[:, top:top + th, left:left + tw] = tile
        inside[top + cy0 - ty:top + cy1 - ty, left + cx0 - tx:left + cx1 - tx] = foreground[cy0:cy1, cx0:cx1]
    tiles = edge_energy(maps, inside, sobel_ksize)
    energy = np.zeros((h, w), np.float32)
    cut = margin - int(frame)   # the halo
    for ty, tx, th, tw, top, left in zip(y0.tolist(), x0.tolist(), heights.tolist(), widths.tolist(),
                                         tops.tolist(), lefts.tolist()):
        cy0, cy1 = max(ty + cut, 0), min(ty + th - cut, h)
        cx0, cx1 = max(tx + cut, 0), min(tx + tw - cut, w)
        energy[cy0:cy1, cx0:cx1] = tiles[top + cy0 - ty:top + cy1 - ty, left + cx0 - tx:left + cx1 - tx]
    return energy


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def hv_to_instances(foreground_prob: np.ndarray, hv: np.ndarray, fg_threshold: float = 0.5,
                    marker_threshold: float = 0.1, min_marker_area: int = 4, marker_opening: int = 2,
                    min_area: int = 10, sobel_ksize: int = 7, smooth_sigma: float = 1.0,
                    fill_holes: bool = True) -> np.ndarray:
    """Instances from a foreground probability map (H, W) and HV maps (2, H, W; channel 0 horizontal).

    Steps: threshold the foreground and drop specks / fill small holes (< min_area); edge energy of the
    HV maps (`edge_energy`); marker cores = foreground pixels with energy < marker_threshold, opened with
    a disc of radius marker_opening, cores < min_marker_area dropped; a foreground component left without
    any core becomes a marker itself; watershed from the markers on the smoothed energy within the
    foreground; instances < min_area removed, holes filled. Returns int32 ids 1..N.
    """
    prob = _check_prob(foreground_prob)
    hv = np.asarray(hv)
    if hv.shape != (2,) + prob.shape:
        raise UserError(f"postprocess: HV maps must have shape (2, {prob.shape[0]}, {prob.shape[1]}), "
                        f"got {hv.shape}")
    mask = prob > fg_threshold
    args = (float(marker_threshold), int(min_marker_area), int(marker_opening), int(min_area), int(sobel_ksize),
            float(smooth_sigma), bool(fill_holes))
    # Sparse tissue: only the foreground's bounding box, grown by the energy's reach, is worked on (the same labels)
    box = _grown_box(mask, _mosaic_frame(float(smooth_sigma)) + int(sobel_ksize) // 2)
    if box is None:
        return np.zeros(prob.shape, dtype=np.int32)
    if box == (slice(0, prob.shape[0]), slice(0, prob.shape[1])):
        return _hv_instances(mask, hv, *args)
    labels = np.zeros(prob.shape, dtype=np.int32)
    labels[box] = _hv_instances(mask[box], hv[(slice(None),) + box], *args)
    return labels


def _grown_box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The bounding box of `mask` grown by `margin` pixels and cut at the image border (None if `mask` is empty).

    `_hv_instances` on this box of the maps gives that box of its labels on the whole maps (and 0 elsewhere), for a
    margin of at least the mosaic's frame p plus sobel_ksize // 2: every step works on the (cleaned) foreground,
    which lies in the box, on its components' boxes, or on those grown by p (the watershed's surface), whose
    energy depends on the HV maps at most sobel_ksize // 2 pixels further: inside the box, or cut at the same image
    border (where both fill in the same way); components, markers and background regions are numbered in raster
    order, which the box keeps; a background region reaches the box's border only where it reaches the image's
    border or the outer background (the ring of the margin lies outside the foreground), so the same regions are
    holes; the filters and the opening see the same zeros beyond the foreground."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)))


def _hv_instances(mask: np.ndarray, hv: np.ndarray, marker_threshold: float, min_marker_area: int,
                  marker_opening: int, min_area: int, sobel_ksize: int, smooth_sigma: float,
                  fill_holes: bool) -> np.ndarray:
    """`hv_to_instances` from the thresholded foreground `mask`."""
    fg, components, n_comp, boxes, background = _clean_foreground_components(mask, min_area)
    if not fg.any():
        return np.zeros(mask.shape, dtype=np.int32)

    # the energy is needed on the foreground (the cores) and on the components' boxes with the frame of the
    # watershed's mosaics (`_watershed_mosaic`)
    energy = _edge_energy_on_boxes(hv, fg, sobel_ksize, boxes, _mosaic_frame(float(smooth_sigma)))
    cores = fg & (energy < marker_threshold)
    if marker_opening > 0:
        cores = _binary_opening_disk(cores, int(marker_opening))
    markers, n_markers = _label4(cores)

    # Foreground components with no marker left (e.g. a small nucleus whose core vanished) are kept whole, as
    # instance `component + n_markers` (as if that component were its own marker).
    labels, removed = _instances(energy, float(smooth_sigma), markers, n_markers, cores, components, n_comp, boxes,
                                 int(min_marker_area), int(min_area))
    if fill_holes:
        # every pixel of the cleaned foreground got an instance: the background is the cleaned mask's, unless an
        # instance was removed
        labels = _fill_instance_holes(labels, None if removed else background)
    return labels


def _instances(energy: np.ndarray, smooth_sigma: float, markers: np.ndarray, n_markers: int, cores: np.ndarray,
               components: np.ndarray, n_comp: int, boxes: list, min_marker_area: int, min_area: int
               ) -> tuple[np.ndarray, bool]:
    """`_finish(_watershed_by_component(energy, smooth_sigma, markers, components, n_comp, orphan_base=n_markers,
    boxes=boxes, min_marker_area=min_marker_area), min_area, fill_holes=False)` (the same labels) and whether an
    instance was removed, for the components of `_clean_foreground_components(..., min_area)` and `boxes` theirs
    (None for an id without pixels); `cores`: `markers > 0`.

    One lookup of the components gives the final ids, instead of the instances' lookup, then a count of their
    areas and a lookup of the renumbering over the whole image: an instance that is a whole component is never
    removed (the cleaning left no component of fewer than `min_area` pixels), so only the watershed's pieces are
    counted (on their boxes), and the renumbering is composed with the components' instances."""
    comp_of_marker, kept, single_owner, multi_ids = _markers_per_component(markers, components, n_comp,
                                                                           min_marker_area, n_markers, cores)
    size = n_markers + n_comp + 1   # ids: markers 1..n_markers, components without a marker above
    keep = np.zeros(size, bool)
    whole = single_owner[1:][np.array([b is not None for b in boxes], bool)]   # components with pixels
    keep[whole[whole > 0]] = True
    pieces = []
    if multi_ids.size:
        pieces = _watershed_mosaic(energy, smooth_sigma, markers, kept, components, multi_ids, boxes,
                                   comp_of_marker)
    removed = False
    if pieces:
        areas = np.bincount(np.concatenate([sub[own] for _, sub, own in pieces]).astype(np.int64, copy=False),
                            minlength=size)
        split = areas > 0
        if min_area > 1:
            split &= areas >= min_area
        split[0] = False
        removed = bool((areas[1:] > 0).sum() > split[1:].sum())
        keep |= split
    lut = np.cumsum(keep).astype(np.int32)
    lut[~keep] = 0
    labels = lut[single_owner][components]
    for (ys, xs), sub, own in pieces:
        np.copyto(labels[ys, xs], lut[sub], where=own)
    return labels, removed


def _watershed_by_component(energy: np.ndarray, smooth_sigma: float, markers: np.ndarray,
                            components: np.ndarray, n_comp: int, orphan_base: int | None = None,
                            boxes: list | None = None, min_marker_area: int = 0) -> np.ndarray:
    """Marker-controlled watershed on the smoothed energy, restricted to the foreground and run only inside
    the foreground components holding two or more markers (a component with one marker is that instance
    as it is). With `orphan_base`, a component without any marker is instance `component + orphan_base`
    (what marking its pixels with that id would give, without the whole-image passes). `boxes`: the
    bounding boxes of `components` (`ndi.find_objects`), if known. Markers of fewer than `min_marker_area` pixels
    count as no marker (as if `_remove_small` had set them to 0, without passing over the image for it).

    The components to split are flooded by one watershed call over a mosaic of their boxes
    (`_watershed_mosaic`), which gives the labels of one call per component's box."""
    comp_of_marker, kept, single_owner, multi_ids = _markers_per_component(markers, components, n_comp,
                                                                           min_marker_area, orphan_base)
    labels = single_owner[components]  # a component with one marker is that instance as it is
    if multi_ids.size:
        if boxes is None:
            boxes = jit_kernels.find_objects(components, n_comp)
        for (ys, xs), sub, own in _watershed_mosaic(energy, smooth_sigma, markers, kept, components, multi_ids,
                                                    boxes, comp_of_marker):
            np.copyto(labels[ys, xs], sub, where=own)
    return labels


def _markers_per_component(markers: np.ndarray, components: np.ndarray, n_comp: int, min_marker_area: int,
                           orphan_base: int | None, cores: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which markers count and where they lie, for `_watershed_by_component`: (comp_of_marker, kept, single_owner,
    multi_ids): the component of each marker id, whether it counts (at least `min_marker_area` pixels), the
    instance of each component that is one instance as it is (its one marker; with `orphan_base`, `k + orphan_base`
    for a component `k` without any; 0 for the others and for the background), the components holding two or more
    markers. `cores`: `markers > 0`, if known."""
    # Each marker lies inside one component (markers are made of foreground pixels): one pixel of it tells which,
    # e.g. the first of each run of one marker id in raster order (far fewer than the markers' pixels).
    where = np.flatnonzero(markers > 0 if cores is None else cores)
    found = markers.ravel()[where]
    comp_of_marker = np.zeros(int(found.max(initial=0)) + 1, dtype=np.int64)
    starts = np.empty(found.size, bool)
    starts[:1] = True
    np.not_equal(found[1:], found[:-1], out=starts[1:])
    starts = np.flatnonzero(starts)
    comp_of_marker[found[starts]] = components.ravel()[where[starts]]
    areas = np.bincount(found, minlength=comp_of_marker.size)
    kept = areas >= max(int(min_marker_area), 1)
    kept[0] = False
    marker_ids = np.flatnonzero(kept)
    per_comp = np.bincount(comp_of_marker[marker_ids], minlength=n_comp + 1)  # 0 for the background
    single_owner = np.zeros(n_comp + 1, dtype=np.int32)
    single_owner[comp_of_marker[marker_ids]] = marker_ids
    single_owner[per_comp != 1] = 0
    if orphan_base is not None:
        orphan = per_comp == 0
        orphan[0] = False
        single_owner[orphan] = np.flatnonzero(orphan) + int(orphan_base)
    multi_ids = np.flatnonzero(per_comp >= 2)
    return comp_of_marker, kept, single_owner, multi_ids[multi_ids > 0]


# Pixels of one mosaic at most: small enough for the watershed's heap and arrays to stay in the caches (2**17 to
# 2**18 is fastest on dense tissue: 4 mosaics of 2**22 take twice as long as 20 of 2**17), large enough that the
# calls' fixed cost no longer counts (one call per component to split took 0.3 s per 2176² crop).
_MOSAIC_PIXELS = 1 << 17


def _shelf_pack(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Places rectangles without overlap in rows ("shelves"), tallest first, each shelf as high as its first
    rectangle: (tops, lefts, height, width). The width is the one of smallest area among a few: about the square
    root of the total area (times 1 to 1.5), or the total width over 1 to 8 shelves (a few tall rectangles side by
    side; 96 % of the mosaics' pixels are tiles on dense tissue instead of 77 % with the square root alone)."""
    order = np.argsort(-heights, kind="stable").tolist()
    hs, ws = heights.tolist(), widths.tolist()

    def place(width: int, tops: np.ndarray | None = None, lefts: np.ndarray | None = None) -> int:
        y = x = shelf = 0
        for i in order:
            if x + ws[i] > width:
                y, x, shelf = y + shelf, 0, 0
            shelf = max(shelf, hs[i])
            if tops is not None:
                tops[i], lefts[i] = y, x
            x += ws[i]
        return y + shelf

    widest, root = max(ws), float(np.sqrt(float((heights * widths).sum())))
    candidates = sorted({max(widest, int(np.ceil(root * f))) for f in (1.0, 1.1, 1.2, 1.35, 1.5)}
                        | {max(widest, -(-sum(ws) // k)) for k in range(1, 9)})
    width = min(candidates, key=lambda c: (place(c) * c, c))
    tops, lefts = np.zeros(heights.size, np.int64), np.zeros(heights.size, np.int64)
    return tops, lefts, place(width, tops, lefts), width


def _mosaic_frame(smooth_sigma: float) -> int:
    """The frame of energy around each tile of `_watershed_mosaic`: max(Gaussian radius, 1) pixels."""
    radius = int(4.0 * float(smooth_sigma) + 0.5) if smooth_sigma > 0 else 0   # scipy's, truncate = 4
    return max(radius, 1)


def _watershed_mosaic(energy: np.ndarray, smooth_sigma: float, markers: np.ndarray, kept: np.ndarray,
                      components: np.ndarray, ids: np.ndarray, boxes: list, comp_of_marker: np.ndarray) -> list:
    """The watershed of each component `k` of `ids` (on the energy smoothed by a Gaussian of `smooth_sigma`, from
    the markers inside it, within its pixels): the labels of
    `segmentation.watershed(smoothed[box], markers=where(mask, markers[box], 0), mask=mask)` per component box,
    for the price of one call for all of them, as a list of (box, labels, mask) (the labels count where `mask`).

    Each component's box, with a frame of p = max(Gaussian radius, 1) pixels of the energy around it (reflected
    where the image ends, as the whole-image filter's "reflect" mode), is one tile of a mosaic; the tiles are
    smoothed together (every output of `correlate1d` is the same sum of the same inputs wherever it lies, and
    inside a box they only reach into its own frame: the box's values are those of the whole image's smoothed
    energy, bit for bit) and flooded by one watershed call whose mask is the components' pixels (a tile's frame is
    outside the mask, so no flood crosses from one tile to another).

    Why one call gives the per-box labels: skimage's watershed pops the pixel of lowest (value, age) from one heap
    (age: a counter of the pushes, 0 for all marker pixels) and labels each unlabelled neighbour of the popped
    pixel (up, left, right, down: the same offsets order in any image) with its label as it pushes it. A
    component's state changes only when one of its own pixels pops, its pushes keep their order in the counter,
    so the pops of its pixels follow the same (value, age) order as in a call of its own, except between marker
    pixels of equal value (all of age 0), which the heap leaves in an order that depends on everything in it. A
    marker pixel with no unlabelled neighbour does nothing when it pops: such pixels are kept out of the flood
    altogether (out of the mask, their marker's label written afterwards; nothing else looks at them), which also
    keeps the heap small. Marker pixels of equal value with one label are harmless (they only change the order of
    pushes that all carry that label, which stays a block of consecutive ages for the rest of the flood); so a
    component where two marker pixels with an unlabelled neighbour share a value but not a label (rare: 3 of 266
    on a 2176² crop of dense real nuclei) is flooded by a call on its own box, as is every component if the
    surface holds a NaN. `kept`: which marker ids count (`min_marker_area`)."""
    p = _mosaic_frame(smooth_sigma)
    bh = np.array([boxes[k - 1][0].stop - boxes[k - 1][0].start for k in ids.tolist()], np.int64)
    bw = np.array([boxes[k - 1][1].stop - boxes[k - 1][1].start for k in ids.tolist()], np.int64)
    # batches of tiles of at most _MOSAIC_PIXELS each (but at least one tile)
    area = (bh + 2 * p) * (bw + 2 * p)
    order = np.argsort(-(bh + 2 * p), kind="stable")
    batch, total, pieces = [], 0, []
    for i in order.tolist():
        if batch and total + area[i] > _MOSAIC_PIXELS:
            _watershed_one_mosaic(energy, smooth_sigma, p, markers, kept, components, ids[batch], boxes,
                                  comp_of_marker, pieces)
            batch, total = [], 0
        batch.append(i)
        total += int(area[i])
    _watershed_one_mosaic(energy, smooth_sigma, p, markers, kept, components, ids[batch], boxes, comp_of_marker,
                          pieces)
    return pieces


def _watershed_one_mosaic(energy: np.ndarray, smooth_sigma: float, p: int, markers: np.ndarray,
                          kept: np.ndarray, components: np.ndarray, ids: np.ndarray, boxes: list,
                          comp_of_marker: np.ndarray, pieces: list) -> None:
    """`_watershed_mosaic` for one mosaic of tiles with a frame of `p` pixels: appends its pieces to `pieces`."""
    h, w = energy.shape
    sel = [boxes[k - 1] for k in ids.tolist()]
    heights = np.array([b[0].stop - b[0].start for b in sel], np.int64) + 2 * p
    widths = np.array([b[1].stop - b[1].start for b in sel], np.int64) + 2 * p
    tops, lefts, mh, mw = _shelf_pack(heights, widths)
    surface = np.zeros((mh, mw), energy.dtype)
    mask = np.zeros((mh, mw), bool)
    seeds = np.zeros((mh, mw), markers.dtype)
    inner = []
    for k, (ys, xs), top, left in zip(ids.tolist(), sel, tops.tolist(), lefts.tolist()):
        y0, y1, x0, x1 = ys.start - p, ys.stop + p, xs.start - p, xs.stop + p
        tile = energy[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            tile = np.pad(tile, ((max(-y0, 0), max(y1 - h, 0)), (max(-x0, 0), max(x1 - w, 0))), mode="symmetric")
        surface[top:top + y1 - y0, left:left + x1 - x0] = tile
        box = (slice(top + p, top + p + ys.stop - ys.start), slice(left + p, left + p + xs.stop - xs.start))
        own = components[ys, xs] == k
        mask[box] = own
        np.copyto(seeds[box], markers[ys, xs], where=own)
        inner.append(box)
    if smooth_sigma > 0:
        surface = jit_kernels.gaussian_filter(surface, smooth_sigma)   # (scipy's, compiled)
    if kept[1:].all() or not (~kept[1:] & np.isin(comp_of_marker[1:], ids)).any():
        seeded = seeds > 0   # no marker under min_marker_area pixels here (none after an opening of radius 2)
    else:
        seeded = kept[seeds]   # markers of min_marker_area pixels or more
        seeds[~seeded] = 0
    free = mask & ~seeded
    touches = np.zeros_like(free)   # next to a pixel to flood (4-neighbours)
    touches[1:] |= free[:-1]
    touches[:-1] |= free[1:]
    touches[:, 1:] |= free[:, :-1]
    touches[:, :-1] |= free[:, 1:]
    edge = seeded & touches
    alone = np.zeros(ids.size, bool)   # tiles flooded by a call of their own
    if np.isnan(surface).any() and np.isnan(surface[mask]).any():   # (one pass first, most often the last)
        alone[:] = True
    else:
        lab = seeds[edge]
        comp = comp_of_marker[lab]
        value = surface[edge] + surface.dtype.type(0)   # equal values have equal bits, but -0.0 (+ 0 makes it 0.0)
        if value.dtype == np.float32:   # (component, value) as one key
            o = np.argsort((comp << 32) | value.view(np.uint32).astype(np.int64))
        else:
            o = np.lexsort((value, comp))
        value, lab, comp = value[o], lab[o], comp[o]
        # some two labels of one (component, value) differ <=> two neighbours in this order do
        clash = (comp[1:] == comp[:-1]) & (value[1:] == value[:-1]) & (lab[1:] != lab[:-1])
        if clash.any():
            alone = np.isin(ids, comp[1:][clash])
    flood = mask & ~(seeded & ~touches)
    for i in np.flatnonzero(alone).tolist():
        flood[inner[i]] = False
    out = segmentation.watershed(surface, markers=seeds, mask=flood)
    interior = seeded & ~touches
    out[interior] = seeds[interior]
    for i, (k, (ys, xs), box) in enumerate(zip(ids.tolist(), sel, inner)):
        own = mask[box]
        if alone[i]:
            sub = segmentation.watershed(surface[box], markers=seeds[box], mask=own)
        else:
            sub = out[box]
        pieces.append(((ys, xs), sub, own))


def binary_to_instances(foreground_prob: np.ndarray, threshold: float = 0.5, min_area: int = 10,
                        watershed: bool = False, peak_min_distance: int = 4,
                        fill_holes: bool = True) -> np.ndarray:
    """Baseline: threshold + connected components (8-connected), optionally split by a watershed on the
    distance transform (one marker per local maximum at least `peak_min_distance` apart). int32 ids 1..N.
    """
    prob = _check_prob(foreground_prob)
    fg = _clean_foreground(prob > threshold, int(min_area))
    if not fg.any():
        return np.zeros(prob.shape, dtype=np.int32)
    components, _ = ndi.label(fg, structure=np.ones((3, 3), dtype=bool))
    if not watershed:
        return _finish(components, int(min_area), fill_holes)
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    dist = ndi.gaussian_filter(dist, 1.0)
    peaks = peak_local_max(dist, min_distance=max(int(peak_min_distance), 1), labels=components,
                           exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Merge peaks of one plateau (several maxima a pixel apart) into one marker.
    markers, n_markers = _label4(ndi.binary_dilation(markers > 0, iterations=1) & fg)
    # A component without any peak keeps its own id (nothing is lost).
    has_marker = np.zeros(int(components.max()) + 1, dtype=bool)
    has_marker[components[markers > 0]] = True
    orphan = ~has_marker[components] & fg
    if orphan.any():
        markers = np.where(orphan, components + n_markers, markers)
    labels = segmentation.watershed(-dist, markers=markers, mask=fg, connectivity=2)
    return _finish(labels, int(min_area), fill_holes)


def postprocess(foreground_prob: np.ndarray, hv: np.ndarray | None,
                config: PostprocessConfig | None = None) -> np.ndarray:
    """Instances from the network's maps with the method and parameters of `config` (int32, ids 1..N)."""
    config = config or PostprocessConfig()
    config.validate()
    if config.mode == "hv":
        if hv is None:
            raise UserError("postprocess mode 'hv': the model gives no HV maps (it has a binary head); "
                            "use mode 'binary'")
        return hv_to_instances(foreground_prob, hv, fg_threshold=config.fg_threshold,
                               marker_threshold=config.marker_threshold,
                               min_marker_area=config.min_marker_area, marker_opening=config.marker_opening,
                               min_area=config.min_area, sobel_ksize=config.sobel_ksize,
                               smooth_sigma=config.smooth_sigma, fill_holes=config.fill_holes)
    return binary_to_instances(foreground_prob, threshold=config.fg_threshold, min_area=config.min_area,
                               watershed=config.watershed, peak_min_distance=config.peak_min_distance,
                               fill_holes=config.fill_holes)
