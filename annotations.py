"""`import_annotations` command: polygon annotations -> the folders dataset layout (docs/data.md).

    python main.py import_annotations --format imagescope_xml --images MoNuSeg/images \
        --annotations MoNuSeg/annotations --output_dir MoNuSeg_folders --mpp 0.25

Reads, for every image `<stem>.(png|jpg|jpeg|tif|tiff)` in `--images`, its annotation file in `--annotations`:
`<stem>.xml` for `imagescope_xml` (Aperio ImageScope, MoNuSeg's format: `<Annotations><Annotation><Regions>
<Region><Vertices><Vertex X=".." Y=".."/>`, one nucleus per Region) or `<stem>.geojson` / `<stem>.json` for
`qupath_geojson` (QuPath's "Export objects as GeoJSON", also what `predict` writes: one nucleus per Polygon or
MultiPolygon feature). Each polygon is rasterised with scikit-image into an instance label map of the image's
size: a pixel belongs to a polygon when its centre lies inside, polygon holes are left out. Where a vertex lies
is a property of the format (`VERTEX_CONVENTIONS`): ImageScope XML vertices are pixel centres (vertex (x, y) = the
centre of pixel column x, row y, 0-based: this reproduces MoNuSeg's published binary masks), QuPath GeoJSON
vertices are pixel edges (origin at the top-left corner of the image, QuPath's and `predict`'s convention). Instances get ids 1, 2, ... in file
order; where polygons overlap the later one wins (reported); polygons with fewer than three distinct
vertices, no area or no pixel inside the image are skipped and counted.

Output (`--output_dir`): `images/` (the image files, copied unchanged), `labels/<stem>.tif` (uint16, or
uint32 beyond 65535 nuclei), `dataset.json` (`{"mpp": ...}` when `--mpp` is given) and `import_report.csv`
(per image: polygons read, nuclei written, skipped, overlapping). Every input is read and checked before the
first file is written; a problem (an image without annotations or the reverse, unparsable XML/GeoJSON, an
unreadable image) is one line naming the file and exit status 2.

With `--slide SLIDE --annotations FILE.geojson` (areas and nuclei drawn on whole slides in level-0
coordinates) the import is done by `slide_annotations.run` (docs/correction_loop.md).
"""
from __future__ import annotations

import argparse
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import dataset
import export
import geojson_io
import image_io
import slide_annotations
import utils
from utils import UserError

log = logging.getLogger(__name__)

# The project's one image reader.
read_rgb = image_io.read_image

FORMATS = ("imagescope_xml", "qupath_geojson")
ANNOTATION_SUFFIXES = {"imagescope_xml": (".xml",), "qupath_geojson": (".geojson", ".json")}
IMAGE_SUFFIXES = dataset.FOLDERS_IMAGE_SUFFIXES
REPORT = "import_report.csv"
# Where a vertex (x, y) lies, per format. PIXEL_EDGE: coordinates of pixel corners, the image's top-left corner is
# (0, 0) and pixel column x, row y is the square [x, x+1] x [y, y+1] (QuPath's convention; `predict`'s GeoJSON
# outlines follow these edges, so its export imports back exactly). PIXEL_CENTRE: vertex (x, y) is the centre of
# pixel column x, row y (0-based). ImageScope XML is read as pixel centres because that reproduces the binary
# masks MoNuSeg's organisers published beside their XML: foreground Dice 0.99-1.00 on 12 of its 13 images,
# against 0.956-0.976 on all 13 when the vertices are taken as pixel edges (per-nucleus PQ between the two
# readings about 0.90; measured on MoNuSeg by the author of issue 19).
PIXEL_EDGE, PIXEL_CENTRE = "pixel_edge", "pixel_centre"
VERTEX_CONVENTIONS = {"imagescope_xml": PIXEL_CENTRE, "qupath_geojson": PIXEL_EDGE}
REPORT_COLUMNS = ("image", "annotations", "polygons", "nuclei", "skipped_degenerate", "skipped_not_polygon",
                  "overlapping_polygons", "overwritten_pixels", "hidden_nuclei")


# ----------------------------------------------------------------------------------------------
# Polygons
# ----------------------------------------------------------------------------------------------
@dataclass
class Shape:
    """One nucleus: one or more polygons, each an exterior ring plus optional hole rings; rings are (N, 2)
    float arrays of (x, y) vertices."""

    parts: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)


@dataclass
class ParsedFile:
    path: Path
    shapes: list[Shape]
    not_polygon: int = 0   # features that are no (Multi)Polygon: points, lines, empty geometries


def parse_imagescope_xml(path: str | Path) -> ParsedFile:
    """Every `Region` of an Aperio ImageScope XML file as one shape (its `Vertex` X/Y attributes)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path}: not a valid XML file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    regions = list(root.iter("Region"))
    if root.tag != "Annotations" and not regions:
        raise UserError(f"{path}: not an ImageScope annotation file (root element <{root.tag}>, "
                        "expected <Annotations> with <Region> elements)")
    shapes = []
    for number, region in enumerate(regions, start=1):
        points = []
        for vertex in region.iter("Vertex"):
            try:
                points.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
            except (KeyError, ValueError):
                raise UserError(f"{path}: Region {region.attrib.get('Id', number)}: a Vertex without numeric "
                                f"X and Y attributes") from None
        ring = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        shapes.append(Shape([(ring, [])]))
    return ParsedFile(path, shapes)


def parse_qupath_geojson(path: str | Path) -> ParsedFile:
    """Every Polygon / MultiPolygon feature of a GeoJSON file as one shape (holes kept as hole rings)."""
    path = Path(path)
    shapes, not_polygon = [], 0
    for number, feature in enumerate(geojson_io.read_features(path), start=1):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            if isinstance(feature, dict) and "geometry" in feature and feature["geometry"] is None:
                not_polygon += 1
                continue
            raise UserError(f"{path}: feature {number}: no geometry object")
        parts = geojson_io.polygon_parts(geometry, path, f"feature {number}")
        if parts is None:
            not_polygon += 1
            continue
        shapes.append(Shape(parts))
    return ParsedFile(path, shapes, not_polygon)


PARSERS = {"imagescope_xml": parse_imagescope_xml, "qupath_geojson": parse_qupath_geojson}


def _ring_ok(ring: np.ndarray) -> bool:
    """At least three distinct finite vertices enclosing a non-zero area."""
    if len(ring) < 3 or not np.isfinite(ring).all():
        return False
    if len(np.unique(ring, axis=0)) < 3:
        return False
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return area > 1e-9


def _centre_offset(convention: str) -> float:
    """What to subtract from a vertex to get scikit-image's frame (pixel (r, c) centred on integer (r, c))."""
    if convention == PIXEL_EDGE:
        return 0.5
    if convention == PIXEL_CENTRE:
        return 0.0
    raise ValueError(f"unknown vertex convention {convention!r} (expected {PIXEL_EDGE!r} or {PIXEL_CENTRE!r})")


def _ring_pixels(ring: np.ndarray, size: tuple[int, int], convention: str = PIXEL_EDGE) -> np.ndarray:
    """Flat indices of the pixels whose centre lies inside `ring` or on its boundary (x, y vertices in
    `convention`: PIXEL_EDGE or PIXEL_CENTRE)."""
    from skimage.draw import polygon

    offset = _centre_offset(convention)
    rows, cols = polygon(ring[:, 1] - offset, ring[:, 0] - offset, shape=size)
    return rows.astype(np.int64) * size[1] + cols


def shape_pixels(shape: Shape, size: tuple[int, int], convention: str = PIXEL_EDGE) -> np.ndarray | None:
    """Sorted flat pixel indices (into an image of `size` = (H, W)) covered by a shape, holes left out;
    None when degenerate: no valid exterior ring, or no pixel centre inside the image. `convention`: where the
    vertices lie (PIXEL_EDGE, QuPath's, the default; PIXEL_CENTRE for ImageScope XML; see VERTEX_CONVENTIONS)."""
    _centre_offset(convention)
    exteriors = [(ext, holes) for ext, holes in shape.parts if _ring_ok(ext)]
    if not exteriors:
        return None
    inside = []
    for exterior, holes in exteriors:
        pixels = _ring_pixels(exterior, size, convention)
        cut = [_ring_pixels(h, size, convention) for h in holes if _ring_ok(h)]
        if cut:
            pixels = np.setdiff1d(pixels, np.concatenate(cut))
        inside.append(pixels)
    pixels = np.unique(np.concatenate(inside))
    return pixels if pixels.size else None


@dataclass
class Rasterised:
    labels: np.ndarray
    polygons: int
    nuclei: int
    skipped_degenerate: int
    overlapping_polygons: int
    overwritten_pixels: int
    hidden_nuclei: int


def rasterise(shapes: Sequence[Shape], size: tuple[int, int], convention: str = PIXEL_EDGE) -> Rasterised:
    """Instance label map (uint32, `size` = (H, W)) of `shapes`: ids 1, 2, ... in order over the shapes that
    are drawn (degenerate ones are skipped and counted); a later shape overwrites earlier ones where they
    overlap (`overlapping_polygons` shapes did, `overwritten_pixels` pixels changed owner, `hidden_nuclei`
    earlier nuclei lost every pixel). `convention`: where the vertices lie, `VERTEX_CONVENTIONS[format]`
    (default PIXEL_EDGE, QuPath GeoJSON's)."""
    _centre_offset(convention)
    size = (int(size[0]), int(size[1]))
    labels = np.zeros(size, dtype=np.uint32)
    flat = labels.reshape(-1)
    skipped = overlapping = overwritten = 0
    next_id = 1
    for shape in shapes:
        pixels = shape_pixels(shape, size, convention)
        if pixels is None:
            skipped += 1
            continue
        hit = int(np.count_nonzero(flat[pixels]))
        if hit:
            overlapping += 1
            overwritten += hit
        flat[pixels] = next_id
        next_id += 1
    drawn = next_id - 1
    present = len(np.unique(labels[labels > 0]))
    return Rasterised(labels, len(shapes), present, skipped, overlapping, overwritten, drawn - present)


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="imagescope_xml: Aperio ImageScope XML (MoNuSeg), <stem>.xml per image; "
                             "qupath_geojson: QuPath GeoJSON export, <stem>.geojson (or .json) per image")
    parser.add_argument("--images", default=None, help="folder with the images (png, jpg, tif); not with --slide")
    parser.add_argument("--annotations", required=True, help="folder with one annotation file per image")
    parser.add_argument("--output_dir", required=True, help="the new dataset folder (folders layout)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="micrometres per pixel of the images, written to dataset.json "
                             "(default: none written; the model's pixel size is then assumed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output_dir (files of the same name are replaced)")
    slide_annotations.add_arguments(parser)  # --slide, --nucleus_class, --area_class


def _by_stem(folder: Path, suffixes: Sequence[str], what: str, option: str) -> dict[str, Path]:
    """`dataset.files_by_stem` of a folder given by `option`, which must exist and hold at least one file."""
    if not folder.is_dir():
        raise UserError(f"{option} {folder}: folder not found")
    found = dataset.files_by_stem(folder, suffixes, what)
    if not found:
        raise UserError(f"{option} {folder}: no {what} files ({', '.join(suffixes)})")
    return found


def pair_files(images_dir: Path, annotations_dir: Path, fmt: str) -> list[tuple[str, Path, Path]]:
    """(stem, image, annotation file) for every image; a missing partner on either side is a UserError."""
    images = _by_stem(images_dir, IMAGE_SUFFIXES, "image", "--images")
    notes = _by_stem(annotations_dir, ANNOTATION_SUFFIXES[fmt], "annotation", "--annotations")
    for stem, path in images.items():
        if stem not in notes:
            raise UserError(f"{path}: no annotation file for this image (expected "
                            f"{annotations_dir / (stem + ANNOTATION_SUFFIXES[fmt][0])})")
    for stem, path in notes.items():
        if stem not in images:
            raise UserError(f"{path}: annotation file without an image (expected {images_dir / stem}.png/.tif)")
    return [(stem, images[stem], notes[stem]) for stem in sorted(images)]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if getattr(args, "slide", None):  # areas and nuclei drawn on whole slides (slide_annotations.py)
        return slide_annotations.run(args, rasterise, shape_pixels)
    if not args.images:
        raise UserError("--images: required (the folder of images), or --slide for annotations drawn on whole slides")
    if args.mpp is not None and not (math.isfinite(args.mpp) and args.mpp > 0):
        raise UserError(f"--mpp {args.mpp}: must be a positive number of micrometres per pixel")
    dataset.warn_if_implausible_mpp(args.mpp, "--mpp")  # recorded in dataset.json: train/evaluate resize by it
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise UserError(f"--output_dir {output_dir}: folder exists and is not empty; use --overwrite or "
                        "choose another folder")
    pairs = pair_files(Path(args.images), Path(args.annotations), args.format)
    for folder in (Path(args.images), Path(args.annotations)):
        if output_dir.resolve() in (folder.resolve(), *folder.resolve().parents):
            raise UserError(f"--output_dir {output_dir}: must not contain or be the input folder {folder}")

    # 1. read and check everything: nothing is written while an input can still fail
    parse = PARSERS[args.format]
    checked = []
    for stem, image_path, note_path in tqdm(pairs, desc="checking", unit="image", leave=False,
                                            disable=len(pairs) < 20):
        size = read_rgb(image_path).shape[:2]
        checked.append((stem, image_path, size, parse(note_path)))

    # 2. rasterise and write
    utils.make_output_dir(output_dir)
    rows = []
    for stem, image_path, size, parsed in tqdm(checked, desc="importing", unit="image", disable=len(checked) < 20):
        result = rasterise(parsed.shapes, size, VERTEX_CONVENTIONS[args.format])
        utils.atomic_write_bytes(output_dir / dataset.FOLDERS_IMAGE_DIR / image_path.name, image_path.read_bytes())
        export.save_label_tiff(output_dir / dataset.FOLDERS_LABEL_DIR / f"{stem}.tif", result.labels, smallest=True)
        rows.append({"image": image_path.name, "annotations": parsed.path.name, "polygons": result.polygons,
                     "nuclei": result.nuclei, "skipped_degenerate": result.skipped_degenerate,
                     "skipped_not_polygon": parsed.not_polygon, "overlapping_polygons": result.overlapping_polygons,
                     "overwritten_pixels": result.overwritten_pixels, "hidden_nuclei": result.hidden_nuclei})
        if result.polygons and not result.nuclei:
            log.warning("%s: none of its %d polygon(s) covers a pixel of %s (%d x %d): are its coordinates in "
                        "another frame (a whole slide, another magnification)?", parsed.path.name, result.polygons,
                        image_path.name, size[1], size[0])
        elif result.skipped_degenerate or result.overlapping_polygons or parsed.not_polygon:
            log.info("%s: %d nuclei; %d degenerate polygon(s) skipped, %d non-polygon object(s) skipped, "
                     "%d polygon(s) overlap earlier ones (%d pixels overwritten, %d nuclei hidden)",
                     parsed.path.name, result.nuclei, result.skipped_degenerate, parsed.not_polygon,
                     result.overlapping_polygons, result.overwritten_pixels, result.hidden_nuclei)
    if args.mpp is not None:
        utils.write_json(output_dir / dataset.FOLDERS_INFO, {"mpp": float(args.mpp)})
    utils.write_csv(output_dir / REPORT, rows, list(REPORT_COLUMNS))
    total = {k: sum(int(r[k]) for r in rows) for k in REPORT_COLUMNS[2:]}
    print(f"{len(rows)} image(s), {total['nuclei']} nuclei from {total['polygons']} polygon(s) -> {output_dir} "
          f"(folders layout); skipped: {total['skipped_degenerate']} degenerate polygon(s), "
          f"{total['skipped_not_polygon']} non-polygon object(s); {total['overlapping_polygons']} polygon(s) "
          f"overlapped earlier ones ({total['overwritten_pixels']} pixels overwritten, later wins; "
          f"{total['hidden_nuclei']} nuclei hidden); details in {output_dir / REPORT}")
    return 0
