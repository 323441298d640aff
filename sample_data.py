"""Write a synthetic H&E dataset in the exact NuInsSeg layout (`make_sample_data` command).

The tiles look like H&E at 40x: pink eosin background with fibrous texture, red blood cells and empty
spaces, purple hematoxylin nuclei of varied size, elongation and orientation, with chromatin texture and a
darker rim. Many nuclei touch or overlap; an overlap is resolved by occlusion (the nucleus on top keeps the
shared pixels), so an occluded nucleus may end up in several pieces with one id, as in NuInsSeg.
Rendering works in optical density with H&E stain vectors, so colours mix like real stains.

Layout written (per organ folder):
    <organ>/tissue images/<prefix>_<k>.png                 RGB uint8
    <organ>/label masks modify/<prefix>_<k>.tif            uint16 instance labels, 0 = background
    <organ>/vague areas/mask binary/<prefix>_<k>.png       0/255 ambiguous regions (a few images)
plus `sample_data.json` (settings, file list, environment, and `mpp`). The same seed gives the same files.

Scale: a 512 px tile is drawn at NuInsSeg's 0.25 um/px (40x); at other `--image_size` the whole tile
(nuclei included) is scaled, so its true pixel size is `0.25 * 512 / image_size` um/px (0.5 at 256 px).
That value is recorded as `mpp` in `sample_data.json`, and `train` records it with the model (unless
`--mpp` is given), so `predict --mpp` rescales real images correctly for a model trained on sample data.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

import utils
from utils import UserError, atomic_write_bytes, environment_info, read_json, write_json

log = logging.getLogger(__name__)

MARKER = "sample_data.json"
MARKER_KIND = "nuinsseg-synthetic-sample"

# Unit optical-density stain vectors (RGB): hematoxylin (blue-purple), eosin (pink).
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class OrganStyle:
    folder: str  # organ folder name
    prefix: str  # file-name prefix
    density: float  # fraction of the tile covered by nuclei
    diameter: tuple[float, float]  # nucleus diameter range in px at 512x512 / 40x
    elongation: tuple[float, float]  # major/minor axis ratio range
    cluster: float  # probability a nucleus is placed touching an earlier one
    fibres: float  # strength of the fibrous eosin texture
    hematoxylin: float  # mean nuclear stain amount
    eosin: float  # background stain amount


ORGANS: tuple[OrganStyle, ...] = (
    OrganStyle("human liver", "human_liver", 0.14, (16, 28), (1.0, 1.35), 0.25, 0.3, 1.0, 0.45),
    OrganStyle("mouse kidney", "mouse_kidney", 0.20, (13, 22), (1.0, 1.5), 0.45, 0.4, 1.1, 0.55),
    OrganStyle("human spleen", "human_spleen", 0.30, (9, 15), (1.0, 1.25), 0.6, 0.2, 1.35, 0.35),
    OrganStyle("mouse fat (white and brown)_subscapula", "mouse_subscapula", 0.07, (12, 24), (1.2, 2.6),
               0.2, 0.5, 1.0, 0.3),
    OrganStyle("human muscle", "human_muscle", 0.08, (12, 22), (2.0, 3.6), 0.2, 0.9, 1.0, 0.75),
    OrganStyle("human melanoma", "human_melanoma", 0.24, (18, 30), (1.0, 1.7), 0.55, 0.3, 0.9, 0.5),
)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-6)


def _nucleus_shape(rng: np.random.Generator, radius: float, elongation: float):
    """Random star-convex ellipse: returns (half_extent, function(dy, dx) -> normalised radius rho)."""
    a = radius * np.sqrt(elongation)
    b = radius / np.sqrt(elongation)
    theta = rng.uniform(0, np.pi)
    harmonics = [(k, rng.normal(0, 0.05 / k), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    def rho(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        u = dx * cos_t + dy * sin_t
        v = -dx * sin_t + dy * cos_t
        phi = np.arctan2(v, u)
        wobble = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in harmonics)
        return np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble

    return int(np.ceil(a * 1.2)) + 1, rho


def render_tile(rng: np.random.Generator, size: int, style: OrganStyle
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image uint8 (S,S,3), labels uint16 (S,S), vague bool (S,S) or None) for one synthetic tile."""
    scale = size / 512.0
    shape = (size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # --- eosin background: fibres along a wavy direction field, density variation, empty spaces
    angle = rng.uniform(0, np.pi)
    warp = _smooth_noise(rng, shape, 24 * scale + 1) * 3.0
    freq = rng.uniform(0.15, 0.3) / max(scale, 0.25)
    fibres = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + warp * 2.0)
    fibres = 0.5 + 0.5 * fibres * (0.6 + 0.4 * _smooth_noise(rng, shape, 6 * scale + 0.5))
    low = _smooth_noise(rng, shape, 40 * scale + 1)
    eosin = style.eosin * (1.0 + 0.25 * low) * (1.0 - style.fibres * 0.5 + style.fibres * 0.5 * fibres)
    eosin *= 1.0 + 0.12 * _smooth_noise(rng, shape, 1.0)
    spaces = _smooth_noise(rng, shape, 30 * scale + 1) > rng.uniform(1.3, 2.2)  # lumen / fat vacuoles
    eosin[ndimage.binary_dilation(spaces, iterations=1)] *= 0.5
    eosin[spaces] *= 0.08
    hema = np.full(shape, 0.13, dtype=np.float32) * (1.0 + 0.3 * low)

    # red blood cells: small bright eosinophilic discs (not nuclei, not labelled)
    for _ in range(int(rng.poisson(4))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(5.0, 7.0) * scale + 0.5
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        eosin[disc] = style.eosin * 2.2

    # --- nuclei, painted in order: a later nucleus occludes an earlier one where they overlap
    labels = np.zeros(shape, dtype=np.uint16)
    chromatin = _smooth_noise(rng, shape, 0.8 * scale + 0.4)
    dmin, dmax = style.diameter
    mean_area = np.pi * (0.5 * scale * (dmin + dmax) / 2) ** 2
    target = int(style.density * size * size / max(mean_area, 1.0) * rng.uniform(0.8, 1.2))
    centres: list[tuple[float, float, float]] = []
    next_id = 1
    attempts = 0
    while len(centres) < target and attempts < target * 4 and next_id < 65535:
        attempts += 1
        radius = 0.5 * scale * rng.uniform(dmin, dmax)
        radius = max(radius, 1.0)
        elong = rng.uniform(*style.elongation)
        if centres and rng.random() < style.cluster:
            py, px, pr = centres[int(rng.integers(len(centres)))]
            direction = rng.uniform(0, 2 * np.pi)
            dist = (pr + radius) * rng.uniform(0.75, 1.05)
            cy, cx = py + dist * np.sin(direction), px + dist * np.cos(direction)
        else:
            cy, cx = rng.uniform(0, size, 2)
        half, rho_fn = _nucleus_shape(rng, radius, elong)
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        if y1 <= y0 or x1 <= x0:
            continue
        rho = rho_fn(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx)
        inside = rho <= 1.0
        area = int(inside.sum())
        if area < 3:
            continue
        region = labels[y0:y1, x0:x1]
        if np.count_nonzero(region[inside]) > 0.35 * area:  # limit how much of others it covers
            continue
        region[inside] = next_id
        amount = style.hematoxylin * rng.uniform(0.7, 1.3)
        rim = 1.0 + 0.45 * np.clip((rho - 0.7) / 0.3, 0, 1)  # darker nuclear membrane
        texture = 1.0 + 0.22 * chromatin[y0:y1, x0:x1]
        hema[y0:y1, x0:x1][inside] = (amount * rim * texture)[inside]
        eosin[y0:y1, x0:x1][inside] *= 0.35
        if rng.random() < 0.3:  # a nucleolus
            ny = int(np.clip(cy + rng.normal(0, radius * 0.2), y0, y1 - 1))
            nx = int(np.clip(cx + rng.normal(0, radius * 0.2), x0, x1 - 1))
            if labels[ny, nx] == next_id:
                hema[ny, nx] *= 1.4
        centres.append((cy, cx, radius))
        next_id += 1

    # ids of fully occluded nuclei disappear: renumber 1..N in painting order
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    labels = lut[labels]

    # --- ambiguous region (some tiles): a blurry, faintly stained patch
    vague = None
    if rng.random() < 0.25:
        blob = _smooth_noise(rng, shape, 20 * scale + 1)
        vague = blob > np.quantile(blob, rng.uniform(0.9, 0.96))
        soft = ndimage.gaussian_filter(vague.astype(np.float32), 3 * scale + 0.5)
        hema = hema * (1 - soft) + ndimage.gaussian_filter(hema, 2.5 * scale + 0.5) * soft * 0.8

    # --- optical density -> RGB, optics blur and sensor noise
    h_vec = _H_VEC * rng.uniform(0.9, 1.1, 3)
    e_vec = _E_VEC * rng.uniform(0.9, 1.1, 3)
    hema = ndimage.gaussian_filter(hema, 0.9 * scale + 0.3)
    eosin = 0.8 * ndimage.gaussian_filter(eosin, 0.9 * scale + 0.3)
    od = hema[..., None] * (h_vec / np.linalg.norm(h_vec)) + eosin[..., None] * (e_vec / np.linalg.norm(e_vec))
    rgb = 245.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return image, labels, vague


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tif_bytes(labels: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, labels.astype(np.uint16), compression="zlib")
    return buf.getvalue()


def _check_output_dir(output_dir: Path) -> list[str]:
    """Files of a previous sample dataset in `output_dir` (empty list for a new/empty folder)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a directory")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return []
    marker = output_dir / MARKER
    if not marker.is_file():
        raise UserError(f"{output_dir}: directory is not empty and is not a sample dataset made by this "
                        f"command; choose a new or empty --output_dir (nothing was written)")
    info = read_json(marker)
    if not isinstance(info, dict) or info.get("kind") != MARKER_KIND:
        raise UserError(f"{marker}: not written by make_sample_data; choose a new or empty --output_dir")
    return [str(f) for f in info.get("files", [])]


def make_sample_dataset(output_dir: str | os.PathLike, num_images: int = 40, seed: int = 0,
                        image_size: int = 512) -> Path:
    """Write `num_images` synthetic tiles spread over several organ folders; returns the folder.

    Refuses a non-empty folder unless it holds an earlier sample dataset (then its files are replaced; files
    of the earlier run that the new one does not write are removed - only files listed in its marker).
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    if int(num_images) < 1:
        raise UserError(f"--num_images {num_images}: must be at least 1")
    if int(image_size) < 32:
        raise UserError(f"--image_size {image_size}: must be at least 32 pixels")
    utils.check_at_most("--image_size", int(image_size), utils.MAX_TILE_SIZE, "pixels of one synthetic tile")
    if int(seed) < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")
    num_images, image_size, seed = int(num_images), int(image_size), int(seed)
    previous = _check_output_dir(output_dir)
    utils.make_output_dir(output_dir)

    plan = []  # (style, name)
    counters: dict[str, int] = {}
    for i in range(num_images):
        style = ORGANS[i % len(ORGANS)]
        counters[style.folder] = counters.get(style.folder, 0) + 1
        plan.append((style, f"{style.prefix}_{counters[style.folder]}"))
    config = {"num_images": num_images, "seed": seed, "image_size": image_size}
    marker = {"kind": MARKER_KIND, "complete": False, "config": config, "mpp": tile_mpp(image_size),
              "files": sorted(set(previous)), "environment": environment_info()}
    write_json(output_dir / MARKER, marker)  # first, so an interrupted run is still recognised

    written: list[str] = []
    num_vague = 0
    for i, (style, name) in enumerate(tqdm(plan, desc="sample images", unit="img", disable=num_images < 20)):
        rng = np.random.default_rng([seed, i])
        image, labels, vague = render_tile(rng, image_size, style)
        if vague is None and i in (2, 9):  # always a few ambiguous-region masks
            vague = np.zeros(labels.shape, dtype=bool)
            s = image_size
            vague[s // 8: s // 8 + s // 5, s // 2: s // 2 + s // 4] = True
        organ = output_dir / style.folder
        files = [(organ / "tissue images" / f"{name}.png", _png_bytes(image)),
                 (organ / "label masks modify" / f"{name}.tif", _tif_bytes(labels))]
        if vague is not None:
            num_vague += 1
            files.append((organ / "vague areas" / "mask binary" / f"{name}.png",
                          _png_bytes(vague.astype(np.uint8) * 255)))
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            written.append(path.relative_to(output_dir).as_posix())

    _remove_stale(output_dir, previous, set(written))
    marker.update(complete=True, files=sorted(written), num_vague_masks=num_vague,
                  organs=sorted({style.folder for style, _ in plan}))
    write_json(output_dir / MARKER, marker)
    log.info("%s: wrote %d synthetic images (%d organs, %d ambiguous-region masks), %dx%d px",
             output_dir, num_images, len(marker["organs"]), num_vague, image_size, image_size)
    return output_dir


def tile_mpp(image_size: int) -> float:
    """True micrometres per pixel of a synthetic tile of `image_size` px (512 px = NuInsSeg's 0.25)."""
    import dataset

    return float(dataset.NUINSSEG_MPP) * 512.0 / float(image_size)


def recorded_mpp(data_dir: str | os.PathLike) -> float | None:
    """The pixel size of a dataset written by make_sample_data (from its sample_data.json: `mpp`, or for
    files written before it was recorded, from the tile size), else None (real data)."""
    marker = Path(data_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json(marker)
    except UserError:
        return None
    if not isinstance(info, dict) or info.get("kind") != MARKER_KIND:
        return None
    if isinstance(info.get("mpp"), (int, float)) and info["mpp"] > 0:
        return float(info["mpp"])
    size = (info.get("config") or {}).get("image_size")
    return tile_mpp(size) if isinstance(size, int) and size > 0 else None


def _remove_stale(output_dir: Path, previous: list[str], keep: set[str]) -> None:
    root = output_dir.resolve()
    for rel in previous:
        if rel in keep or rel == MARKER:
            continue
        path = (output_dir / rel).resolve()
        if root not in path.parents or not path.is_file():
            continue
        path.unlink()
        for parent in path.parents:  # remove folders this command made, once empty
            if parent == root or root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="sample_data", help="folder to write (new or empty)")
    parser.add_argument("--num_images", type=int, default=40, help="number of tiles")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--image_size", type=int, default=512,
                        help="tile size in pixels (NuInsSeg tiles are 512; nuclei scale with it, and the true pixel size "
                             "0.25 * 512 / image_size um/px is recorded in sample_data.json)")
    parser.add_argument("--slide", default=None, metavar="FILE.svs",
                        help="also write a synthetic whole-slide image here: an Aperio-layout pyramidal TIFF with its "
                             "pixel size, a roughly round tissue section of synthetic tiles on white glass (to try "
                             "`predict` on a slide)")
    parser.add_argument("--slide_tiles", type=int, default=8,
                        help="the slide is this many tiles (of --image_size) across, including the glass border")


def run(args: argparse.Namespace) -> int:
    if args.slide is not None:
        check_slide_options(args.slide, args.slide_tiles)
        side = int(args.slide_tiles) * max(1, int(args.image_size))
        # the canvas: float64 glass noise, then uint8 RGB, plus the pyramid levels written from it
        utils.check_memory(side * side * 3 * (8 + 1 + 1), f"--slide_tiles {args.slide_tiles}: a {side} px square slide")
    out = make_sample_dataset(args.output_dir, num_images=args.num_images, seed=args.seed,
                              image_size=args.image_size)
    print(f"wrote {args.num_images} synthetic images in the NuInsSeg layout to {out}")
    if args.slide is not None:
        slide = make_sample_slide(args.slide, tiles=args.slide_tiles, seed=args.seed, image_size=args.image_size)
        print(f"wrote a synthetic whole-slide image ({args.slide_tiles * args.image_size} px square, "
              f"{tile_mpp(args.image_size):g} um/px) to {slide}")
    return 0


def check_slide_options(path: str | os.PathLike, tiles: int) -> None:
    """UserError for a `--slide` file name or `--slide_tiles` count that cannot work (before anything is written)."""
    if Path(path).suffix.lower() != ".svs":
        raise UserError(f"--slide {path}: the synthetic slide is written in the Aperio layout; name it <name>.svs")
    if Path(path).is_dir():
        raise UserError(f"--slide {path}: is a folder")
    if int(tiles) < 3:
        raise UserError(f"--slide_tiles {tiles}: must be at least 3 (one tile of glass on each side)")


def make_sample_slide(path: str | os.PathLike, tiles: int = 8, seed: int = 0, image_size: int = 512) -> Path:
    """A synthetic whole-slide image at `path` (.svs, Aperio layout, pixel size `tile_mpp(image_size)`): a
    `tiles` x `tiles` grid of `image_size` cells in which the cells inside a circle (one cell of white glass
    at least on every side) hold synthetic H&E tiles (`render_tile`, organ styles in turn) and the others the
    slightly noisy white of empty glass. Deterministic for a seed."""
    check_slide_options(path, tiles)
    tiles, size = int(tiles), int(image_size)
    rng_glass = np.random.default_rng([seed, 999_999])
    canvas = np.clip(rng_glass.normal(243, 2.0, (tiles * size, tiles * size, 3)), 0, 255).astype(np.uint8)
    centre, radius = (tiles - 1) / 2.0, (tiles - 2) / 2.0
    k = 0
    for row in range(tiles):
        for col in range(tiles):
            if (row - centre) ** 2 + (col - centre) ** 2 > radius ** 2 + 0.25:
                continue
            image, _, _ = render_tile(np.random.default_rng([seed, 1_000_000 + k]), size, ORGANS[k % len(ORGANS)])
            canvas[row * size:(row + 1) * size, col * size:(col + 1) * size] = image
            k += 1
    mpp = tile_mpp(size)
    return write_pyramidal_tiff(path, canvas, mpp, tile_size=256,
                                description=aperio_description(canvas.shape[1], canvas.shape[0], mpp, 256))


# ----------------------------------------------------------------------------------------------
# Synthetic whole slides (tests and benchmarks)
# ----------------------------------------------------------------------------------------------
def aperio_description(width: int, height: int, mpp: float, tile_size: int = 256) -> str:
    """An Aperio-style ImageDescription (`Aperio Image Library ...|MPP = ...`): OpenSlide's aperio driver
    and tiffslide both read `MPP` from it as `openslide.mpp-x` / `tiffslide.mpp-x`."""
    return (f"Aperio Image Library v10.0.0\n{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size}) "
            f"-|AppMag = {40 if mpp <= 0.375 else 20}|MPP = {mpp:g}")


def write_pyramidal_tiff_from_tiles(path: str | os.PathLike, shape: tuple[int, int], read_tile, mpp: float | None,
                                    tile_size: int = 256, levels: int | None = None,
                                    description: str | None = None, min_size: int = 512,
                                    compression: str = "zlib") -> Path:
    """Write a tiled pyramidal RGB TIFF of `shape` (H, W) from `read_tile(y, x, h, w) -> uint8 (h, w, 3)`
    without holding the image whole (`label_pyramid.write_tiled_pyramid`): levels halve (2x2 mean) down to
    `min_size`, or `levels` levels. Levels are consecutive pages (reduced-resolution ones marked so), the
    layout OpenSlide's generic-tiff driver and tiffslide read. With `mpp` every level carries TIFF
    resolution tags (pixels per centimetre, scaled per level), which both readers report as the slide's mpp.
    `description` goes into the first page's ImageDescription; an Aperio one (see `aperio_description`)
    also gets a small strip thumbnail as the second page and its levels are not marked reduced-resolution,
    as in real SVS files (tifffile's SVS reader, used by tiffslide, expects that), and OpenSlide opens it
    with its aperio driver."""
    import label_pyramid

    path = Path(path)
    height, width = int(shape[0]), int(shape[1])
    aperio = bool(description) and description.startswith("Aperio")

    def level_kwargs(level: int, downsample: float) -> dict:
        kwargs: dict = {}
        if mpp:
            per_cm = 1e4 / (float(mpp) * downsample)
            kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if level == 0 and description:
            kwargs["description"] = description
        return kwargs

    if not aperio:
        return label_pyramid.write_tiled_pyramid(path, (height, width), read_tile, dtype=np.uint8, samples=3,
                                                 reduce="mean", tile_size=tile_size, levels=levels,
                                                 min_size=min_size, compression=compression, subifds=False,
                                                 level_kwargs=level_kwargs, desc="slide tiles")
    # Aperio layout: level 0, a strip thumbnail, then the other levels. Written as a plain pyramid first,
    # then its pages are copied tile by tile (through tifffile's zarr store) with the thumbnail inserted.
    import tifffile
    import zarr

    plain = path.with_name(f".{path.name}.plain.tif")
    out_tmp = path.with_name(f".{path.name}.aperio.tmp")
    try:
        label_pyramid.write_tiled_pyramid(plain, (height, width), read_tile, dtype=np.uint8, samples=3,
                                          reduce="mean", tile_size=tile_size, levels=levels, min_size=min_size,
                                          compression=compression, subifds=False, level_kwargs=level_kwargs)
        with tifffile.TiffFile(plain) as src, tifffile.TiffWriter(out_tmp, bigtiff=src.is_bigtiff) as tw:
            pages = list(src.pages)
            for i, page in enumerate(pages):
                store = page.aszarr()
                try:
                    level = zarr.open(store, mode="r")
                    ph, pw = page.shape[:2]
                    tiles = (np.asarray(level[y:y + tile_size, x:x + tile_size])
                             for y in range(0, ph, tile_size) for x in range(0, pw, tile_size))
                    tw.write(tiles, shape=page.shape, dtype=np.uint8, tile=(tile_size, tile_size),
                             photometric="rgb", compression=compression, metadata=None, subfiletype=0,
                             **level_kwargs(i, float(2 ** i)))
                finally:
                    store.close()
                if i == 0:
                    tw.write(pages[-1].asarray(), photometric="rgb", compression=compression, metadata=None,
                             description="Aperio Image Library v10.0.0\nthumbnail")
        os.replace(out_tmp, path)
    finally:
        plain.unlink(missing_ok=True)
        out_tmp.unlink(missing_ok=True)
    return path


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None, tile_size: int = 256,
                         levels: int | None = None, description: str | None = None, min_size: int = 512,
                         compression: str = "zlib") -> Path:
    """Write the uint8 RGB `image` (H, W, 3) as a tiled pyramidal TIFF (see
    `write_pyramidal_tiff_from_tiles`; level 0 holds exactly `image`)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return write_pyramidal_tiff_from_tiles(path, image.shape[:2], lambda y, x, h, w: image[y:y + h, x:x + w],
                                           mpp, tile_size=tile_size, levels=levels, description=description,
                                           min_size=min_size, compression=compression)


def real_sample_mosaic(data_dir: str | os.PathLike, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (n*S, n*S, 3), labels uint32 (n*S, n*S)): the first n*n tiles of a NuInsSeg-layout
    folder (sorted by relative path, all S x S) placed row by row in an n x n mosaic. Each tile's ids are
    renumbered 1..k in increasing order and shifted past the previous tiles', so every id is unique."""
    import dataset

    samples = dataset.discover_nuinsseg(data_dir)
    if len(samples) < n * n:
        raise UserError(f"{data_dir}: {len(samples)} images, a {n}x{n} mosaic needs {n * n}")
    image = labels = None
    next_id = 0
    for k, sample in enumerate(samples[:n * n]):
        tile, tile_labels, _ = dataset.load_sample(sample)
        size = tile.shape[0]
        if tile.shape[:2] != (size, size) or (image is not None and size * n != image.shape[0]):
            raise UserError(f"{sample.image_path}: {tile.shape[1]}x{tile.shape[0]} pixels; the mosaic needs "
                            f"square tiles of one size")
        if image is None:
            image = np.zeros((n * size, n * size, 3), dtype=np.uint8)
            labels = np.zeros((n * size, n * size), dtype=np.uint32)
        ids, compact = np.unique(tile_labels, return_inverse=True)
        compact = compact.reshape(tile_labels.shape).astype(np.uint32)
        if ids[0] != 0:
            compact += 1
        row, col = divmod(k, n)
        image[row * size:(row + 1) * size, col * size:(col + 1) * size] = tile
        labels[row * size:(row + 1) * size, col * size:(col + 1) * size] = np.where(compact > 0, compact + next_id, 0)
        next_id += int(compact.max())
    return image, labels
