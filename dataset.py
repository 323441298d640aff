"""NuInsSeg data: discovery and loading, cross-validation folds, HoVer-Net style targets, augmentation,
and the torch Dataset / DataLoader used for training.

Layout read by `discover_nuinsseg` (the layout of the published dataset, see docs/data.md):

    <data_dir>/<organ>/tissue images/<name>.png          H&E tile (RGB; RGBA and grayscale are converted)
    <data_dir>/<organ>/label masks modify/<name>.tif     instance labels, 0 = background, ids as stored
    <data_dir>/<organ>/vague areas/**/<name>.png         optional ambiguous-region mask (non-zero = ambiguous)

Ground-truth ids are never relabelled: in NuInsSeg one nucleus may consist of several disconnected pieces.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb as _HED_FROM_RGB, rgb_from_hed as _RGB_FROM_HED

import image_io
import utils
from utils import UserError, read_json, write_json

log = logging.getLogger(__name__)

# Microns per pixel of the NuInsSeg tiles. The dataset paper (Mahbod et al., "NuInsSeg: A fully annotated
# dataset for nuclei instance segmentation in H&E-stained histological images", Scientific Data 11, 295
# (2024), https://www.nature.com/articles/s41597-024-03117-2) states that the whole-slide images were
# scanned with a TissueFAXS system (TissueGnostics) at 40x and cut into 512x512 tiles. The pixel size
# itself could not be confirmed from the stored copies of the paper available to us (searched the paper
# page, its arXiv version 2308.01760 and the authors' repository masih4/NuInsSeg), so this value is an
# ASSUMPTION: 0.25 um/px, the usual pixel size of 40x brightfield scans. Check it against the paper's
# "Methods" section before using it for absolute size measurements.
NUINSSEG_MPP: float = 0.25

# The published dataset's file list, as far as `evaluate` needs to recognise it (its "comparable" flag):
# 665 images in these 31 organ folders, each image named after its folder (`human bladder` ->
# `human_bladder_01.png`), with the paper's folds (5, seed 19).
NUINSSEG_NUM_IMAGES = 665
NUINSSEG_TISSUES = (
    "human bladder", "human brain", "human cardia", "human cerebellum", "human epiglottis", "human jejunum",
    "human kidney", "human liver", "human lung", "human melanoma", "human muscle", "human oesophagus",
    "human pancreas", "human peritoneum", "human placenta", "human pylorus", "human rectum",
    "human salivory gland", "human spleen", "human testis", "human tongue", "human tonsile",
    "human umbilical cord", "mouse fat (white and brown)_subscapula", "mouse femur", "mouse heart",
    "mouse kidney", "mouse liver", "mouse muscle_tibia", "mouse spleen", "mouse thymus")
PAPER_NUM_FOLDS, PAPER_FOLD_SEED = 5, 19

IMAGE_DIR = "tissue images"
LABEL_DIR = "label masks modify"
LABEL_DIR_FALLBACK = "label masks"
VAGUE_DIR = "vague areas"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
VAGUE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")

FOLDS_FORMAT = "nuinsseg-folds"


# ----------------------------------------------------------------------------------------------
# Discovery and loading
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One image of the dataset and its annotation files."""

    image_path: Path
    label_path: Path
    vague_path: Path | None
    tissue: str  # organ folder name, e.g. "human bladder"
    name: str  # file stem, e.g. "human_bladder_01"
    rel_path: str  # "<organ>/tissue images/<file>", POSIX separators


def files_by_stem(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise UserError(f"{path}: two {what} files share the name {path.stem!r} "
                            f"({found[path.stem].name} and {path.name}); keep one")
        found[path.stem] = path
    return found


def _vague_masks(organ_dir: Path) -> dict[str, Path]:
    """stem -> ambiguous-region mask under `<organ>/vague areas/` (any depth; `mask binary` preferred)."""
    root = organ_dir / VAGUE_DIR
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() in VAGUE_SUFFIXES)
    # Files in a folder called "mask binary" win over any other copy with the same stem.
    candidates.sort(key=lambda p: (p.parent.name != "mask binary", str(p)))
    for path in candidates:
        found.setdefault(path.stem, path)
    return found


def discover_nuinsseg(data_dir: str | os.PathLike) -> list[Sample]:
    """All images of a NuInsSeg-layout folder, paired with their label masks, sorted by `rel_path`."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"{data_dir}: data directory not found")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: not a directory (expected the NuInsSeg root folder)")
    expected = (f"expected the NuInsSeg layout '<organ>/{IMAGE_DIR}/<name>.png' with "
                f"'<organ>/{LABEL_DIR}/<name>.tif'")
    if (data_dir / IMAGE_DIR).is_dir():
        raise UserError(f"{data_dir}: this is a single organ folder; pass its parent folder ({expected})")
    entries = [p for p in data_dir.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UserError(f"{data_dir}: directory is empty ({expected})")
    organ_dirs = sorted(p for p in entries if p.is_dir() and (p / IMAGE_DIR).is_dir())
    if not organ_dirs:
        raise UserError(f"{data_dir}: does not look like a NuInsSeg dataset: no '<organ>/{IMAGE_DIR}' "
                        f"folder found ({expected})")

    samples: list[Sample] = []
    for organ_dir in organ_dirs:
        tissue = organ_dir.name
        label_dir = organ_dir / LABEL_DIR
        if not label_dir.is_dir():
            if (organ_dir / LABEL_DIR_FALLBACK).is_dir():
                label_dir = organ_dir / LABEL_DIR_FALLBACK
                log.warning("%s: no '%s' folder, using '%s' (overlapping nuclei may carry extra ids there)",
                            organ_dir, LABEL_DIR, LABEL_DIR_FALLBACK)
            else:
                raise UserError(f"{organ_dir}: has '{IMAGE_DIR}' but no '{LABEL_DIR}' (or '{LABEL_DIR_FALLBACK}') "
                                f"folder with the instance label masks")
        images = files_by_stem(organ_dir / IMAGE_DIR, IMAGE_SUFFIXES, "image")
        labels = files_by_stem(label_dir, LABEL_SUFFIXES, "label mask")
        vague = _vague_masks(organ_dir)
        for stem, image_path in images.items():
            if stem not in labels:
                raise UserError(f"{image_path}: no label mask for this image (expected "
                                f"{label_dir / (stem + '.tif')})")
        for stem, label_path in labels.items():
            if stem not in images:
                raise UserError(f"{label_path}: label mask without an image (expected "
                                f"{organ_dir / IMAGE_DIR / (stem + '.png')})")
        if not images:
            log.warning("%s: no images in '%s', skipped", organ_dir, IMAGE_DIR)
        for stem, image_path in images.items():
            samples.append(Sample(image_path=image_path, label_path=labels[stem], vague_path=vague.get(stem),
                                  tissue=tissue, name=stem, rel_path=f"{tissue}/{IMAGE_DIR}/{image_path.name}"))
    if not samples:
        raise UserError(f"{data_dir}: no images found ({expected})")
    samples.sort(key=lambda s: s.rel_path)
    log.info("%s: %d images from %d tissues (%d with ambiguous-region masks)", data_dir, len(samples),
             len({s.tissue for s in samples}), sum(s.vague_path is not None for s in samples))
    return samples


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an H&E image as uint8 RGB (H, W, 3): `image_io.read_image`, the one reader of train, evaluate,
    demo and predict (grey and palette expanded, alpha composited over white, 16-bit and float rejected)."""
    return image_io.read_image(path)


def _read_mask_array(path: Path, what: str) -> np.ndarray:
    """The pixel array of a mask file (TIFF through tifffile, PNG & co. through PIL); UserError naming the file."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:  # tifffile/PIL raise many types for broken files
        raise UserError(f"{path}: unreadable or truncated {what} ({type(e).__name__}: {e})") from None


def read_label_mask(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label mask as int32 (H, W) with the stored ids unchanged."""
    path = Path(path)
    array = _read_mask_array(path, "label mask")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim != 2:
        raise UserError(f"{path}: not an instance label image (shape {array.shape}; expected one channel "
                        f"(H, W) with 0 = background and one integer id per nucleus)")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: not an integer label image (dtype {array.dtype}; expected integer ids, "
                        f"0 = background)")
    if array.size and array.min() < 0:
        raise UserError(f"{path}: label mask has negative values")
    if array.size and int(array.max()) > np.iinfo(np.int32).max:
        raise UserError(f"{path}: label ids larger than {np.iinfo(np.int32).max} are not supported")
    return array.astype(np.int32, copy=False)


def read_vague_mask(path: str | os.PathLike) -> np.ndarray:
    """Read an ambiguous-region mask as bool (H, W): non-zero = ambiguous."""
    path = Path(path)
    array = _read_mask_array(path, "ambiguous-region mask")
    if array.ndim == 3:
        array = array[..., :3].max(axis=2) if array.shape[2] <= 4 else array.max(axis=0)
    if array.ndim != 2:
        raise UserError(f"{path}: ambiguous-region mask must be a 2-D image, got shape {array.shape}")
    return array > 0


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image uint8 (H,W,3), labels int32 (H,W) with ids as stored, ambiguous mask bool (H,W) or None)."""
    image = read_image(sample.image_path)
    labels = read_label_mask(sample.label_path)
    if labels.shape != image.shape[:2]:
        raise UserError(f"{sample.label_path}: label mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                        f"{sample.image_path.name} is {image.shape[1]}x{image.shape[0]}")
    vague = None
    if sample.vague_path is not None:
        vague = read_vague_mask(sample.vague_path)
        if vague.shape != image.shape[:2]:
            raise UserError(f"{sample.vague_path}: ambiguous-region mask is {vague.shape[1]}x{vague.shape[0]} "
                            f"but its image {sample.image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return image, labels, vague


def is_nuinsseg_file_list(samples: Sequence[Sample]) -> bool:
    """True when `samples` look like the published NuInsSeg dataset: 665 images, all 31 organ folders and
    no other, every image named `<organ words joined by _>_<id>` after its folder (the synthetic sample
    data and a subset never are)."""
    if len(samples) != NUINSSEG_NUM_IMAGES or {s.tissue for s in samples} != set(NUINSSEG_TISSUES):
        return False
    for s in samples:
        prefix = s.tissue.split(" ", 1)[0] + "_"  # e.g. human_ / mouse_
        if not (s.name.startswith(prefix) and s.rel_path == f"{s.tissue}/{IMAGE_DIR}/{s.image_path.name}"):
            return False
    return True


def validate_dataset(samples: Sequence[Sample]) -> None:
    """Check every image, label mask and ambiguous-region mask of `samples` from its file header (size,
    channels, sample type) and for completeness, without decoding pixels (`image_io.image_header`): what
    `train` and `parameter_search` call before they write anything. The first problem is a UserError naming
    the file (the messages of `load_sample`, which still checks the values: negative or huge label ids)."""
    from tqdm import tqdm

    for s in tqdm(samples, desc="checking data", unit="img", leave=False, disable=len(samples) < 50):
        image = image_io.image_info(s.image_path)
        label = image_io.image_header(s.label_path)
        if label.channels != 1 and not label.palette:  # a palette mask's indices are its ids
            raise UserError(f"{s.label_path}: not an instance label image ({label.channels} channels; expected "
                            f"one channel (H, W) with 0 = background and one integer id per nucleus)")
        if label.kind not in ("uint", "int") or label.bits == 1:
            kind = "bool" if label.bits == 1 else f"{label.kind}{label.bits}"
            raise UserError(f"{s.label_path}: not an integer label image (dtype {kind}; expected integer ids, "
                            f"0 = background)")
        if (label.height, label.width) != (image.height, image.width):
            raise UserError(f"{s.label_path}: label mask is {label.width}x{label.height} but its image "
                            f"{s.image_path.name} is {image.width}x{image.height}")
        if s.vague_path is not None:
            vague = image_io.image_header(s.vague_path)
            if (vague.height, vague.width) != (image.height, image.width):
                raise UserError(f"{s.vague_path}: ambiguous-region mask is {vague.width}x{vague.height} "
                                f"but its image {s.image_path.name} is {image.width}x{image.height}")


# ----------------------------------------------------------------------------------------------
# Cross-validation folds
# ----------------------------------------------------------------------------------------------
def kfold_splits(num_samples: int, num_folds: int = 5, seed: int = 19) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold splits identical to scikit-learn's `KFold(num_folds, shuffle=True, random_state=seed)`.

    The indices are shuffled once with `np.random.RandomState(seed)`, the shuffled order is cut into
    consecutive test folds (the first `n % k` folds one larger); like scikit-learn, both the training and
    the test indices of a fold are returned in ascending order. NuInsSeg's paper protocol is 5 folds with seed 19 over the images in
    `discover_nuinsseg` order.
    """
    num_samples, num_folds = int(num_samples), int(num_folds)
    if num_folds < 2:
        raise UserError(f"--num_folds {num_folds}: need at least 2 folds")
    if num_samples < num_folds:
        raise UserError(f"--num_folds {num_folds}: only {num_samples} images, cannot make {num_folds} folds")
    order = np.arange(num_samples)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, num_samples // num_folds, dtype=int)
    sizes[: num_samples % num_folds] += 1
    splits = []
    start = 0
    for size in sizes:
        test = order[start:start + size]
        in_test = np.zeros(num_samples, dtype=bool)
        in_test[test] = True
        splits.append((np.flatnonzero(~in_test), np.flatnonzero(in_test)))
        start += size
    return splits


def validation_split(train_idx: Sequence[int], tissues: Sequence[str], fraction: float = 0.1,
                     seed: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of a fold's training indices, stratified by tissue.

    `tissues[i]` is the tissue of sample `i` (indexed like the full sample list). About `fraction` of the
    training images go to validation (at least one when there are two or more training images, never all
    of them); each tissue contributes in proportion to its share of the training set (largest-remainder
    rounding, ties broken by the seeded generator). Returns (train, val) as sorted index arrays; only the
    given training indices are used, so the test fold is never touched.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64).ravel()
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val_fraction {fraction}: must be in [0, 1)")
    if len(np.unique(train_idx)) != len(train_idx):
        raise ValueError("validation_split: train_idx contains duplicates")
    if len(train_idx) and (train_idx.min() < 0 or train_idx.max() >= len(tissues)):
        raise ValueError("validation_split: train_idx out of range of tissues")
    n = len(train_idx)
    if fraction == 0.0 or n < 2:
        return np.sort(train_idx), np.zeros(0, dtype=np.int64)
    num_val = min(n - 1, max(1, int(round(fraction * n))))
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in np.sort(train_idx):
        groups.setdefault(str(tissues[i]), []).append(int(i))
    names = sorted(groups)
    quotas = np.array([num_val * len(groups[t]) / n for t in names])
    take = np.floor(quotas).astype(int)
    remainder = quotas - take
    left = num_val - int(take.sum())
    if left > 0:
        # largest remainder first; random tie break (e.g. many tissues with one or two images each)
        order = np.lexsort((rng.random(len(names)), -np.round(remainder, 12)))
        take[order[:left]] += 1
    val: list[int] = []
    for name, k in zip(names, take):
        if k > 0:
            members = np.array(groups[name])
            val.extend(rng.choice(members, size=int(k), replace=False).tolist())
    val_arr = np.sort(np.array(val, dtype=np.int64))
    train_arr = np.setdiff1d(train_idx, val_arr)
    return train_arr, val_arr


def make_folds(samples: Sequence[Sample], num_folds: int = 5, seed: int = 19, val_fraction: float = 0.1,
               val_seed: int | None = None) -> list[dict[str, list[int]]]:
    """The project's fold protocol: `kfold_splits` (paper-exact) + a tissue-stratified validation carve-out
    from each fold's training part. Returns `[{"fold", "train", "val", "test"}, ...]` with int lists."""
    tissues = [s.tissue for s in samples]
    folds = []
    for k, (train, test) in enumerate(kfold_splits(len(samples), num_folds, seed)):
        tr, va = validation_split(train, tissues, val_fraction, seed if val_seed is None else val_seed + k)
        folds.append({"fold": k, "train": tr.tolist(), "val": va.tolist(), "test": test.tolist()})
    return folds


def write_folds_json(path: str | os.PathLike, samples: Sequence[Sample], folds: Sequence[dict[str, Any]],
                     seed: int = 19, num_folds: int | None = None) -> Path:
    """Atomically write the folds. The file lists the images by relative path (index = position), so a
    run can be checked against (or reproduced on) the same data; fold members are index lists."""
    images = [s.rel_path for s in samples]
    out_folds = []
    for f in folds:
        entry = {"fold": int(f["fold"])}
        for key in ("train", "val", "test"):
            entry[key] = [int(i) for i in f.get(key, [])]
        out_folds.append(entry)
    obj = {"format": FOLDS_FORMAT, "version": 1, "seed": int(seed),
           "num_folds": int(num_folds if num_folds is not None else len(out_folds)),
           "num_images": len(images), "images": images, "folds": out_folds}
    _check_folds(obj, Path(path))
    return write_json(path, obj)


def _check_folds(obj: Any, path: Path) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) or not isinstance(obj.get("folds"), list):
        raise UserError(f"{path}: not a folds file (expected keys 'images' and 'folds')")
    n = len(obj["images"])
    for f in obj["folds"]:
        if not isinstance(f, dict) or not all(k in f for k in ("fold", "train", "val", "test")):
            raise UserError(f"{path}: every fold needs 'fold', 'train', 'val' and 'test'")
        sets = {}
        for key in ("train", "val", "test"):
            values = f[key]
            if not isinstance(values, list) or not all(isinstance(i, int) and 0 <= i < n for i in values):
                raise UserError(f"{path}: fold {f['fold']} '{key}' must be a list of image indices in 0..{n - 1}")
            sets[key] = set(values)
        if sets["test"] & (sets["train"] | sets["val"]) or sets["train"] & sets["val"]:
            raise UserError(f"{path}: fold {f['fold']} train/val/test overlap")


def read_folds_json(path: str | os.PathLike) -> dict:
    """Read and check a folds file: dict with `images` (relative paths), `folds`, `seed`, `num_folds`."""
    path = Path(path)
    obj = read_json(path)
    _check_folds(obj, path)
    obj.setdefault("seed", None)
    obj.setdefault("num_folds", len(obj["folds"]))
    return obj


def check_folds_match(folds: dict, samples: Sequence[Sample], path: str | os.PathLike = "folds") -> None:
    """UserError unless the folds file lists exactly the images of `samples`, in the same order."""
    expected = [s.rel_path for s in samples]
    if list(folds["images"]) != expected:
        missing = sorted(set(folds["images"]) - set(expected))
        extra = sorted(set(expected) - set(folds["images"]))
        detail = (f"{len(missing)} listed images not in the data (e.g. {missing[:1]}), "
                  f"{len(extra)} data images not listed (e.g. {extra[:1]})") if missing or extra else "order differs"
        raise UserError(f"{path}: folds were made for a different image list ({detail})")


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------
def hv_targets(labels: np.ndarray) -> np.ndarray:
    """Horizontal/vertical distance maps (HoVer-Net convention), float32 (2, H, W).

    For every instance id: offset of each pixel from the instance's centre of mass (x in channel 0,
    y in channel 1; all pieces of a multi-piece id together), negative offsets divided by their largest
    magnitude and positive ones by their largest value, so values lie in [-1, 1]; background is 0.
    The centre is not rounded, so a symmetric nucleus gets symmetric maps.
    Vectorised over instances: a few bincounts and one `find_objects` pass, no per-instance masks.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"hv_targets: expected a 2-D label map, got shape {labels.shape}")
    h, w = labels.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    flat = labels.reshape(-1)
    pix = np.flatnonzero(flat)
    if pix.size == 0:
        return out
    ids = flat[pix].astype(np.int64)
    max_id = int(ids.max())
    if max_id > 4 * pix.size + 65536:  # sparse huge ids: compact them (values are never exposed)
        _, ids = np.unique(ids, return_inverse=True)
        ids = ids.astype(np.int64) + 1
        compact = np.zeros(h * w, dtype=np.int64)
        compact[pix] = ids
        lab = compact.reshape(h, w)
        max_id = int(ids.max())
    else:
        lab = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)
    ys, xs = np.divmod(pix, w)
    counts = np.bincount(ids, minlength=max_id + 1).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    cx = np.bincount(ids, weights=xs, minlength=max_id + 1) / safe
    cy = np.bincount(ids, weights=ys, minlength=max_id + 1) / safe
    # bounding boxes give each instance's extreme x / y in one C pass
    x0 = np.zeros(max_id + 1)
    x1 = np.zeros(max_id + 1)
    y0 = np.zeros(max_id + 1)
    y1 = np.zeros(max_id + 1)
    for i, sl in enumerate(ndimage.find_objects(lab, max_label=max_id), start=1):
        if sl is not None:
            y0[i], y1[i] = sl[0].start, sl[0].stop - 1
            x0[i], x1[i] = sl[1].start, sl[1].stop - 1
    for channel, coord, centre, lo, hi in ((0, xs, cx, x0, x1), (1, ys, cy, y0, y1)):
        # per-instance 1/scale for the negative and the positive side, interleaved so one gather serves both
        span = np.stack([centre - lo, hi - centre], axis=1)
        inv = np.divide(1.0, span, out=np.zeros_like(span), where=span > 1e-9).astype(np.float32).ravel()
        d = coord.astype(np.float32)
        d -= centre.astype(np.float32)[ids]
        d *= inv[2 * ids + (d >= 0)]
        np.clip(d, -1.0, 1.0, out=d)
        out[channel].reshape(-1)[pix] = d
    return out


def foreground_target(labels: np.ndarray) -> np.ndarray:
    """Binary foreground target, float32 (H, W): labels > 0."""
    return (np.asarray(labels) > 0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------
def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a uint8 RGB image to `size` (int = square, or (H, W)): bilinear; when shrinking the filter
    widens with the scale factor (antialiased, area-like), so small structures are not aliased."""
    from PIL import Image

    h, w = _size_hw(size)
    if image.shape[:2] == (h, w):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample=Image.BILINEAR)
    return np.asarray(resized)


def resize_labels(labels: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (ids and dtype preserved; pixel-centre sampling)."""
    h, w = _size_hw(size)
    in_h, in_w = labels.shape[:2]
    if (in_h, in_w) == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * (in_h / h)).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (in_w / w)).astype(np.int64), in_w - 1)
    return labels[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
# Ruifrok & Johnston stain vectors (from skimage.color) for optical density <-> H, E, DAB amounts.
_HED_FROM_RGB32 = np.asarray(_HED_FROM_RGB, dtype=np.float32)
_RGB_FROM_HED32 = np.asarray(_RGB_FROM_HED, dtype=np.float32)


@dataclass
class AugmentConfig:
    """Training augmentation. Geometric transforms are applied to image and labels identically;
    photometric ones to the image only. Every random draw comes from the generator passed to `augment`."""

    flip: bool = True  # random horizontal and vertical flips
    rotate: bool = True  # random 90-degree rotations
    stain_jitter: float = 0.05  # H&E amounts scaled by U(1-s, 1+s) and shifted by U(-s, s)/4 OD
    color_jitter: float = 0.1  # brightness, contrast, saturation factors in U(1-c, 1+c)
    blur_prob: float = 0.1  # probability of a Gaussian blur
    blur_sigma: float = 1.0  # blur sigma drawn from U(0.3, blur_sigma) pixels
    noise_std: float = 3.0  # Gaussian noise, std drawn from U(0, noise_std) (0-255 scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AugmentConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"augmentation config: unknown keys {unknown}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        return cls(flip=False, rotate=False, stain_jitter=0.0, color_jitter=0.0, blur_prob=0.0, noise_std=0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.flip or self.rotate or self.stain_jitter > 0 or self.color_jitter > 0
                    or self.blur_prob > 0 or self.noise_std > 0)

    def validate(self) -> None:
        for name, hi in (("stain_jitter", 1.0), ("color_jitter", 1.0), ("blur_prob", 1.0)):
            value = getattr(self, name)
            if not 0.0 <= value <= hi:
                raise UserError(f"--{name} {value}: must be between 0 and {hi}")
        if self.blur_sigma < 0.3:
            raise UserError(f"--blur_sigma {self.blur_sigma}: must be at least 0.3")
        if not 0.0 <= self.noise_std <= 64.0:
            raise UserError(f"--noise_std {self.noise_std}: must be between 0 and 64")


def add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line switches for `AugmentConfig` (read back with `augment_config_from_args`)."""
    d = AugmentConfig()
    g = parser.add_argument_group("augmentation (training only)")
    g.add_argument("--no_augment", action="store_true", help="switch all augmentation off")
    g.add_argument("--no_flip", action="store_true", help="no random horizontal/vertical flips")
    g.add_argument("--no_rotate", action="store_true", help="no random 90-degree rotations")
    g.add_argument("--stain_jitter", type=float, default=d.stain_jitter,
                   help="H&E stain jitter strength in HED colour space (0 = off)")
    g.add_argument("--color_jitter", type=float, default=d.color_jitter,
                   help="brightness/contrast/saturation jitter (0 = off)")
    g.add_argument("--blur_prob", type=float, default=d.blur_prob, help="probability of a Gaussian blur (0 = off)")
    g.add_argument("--blur_sigma", type=float, default=d.blur_sigma, help="largest Gaussian blur sigma (pixels)")
    g.add_argument("--noise_std", type=float, default=d.noise_std,
                   help="largest Gaussian noise std on the 0-255 scale (0 = off)")


def augment_config_from_args(args: argparse.Namespace) -> AugmentConfig:
    if getattr(args, "no_augment", False):
        return AugmentConfig.disabled()
    d = AugmentConfig()
    cfg = AugmentConfig(flip=not getattr(args, "no_flip", False), rotate=not getattr(args, "no_rotate", False),
                        stain_jitter=float(getattr(args, "stain_jitter", d.stain_jitter)),
                        color_jitter=float(getattr(args, "color_jitter", d.color_jitter)),
                        blur_prob=float(getattr(args, "blur_prob", d.blur_prob)),
                        blur_sigma=float(getattr(args, "blur_sigma", d.blur_sigma)),
                        noise_std=float(getattr(args, "noise_std", d.noise_std)))
    cfg.validate()
    return cfg


def _stain_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """rgb float32 0..255 -> jittered rgb, via optical density and the HED stain matrix."""
    od = -np.log((rgb + 1.0) / 256.0)
    hed = od @ _HED_FROM_RGB32
    alpha = rng.uniform(1.0 - strength, 1.0 + strength, size=3).astype(np.float32)
    beta = (rng.uniform(-strength, strength, size=3) / 4.0).astype(np.float32)
    hed = hed * alpha + beta
    od = hed @ _RGB_FROM_HED32
    return 256.0 * np.exp(-od) - 1.0


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig | None) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transform (image uint8 (H,W,3), labels (H,W)); returns new arrays. Label ids unchanged."""
    if cfg is None or not cfg.enabled:
        return image, labels
    if cfg.flip:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:
            image, labels = image[::-1], labels[::-1]
    if cfg.rotate:
        k = int(rng.integers(0, 4))
        if k:
            image, labels = np.rot90(image, k, axes=(0, 1)), np.rot90(labels, k, axes=(0, 1))
    labels = np.ascontiguousarray(labels)
    photometric = cfg.stain_jitter > 0 or cfg.color_jitter > 0 or cfg.blur_prob > 0 or cfg.noise_std > 0
    if not photometric:
        return np.ascontiguousarray(image), labels
    x = image.astype(np.float32)
    if cfg.stain_jitter > 0:
        x = _stain_jitter(x, rng, cfg.stain_jitter)
    if cfg.color_jitter > 0:
        c = cfg.color_jitter
        brightness, contrast, saturation = rng.uniform(1.0 - c, 1.0 + c, size=3)
        x = x * np.float32(brightness)
        gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = (x - gray.mean()) * np.float32(contrast) + gray.mean()
        gray = (gray - gray.mean()) * np.float32(contrast) + gray.mean()
        x = gray[..., None] + (x - gray[..., None]) * np.float32(saturation)
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        sigma = float(rng.uniform(0.3, cfg.blur_sigma))
        x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0))
    if cfg.noise_std > 0:
        std = float(rng.uniform(0.0, cfg.noise_std))
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8), labels


# ----------------------------------------------------------------------------------------------
# torch Dataset and DataLoader
# ----------------------------------------------------------------------------------------------
# The colour put on ignored pixels of a training image: SAM's pixel mean (rounded), which the network's
# normalisation maps to ~0, the value of SAM's own padding.
IGNORE_FILL = (124, 116, 104)


def apply_ignore(image: np.ndarray, labels: np.ndarray, ignore: np.ndarray | None, blank_image: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(image with `IGNORE_FILL` under `ignore` (unless not `blank_image`), labels with 0 there); copies when
    the mask has a pixel, the inputs themselves otherwise. What training does with an ignore mask before and
    after augmentation and resizing, so that no part of a training item outside the mask depends on the
    pixels under it."""
    if ignore is None or not ignore.any():
        return image, labels
    labels = labels.copy()
    labels[ignore] = 0
    if blank_image:
        image = image.copy()
        image[ignore] = IGNORE_FILL
    return image, labels


def check_input_size(input_size: int, option: str = "--input_size") -> int:
    size = int(input_size)
    if size < 64 or size % 64:
        raise UserError(f"{option} {input_size}: must be a positive multiple of 64 (e.g. 512 or 1024)")
    return size


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """Store labels in the smallest unsigned dtype that holds their ids (values unchanged)."""
    top = int(labels.max()) if labels.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    return labels


try:
    import torch
    from torch.utils.data import DataLoader, Dataset
except ImportError:  # pragma: no cover - torch is a hard requirement of training only
    torch = None
    Dataset = object  # type: ignore[assignment,misc]


class NucleiDataset(Dataset):
    """Training/evaluation items at the network resolution `input_size`.

    Every image and label file is decoded once into an in-memory cache (in the constructor with a
    progress bar, or lazily when `preload=False`); DataLoader worker processes started by fork share it.
    With an `AugmentConfig`, the randomness of item `i` depends only on (seed, epoch, i); call
    `set_epoch(epoch)` before iterating a loader each epoch (the epoch lives in shared memory, so
    persistent workers see it too).

    Item: {"image": uint8 (3,S,S), "foreground": float32 (1,S,S), "hv": float32 (2,S,S),
    "valid": float32 (1,S,S), "index": int}. Targets are computed after augmentation and resizing.

    Ignore masks (a sample's `vague_path`: NuInsSeg's ambiguous areas, the folders layout's `ignore/`) take
    no part in training: `valid` is 0 there (the loss leaves those pixels out, `nuclei_model.compute_loss`),
    the labels are 0 there before any target is computed (a nucleus cut by the mask gets the targets of its
    visible part) and the image is replaced by `IGNORE_FILL` there, before augmentation (whose colour
    statistics and blur then see only that constant) and again after resizing; the mask follows every
    geometric transform and resize of the labels. So nothing of an item outside the mask depends on the image
    or labels under it (see `apply_ignore`). `blank_image=False` (validation and test scoring, which must see
    the image as `predict` and `evaluate` do) keeps the image as it is; the labels and `valid` are the same.
    """

    def __init__(self, samples: Sequence[Sample], input_size: int = 1024, augment: AugmentConfig | None = None,
                 seed: int = 0, preload: bool = True, blank_image: bool = True) -> None:
        self.samples = list(samples)
        self.blank_image = bool(blank_image)
        self.input_size = check_input_size(input_size)
        self.augment = augment if (augment is not None and augment.enabled) else None
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._cache: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.samples)
        self._ignore: list[np.ndarray | None] = [None] * len(self.samples)  # bool (H, W), None = no mask
        if preload:
            self.preload()

    def preload(self) -> None:
        """Decode every file not yet cached (tqdm progress bar)."""
        from tqdm import tqdm

        todo = [i for i, c in enumerate(self._cache) if c is None]
        for i in tqdm(todo, desc="loading images", unit="img", disable=len(todo) < 2, leave=False):
            self._load(i)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache[index]
        if cached is None:
            image, labels, ignore = load_sample(self.samples[index])
            image, labels = apply_ignore(image, labels, ignore, self.blank_image)
            self._ignore[index] = ignore if ignore is not None and ignore.any() else None
            cached = (image, _compact_labels(labels))
            self._cache[index] = cached
        return cached

    def _augmented(self, image: np.ndarray, labels: np.ndarray, ignore: np.ndarray | None,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`augment` with the ignore mask riding along with the labels (same flips and rotations)."""
        if self.augment is None:
            return image, labels, ignore
        if ignore is None:
            return (*augment(image, labels, rng, self.augment), None)
        stacked = np.stack([labels, ignore.astype(labels.dtype)], axis=-1)
        image, stacked = augment(image, stacked, rng, self.augment)
        return image, np.ascontiguousarray(stacked[..., 0]), stacked[..., 1] > 0

    def _finish(self, image: np.ndarray, labels: np.ndarray, ignore: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Resize to the input size (the mask by nearest neighbour, like the labels) and blank the mask."""
        size = self.input_size
        image, labels = resize_image(image, size), resize_labels(labels, size)
        if ignore is not None:
            ignore = resize_labels(ignore, size)
            image, labels = apply_ignore(image, labels, ignore, self.blank_image)
        return image, labels, ignore

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def item_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (S,S,3), labels (S,S)) after augmentation and resizing."""
        return self.item_arrays_masked(index)[:2]

    def item_arrays_masked(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(image uint8 (S,S,3), labels (S,S), ignore bool (S,S) or None) after augmentation and resizing;
        image and labels blanked under the mask (`apply_ignore`)."""
        image, labels = self._load(index)
        ignore = self._ignore[index]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            image, labels, ignore = self._augmented(image, labels, ignore, rng)
        return self._finish(image, labels, ignore)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image, labels, ignore = self.item_arrays_masked(index)
        valid = np.ones((1,) + labels.shape, np.float32) if ignore is None else (~ignore)[None].astype(np.float32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "foreground": torch.from_numpy(foreground_target(labels)[None]),
            "hv": torch.from_numpy(hv_targets(labels)),
            "valid": torch.from_numpy(valid),
            "index": index,
        }


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive NumPy/Python seeds from the worker's torch seed."""
    import random

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset: "Dataset", batch_size: int, shuffle: bool, num_workers: int, seed: int, device: Any,
                sampler: Any = None, drop_last: bool = False) -> "DataLoader":
    """DataLoader with a seeded generator and worker seeding, pinned memory on CUDA, persistent workers."""
    if int(batch_size) < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    if int(num_workers) < 0:
        raise UserError(f"--num_workers {num_workers}: must be 0 or more")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    device_type = torch.device(device).type if device is not None else "cpu"
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle) if sampler is None else False,
        sampler=sampler,
        num_workers=int(num_workers),
        pin_memory=device_type == "cuda",
        drop_last=bool(drop_last),
        generator=generator,
        worker_init_fn=seed_worker,
        persistent_workers=int(num_workers) > 0,
    )


# ----------------------------------------------------------------------------------------------
# The generic "folders" layout (any dataset: MoNuSeg, CPM, QuPath exports via import_annotations)
# ----------------------------------------------------------------------------------------------
# <data_dir>/images/<stem>.(png|jpg|tif|tiff)      H&E image of any size
# <data_dir>/labels/<stem>.(tif|tiff|png)          instance ids, 0 = background (uint8/16/32)
# <data_dir>/ignore/<stem>.png                     optional: non-zero = excluded from scoring (like vague areas)
# <data_dir>/dataset.json                          optional: {"mpp": <micrometres per pixel>}
# <data_dir>/groups.csv                            optional: "stem,group" rows (the group plays NuInsSeg's tissue)
FOLDERS_IMAGE_DIR = "images"
FOLDERS_LABEL_DIR = "labels"
FOLDERS_IGNORE_DIR = "ignore"
FOLDERS_INFO = "dataset.json"
FOLDERS_GROUPS = "groups.csv"
FOLDERS_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FOLDERS_LABEL_SUFFIXES = (".tif", ".tiff", ".png")
FOLDERS_IGNORE_SUFFIXES = (".png", ".tif", ".tiff")
FOLDERS_DEFAULT_GROUP = "all"
DATA_FORMATS = ("auto", "nuinsseg", "folders")


def is_folders_layout(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` has the `images/` and `labels/` folders of the folders layout."""
    data_dir = Path(data_dir)
    return (data_dir / FOLDERS_IMAGE_DIR).is_dir() and (data_dir / FOLDERS_LABEL_DIR).is_dir()


def detect_format(data_dir: str | os.PathLike, data_format: str = "auto") -> str:
    """"nuinsseg" or "folders": `data_format` itself, or with "auto" the layout found in `data_dir`."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"--data_format {data_format}: choose one of {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    return "folders" if is_folders_layout(data_dir) else "nuinsseg"


def add_data_format_argument(parser: argparse.ArgumentParser) -> None:
    """`--data_format auto|nuinsseg|folders` (read back by `discover`)."""
    parser.add_argument("--data_format", choices=DATA_FORMATS, default="auto",
                        help="layout of --data_dir: nuinsseg (<organ>/tissue images, label masks modify), folders "
                             "(images/, labels/, optional ignore/, dataset.json, groups.csv; see docs/data.md), "
                             "or auto: folders when images/ and labels/ exist, else nuinsseg")


def read_dataset_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The folders layout's optional `dataset.json` ({} when absent); `mpp` checked to be a positive number."""
    path = Path(data_dir) / FOLDERS_INFO
    if not path.is_file():
        return {}
    info = read_json(path)
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object such as {{\"mpp\": 0.25}}")
    mpp = info.get("mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0):
        raise UserError(f"{path}: 'mpp' must be a positive number of micrometres per pixel, got {mpp!r}")
    return info


def dataset_mpp(data_dir: str | os.PathLike, data_format: str = "auto") -> float | None:
    """Pixel size of a dataset's images in µm: the folders layout's dataset.json `mpp`; None when unknown
    (a NuInsSeg-layout folder, or no dataset.json: the caller assumes the model's pixel size)."""
    if detect_format(data_dir, data_format) != "folders":
        return None
    mpp = read_dataset_info(data_dir).get("mpp")
    return None if mpp is None else float(mpp)


def _read_groups(path: Path, stems: Sequence[str]) -> dict[str, str]:
    """stem -> group from `groups.csv` ("stem,group" rows, optional header); unknown stems are an error."""
    import csv

    known = set(stems)
    groups: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read the groups file ({e})") from None
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if number == 1 and [c.lower() for c in cells[:2]] == ["stem", "group"]:
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise UserError(f"{path}: line {number}: expected 'stem,group', got {','.join(row)!r}")
        stem, group = cells
        if stem not in known and Path(stem).stem in known and Path(stem).suffix.lower() in FOLDERS_IMAGE_SUFFIXES:
            stem = Path(stem).stem  # a file name instead of a stem
        if stem not in known:
            raise UserError(f"{path}: line {number}: no image '{stem}' in {FOLDERS_IMAGE_DIR}/")
        if stem in groups:
            raise UserError(f"{path}: line {number}: '{stem}' is listed twice")
        groups[stem] = group
    return groups


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header (no pixel decoding where the format allows)."""
    path = Path(path)
    try:
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
        return int(height), int(width)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception:  # PIL cannot parse some TIFF variants: ask tifffile, then give up naming the file
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    shape = tif.series[0].shape
                    axes = tif.series[0].axes
                return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
            except Exception as e:
                raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
        raise UserError(f"{path}: unreadable image") from None


def discover_folders(data_dir: str | os.PathLike) -> list[Sample]:
    """All images of a folders-layout dataset with their label maps (and ignore masks), sorted by `rel_path`
    (`images/<file>`). `Sample.tissue` holds the image's group from groups.csv (`all` without one).

    Checked before anything is trained or written, each problem one UserError naming the file: an image
    without labels, labels without an image, a label map or ignore mask whose size differs from its image,
    label maps that are not integer instance ids."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    expected = (f"expected the folders layout '{FOLDERS_IMAGE_DIR}/<stem>.png' with "
                f"'{FOLDERS_LABEL_DIR}/<stem>.tif'")
    if not is_folders_layout(data_dir):
        raise UserError(f"{data_dir}: no '{FOLDERS_IMAGE_DIR}' and '{FOLDERS_LABEL_DIR}' folders ({expected})")
    images = files_by_stem(data_dir / FOLDERS_IMAGE_DIR, FOLDERS_IMAGE_SUFFIXES, "image")
    labels = files_by_stem(data_dir / FOLDERS_LABEL_DIR, FOLDERS_LABEL_SUFFIXES, "label map")
    ignore_dir = data_dir / FOLDERS_IGNORE_DIR
    ignore = files_by_stem(ignore_dir, FOLDERS_IGNORE_SUFFIXES, "ignore mask") if ignore_dir.is_dir() else {}
    if not images:
        raise UserError(f"{data_dir / FOLDERS_IMAGE_DIR}: no images ({expected})")
    for stem, image_path in images.items():
        if stem not in labels:
            raise UserError(f"{image_path}: no label map for this image (expected "
                            f"{data_dir / FOLDERS_LABEL_DIR / (stem + '.tif')})")
    for stem, label_path in labels.items():
        if stem not in images:
            raise UserError(f"{label_path}: label map without an image (expected "
                            f"{data_dir / FOLDERS_IMAGE_DIR / (stem + '.png')})")
    for stem, mask_path in ignore.items():
        if stem not in images:
            log.warning("%s: ignore mask without an image, not used", mask_path)
    groups_path = data_dir / FOLDERS_GROUPS
    groups = _read_groups(groups_path, list(images)) if groups_path.is_file() else {}
    ungrouped = [s for s in images if groups and s not in groups]
    if ungrouped:
        log.warning("%s: %d image(s) not listed (e.g. %s); they form the group '%s'", groups_path,
                    len(ungrouped), ungrouped[0], FOLDERS_DEFAULT_GROUP)
    read_dataset_info(data_dir)  # a malformed dataset.json fails here, before any work

    samples: list[Sample] = []
    for stem, image_path in images.items():
        shape = image_shape(image_path)
        label_shape = read_label_mask(labels[stem]).shape  # also checks: integer ids, one channel
        if label_shape != shape:
            raise UserError(f"{labels[stem]}: label map is {label_shape[1]}x{label_shape[0]} but its image "
                            f"{image_path.name} is {shape[1]}x{shape[0]}")
        mask = ignore.get(stem)
        if mask is not None and (mask_shape := read_vague_mask(mask).shape) != shape:
            raise UserError(f"{mask}: ignore mask is {mask_shape[1]}x{mask_shape[0]} but its image "
                            f"{image_path.name} is {shape[1]}x{shape[0]}")
        samples.append(Sample(image_path=image_path, label_path=labels[stem], vague_path=mask,
                              tissue=groups.get(stem, FOLDERS_DEFAULT_GROUP), name=stem,
                              rel_path=f"{FOLDERS_IMAGE_DIR}/{image_path.name}"))
    samples.sort(key=lambda s: s.rel_path)
    log.info("%s: %d images in %d group(s) (%d with ignore masks)", data_dir, len(samples),
             len({s.tissue for s in samples}), sum(s.vague_path is not None for s in samples))
    return samples


def discover(data_dir: str | os.PathLike, data_format: str = "auto") -> list[Sample]:
    """The samples of `data_dir` in either layout (`data_format`: auto, nuinsseg or folders)."""
    if detect_format(data_dir, data_format) == "folders":
        return discover_folders(data_dir)
    return discover_nuinsseg(data_dir)


# ----------------------------------------------------------------------------------------------
# Training on images of any size: random windows of the model's tile at the model's pixel size
# ----------------------------------------------------------------------------------------------
def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """(H, W) of an image resized by `scale` (the rounding `predict` uses for --mpp)."""
    h, w = int(shape[0]), int(shape[1])
    if scale == 1.0:
        return h, w
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


# Bounds on a pixel size (--mpp, dataset.json) and on the resize to the model's pixel size it implies.
# Brightfield scans lie within PLAUSIBLE_MPP (100x oil about 0.05-0.1 um/px, 40x about 0.25, 20x about 0.5,
# 10x about 1, 5x about 2); a value outside gets a warning naming where it came from.
PLAUSIBLE_MPP = (0.05, 5.0)
# An image resized to more than MAX_RESIZED_PIXELS pixels is refused on any machine; below that, when the
# maps and post-processing of the resized image need more than the memory available now. Measured peak of
# `predict.image_maps` + `labels_from_maps` (synthetic tile with ~2800 nuclei, stand-in network, 4 and 9 Mpx
# after the resize): 43-47 bytes per resized pixel above the input's own arrays; BYTES_PER_RESIZED_PIXEL rounds
# that up.
MAX_RESIZED_PIXELS = 2 ** 31
BYTES_PER_RESIZED_PIXEL = 64


def warn_if_implausible_mpp(mpp: float | None, where: str = "--mpp") -> bool:
    """Log one warning (and return True) when `mpp` lies outside `PLAUSIBLE_MPP`; `where` names its source."""
    if mpp is None or PLAUSIBLE_MPP[0] <= float(mpp) <= PLAUSIBLE_MPP[1]:
        return False
    log.warning("%s %g: outside %g-%g micrometres per pixel, the range of brightfield microscopy (40x is about "
                "0.25, 20x about 0.5); images are resized by it to the model's pixel size, so check the value",
                where, float(mpp), *PLAUSIBLE_MPP)
    return True


def check_resize(what: str | os.PathLike, shape: Sequence[int], scale: float, option: str,
                 available: int | None = None) -> tuple[int, int]:
    """(H, W) an image of `shape` becomes when resized by `scale` (`scaled_shape`); UserError("<what>: <option>
    ...") naming the sizes when that exceeds MAX_RESIZED_PIXELS or its estimated memory
    (BYTES_PER_RESIZED_PIXEL per pixel) exceeds `available` (default: `utils.available_memory()`). Called with the
    header's size before the image is read or resized; a resize that does not add pixels is never refused."""
    height, width = int(shape[0]), int(shape[1])
    resized = scaled_shape((height, width), scale)
    pixels = resized[0] * resized[1]
    if pixels <= height * width:
        return resized
    need = pixels * BYTES_PER_RESIZED_PIXEL
    if available is None:
        available = utils.available_memory()

    def size(n: float) -> str:
        return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"

    if pixels > MAX_RESIZED_PIXELS:
        why = f"more than the limit of {MAX_RESIZED_PIXELS:,} resized pixels"
    elif available is not None and need > available:
        why = f"about {size(need)}, more than the {size(available)} of memory available"
    else:
        return resized
    raise UserError(f"{what}: {option} resizes this {width} x {height}-pixel image by {scale:.4g} to the model's "
                    f"pixel size, {resized[1]:,} x {resized[0]:,} pixels: {why}")


def needs_windows(samples: Sequence[Sample], tile_size: int, scale: float = 1.0) -> bool:
    """True unless every image, rescaled by `scale`, is exactly `tile_size` x `tile_size` (then the network
    sees whole images, the NuInsSeg path); otherwise training takes windows and scoring tiles whole images."""
    return any(scaled_shape(image_shape(s.image_path), scale) != (int(tile_size), int(tile_size))
               for s in samples)


def default_tile_size(samples: Sequence[Sample], scale: float = 1.0) -> int:
    """Source pixels (at the model's pixel size) of one training window when none is given: the image side
    when all images are the same square, else the smallest image side, so every window lies inside its image."""
    shapes = {scaled_shape(image_shape(s.image_path), scale) for s in samples}
    if len(shapes) == 1 and len({*next(iter(shapes))}) == 1:
        return next(iter(shapes))[0]
    return min(min(shape) for shape in shapes)


def _pad_pair(image: np.ndarray, labels: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad image and labels at the bottom/right to at least (height, width) by mirroring; mirrored nuclei get
    new ids (original id + the largest id) so no instance spans the original and its mirror image."""
    pad_h, pad_w = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if not (pad_h or pad_w):
        return image, labels
    h, w = labels.shape
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    labels = labels.astype(np.int64)
    top = int(labels.max()) if labels.size else 0
    padded = np.pad(labels, ((0, pad_h), (0, pad_w)), mode="symmetric")
    mirrored = np.ones(padded.shape, dtype=bool)
    mirrored[:h, :w] = False
    padded[mirrored & (padded > 0)] += top
    return image, padded


class WindowDataset(NucleiDataset):
    """Training items from images of any size and pixel size: each image is rescaled by `scale` (its mpp /
    the model's mpp), then a window of `tile_size` x `tile_size` pixels is cut (images smaller than a window
    are mirror-padded) and resized to `input_size`, as `predict` does with each tile of a large image.

    With `random_windows`, an image of area A contributes max(1, round(A / tile_size²)) windows per epoch at
    random positions drawn from (seed, epoch, item), so an epoch covers about every pixel once; augmentation
    as in `NucleiDataset`. Without, one centred window per image (item index = image index; validation loss).
    Items have `NucleiDataset`'s keys; "index" is the item index.
    """

    def __init__(self, samples: Sequence[Sample], input_size: int, tile_size: int, scale: float = 1.0,
                 augment: AugmentConfig | None = None, seed: int = 0, preload: bool = True,
                 random_windows: bool = True, blank_image: bool = True) -> None:
        if int(tile_size) < 16:
            raise UserError(f"--tile_size {tile_size}: must be at least 16 pixels")
        if not scale > 0:
            raise UserError(f"--mpp: the image/model pixel-size ratio {scale} must be positive")
        self.tile_size = int(tile_size)
        self.scale = float(scale)
        self.random_windows = bool(random_windows)
        super().__init__(samples, input_size, augment=augment, seed=seed, preload=False, blank_image=blank_image)
        self.windows: list[int] = []  # item -> image index
        for i, sample in enumerate(self.samples):
            h, w = scaled_shape(image_shape(sample.image_path), self.scale)
            count = max(1, int(round(h * w / float(self.tile_size) ** 2))) if self.random_windows else 1
            self.windows.extend([i] * count)
        if preload:
            self.preload()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache[index]
        if cached is None:
            image, labels, ignore = load_sample(self.samples[index])
            image, labels = apply_ignore(image, labels, ignore, self.blank_image)
            ignore = ignore if ignore is not None and ignore.any() else None
            size = scaled_shape(image.shape[:2], self.scale)
            if size != image.shape[:2]:
                image, labels = resize_image(image, size), resize_labels(labels, size)
                if ignore is not None:
                    ignore = resize_labels(ignore, size)
                    image, labels = apply_ignore(image, labels, ignore, self.blank_image)
            self._ignore[index] = ignore
            cached = (image, _compact_labels(labels))
            self._cache[index] = cached
        return cached

    def __len__(self) -> int:
        return len(self.windows)

    def item_arrays_masked(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(image uint8 (S,S,3), labels (S,S), ignore bool (S,S) or None): a window, augmented and resized
        to the input size, blanked under the ignore mask."""
        image, labels = self._load(self.windows[index])
        ignore = self._ignore[self.windows[index]]
        t = self.tile_size
        if ignore is not None:  # mirrored like the image
            pad_h, pad_w = max(t - ignore.shape[0], 0), max(t - ignore.shape[1], 0)
            ignore = np.pad(ignore, ((0, pad_h), (0, pad_w)), mode="symmetric")
        image, labels = _pad_pair(image, labels, t, t)
        h, w = labels.shape
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        if self.random_windows:
            y, x = int(rng.integers(0, h - t + 1)), int(rng.integers(0, w - t + 1))
        else:
            y, x = (h - t) // 2, (w - t) // 2
        image, labels = image[y:y + t, x:x + t], labels[y:y + t, x:x + t]
        if ignore is not None:
            ignore = ignore[y:y + t, x:x + t]
            ignore = ignore if ignore.any() else None
        image, labels, ignore = self._augmented(image, labels, ignore, rng)
        return self._finish(np.ascontiguousarray(image), np.ascontiguousarray(labels), ignore)
