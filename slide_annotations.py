"""`import_annotations --slide`: nuclei corrected on whole slides in QuPath -> training images (folders layout).

    python main.py import_annotations --format qupath_geojson --slide slides/A.svs \
        --annotations corrected/A.geojson --output_dir corrected_data

The GeoJSON (QuPath's "Export objects as GeoJSON", or what `predict` wrote for the slide and a person edited)
is in level-0 pixel coordinates of the slide, QuPath's convention (origin at the top-left corner of the
slide, a pixel's centre at (x + 0.5, y + 0.5)), the one `predict` writes. Its objects are sorted into

- **areas**: annotation polygons (objectType `annotation`, Polygon or MultiPolygon) whose class is not the
  nucleus class (`--nucleus_class`, default "Nucleus"; class names are compared without case and without
  QuPath's trailing "*"; no class counts as an area).
  An area says "every nucleus in here is outlined". `--area_class` restricts areas to the classes named
  (other annotations are then skipped and counted);
- **nuclei**: every other polygon: detections (what `predict` wrote), cells (their nucleus outline when
  QuPath exported one), annotations of the nucleus class (what a person drew);
- **ignored regions**: annotations of QuPath's built-in class "Ignore*" (any case, with or without the star):
  their pixels inside an area are added to its ignore mask (left out of training and scoring);
- skipped and counted: points, lines, tiles and any other object without a polygon.

Each area becomes one training image, named `<slide stem>_x<x>_y<y>_<w>x<h>` after its box: the level-0
pixels whose centre lies inside the area's bounding box (no margin, clipped to the slide), read with the
slide readers of `predict` (`slides.open_slide`); its label map: the nuclei rasterised into the box with the
tile importer's rasteriser (pixel centres inside, ids 1, 2, ... in file order, a later polygon wins where
polygons overlap; reported), a nucleus crossing the box edge clipped to it; and an ignore mask
(`ignore/<name>.png`, written when the area is not its box): the box pixels whose centre lies outside the
area polygon, which training and scoring leave out. Nuclei with no pixel inside any area are not used
(counted). `dataset.json` records the slides' pixel size (`--mpp` overrides their metadata); slides of
different pixel sizes are refused (a folders dataset has one pixel size): import each into its own folder.
`groups.csv` puts each area in its slide's group (train's validation split is stratified by group).

Everything is parsed, every slide opened and every area checked before a pixel is read; the files are
written to a staging folder beside `--output_dir` and moved in only when all areas are done, so a failure
leaves nothing behind. Problems are one line each (exit status 2): a slide that cannot be opened, a GeoJSON
without an area (with how to draw one), whose objects all lie outside the slide (another slide's export),
an area of zero size, an area larger than `MAX_AREA_SIDE` pixels a side, slides of different pixel sizes.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import dataset
import export
import geojson_io
import slides
import utils
from utils import UserError

log = logging.getLogger(__name__)

NUCLEUS_CLASS = "Nucleus"
IGNORE_CLASS = "ignore"  # QuPath's built-in class "Ignore*": pixels left out of training and scoring
MAX_AREA_SIDE = 8192
ANNOTATION_SUFFIXES = (".geojson", ".json")
REPORT = "import_report.csv"
REPORT_COLUMNS = ("image", "slide", "annotations", "area", "area_name", "area_class", "x", "y", "width", "height",
                  "mpp", "nuclei", "ignored_pixels", "skipped_degenerate", "overlapping_polygons",
                  "overwritten_pixels", "hidden_nuclei")
# QuPath 0.2 wrote the object type as the feature's "id"
_LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                 "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core"}
_NOT_NUCLEI = ("tile", "tma_core", "root")
# Polygons are moved up-left by this many pixels before rasterising, so that a pixel centre lying on an edge
# (up to float noise) belongs to the pixel below / right of it: the half-open rule [edge, next edge) by which
# `predict` reads its label image off the model's grid (floor((y + 0.5) * scale)); with it a slide predicted
# at any pixel size and imported unchanged gives back its label image.
EDGE_EPSILON = 1e-6


# ----------------------------------------------------------------------------------------------
# Reading the GeoJSON
# ----------------------------------------------------------------------------------------------
@dataclass
class Polygonal:
    """One object's polygons: [(exterior ring (N, 2) x/y, [hole rings])]; the shape the tile importer's
    rasteriser takes (`annotations.rasterise` reads `.parts`)."""

    parts: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)

    def valid_exteriors(self) -> list[np.ndarray]:
        return [ring for ring, _ in self.parts if ring_has_area(ring)]

    def extent(self) -> tuple[float, float, float, float] | None:
        """(xmin, ymin, xmax, ymax) over its valid exterior rings; None when it has none."""
        rings = self.valid_exteriors()
        if not rings:
            return None
        points = np.concatenate(rings)
        return (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()),
                float(points[:, 1].max()))

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(xmin, ymin, xmax, ymax) over the finite vertices of its exterior rings (degenerate ones too: the
        cheap test of which boxes it may touch); None without any."""
        points = [ring[np.isfinite(ring).all(axis=1)] for ring, _ in self.parts if len(ring)]
        points = [p for p in points if len(p)]
        if not points:
            return None
        lo = np.min([p.min(axis=0) for p in points], axis=0)
        hi = np.max([p.max(axis=0) for p in points], axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def shifted(self, dx: float, dy: float) -> "Polygonal":
        offset = np.array([dx, dy])
        return Polygonal([(ring + offset, [h + offset for h in holes]) for ring, holes in self.parts])


@dataclass
class Area:
    number: int  # 1-based position among the file's areas
    name: str
    class_name: str
    polygon: Polygonal


@dataclass
class SlideObjects:
    path: Path
    areas: list[Area]
    nuclei: list[Polygonal]
    skipped_objects: int = 0  # points, lines, tiles, features without geometry
    skipped_annotations: int = 0  # annotations of classes not named by --area_class
    ignored: list[Polygonal] = field(default_factory=list)  # annotations of QuPath's class "Ignore*"


def ring_has_area(ring: np.ndarray) -> bool:
    """At least three finite vertices enclosing a non-zero area (so at least three distinct ones)."""
    if len(ring) < 3 or not np.isfinite(ring).all():
        return False
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) > 1e-9


def _polygonal(geometry: Any, path: Path, where: str) -> Polygonal | None:
    """The Polygon / MultiPolygon `geometry` as a Polygonal; None for any other geometry."""
    parts = geojson_io.polygon_parts(geometry, path, where)
    return None if parts is None else Polygonal(parts)


def class_name(properties: dict) -> str | None:
    """The QuPath class of a feature: `classification.name` (0.3+), `classification.names` joined by ': '
    (derived classes), a plain string, or None."""
    c = properties.get("classification")
    if isinstance(c, str):
        return c or None
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            return c["name"] or None
        if isinstance(c.get("names"), list):
            return ": ".join(str(n) for n in c["names"]) or None
    return None


def class_key(name: str | None) -> str:
    """How class names are compared: without case, surrounding spaces or QuPath's trailing '*' (its built-in
    classes "Region*", "Ignore*")."""
    return (name or "").strip().lower().rstrip("*").strip()


def object_type(feature: dict, properties: dict) -> str | None:
    kind = properties.get("objectType")
    if isinstance(kind, str):
        return kind.lower()
    return _LEGACY_TYPES.get(str(feature.get("id")))


def parse_slide_geojson(path: str | os.PathLike, nucleus_class: str = NUCLEUS_CLASS,
                        area_classes: Sequence[str] | None = None) -> SlideObjects:
    """Areas and nuclei of a slide's GeoJSON (see the module docstring)."""
    path = Path(path)
    nucleus = class_key(nucleus_class)
    wanted = None if area_classes is None else {class_key(c) for c in area_classes}
    result = SlideObjects(path, [], [])
    for number, feature in enumerate(geojson_io.read_features(path), start=1):
        if not isinstance(feature, dict):
            raise UserError(f"{path}: feature {number}: not a JSON object")
        properties = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        kind = object_type(feature, properties)
        geometry = feature.get("geometry")
        if kind == "cell" and isinstance(feature.get("nucleusGeometry"), dict):
            geometry = feature["nucleusGeometry"]  # a QuPath cell: its nucleus outline
        shape = _polygonal(geometry, path, f"feature {number}")
        if shape is None or kind in _NOT_NUCLEI:
            result.skipped_objects += 1
            continue
        name = class_name(properties)
        key = class_key(name)
        if kind == "annotation" and key == IGNORE_CLASS:
            result.ignored.append(shape)
            continue
        if kind == "annotation" and key != nucleus:
            if wanted is not None and key not in wanted:
                result.skipped_annotations += 1
                continue
            label = properties.get("name") if isinstance(properties.get("name"), str) else ""
            result.areas.append(Area(len(result.areas) + 1, label, name or "", shape))
        else:
            result.nuclei.append(shape)
    return result


# ----------------------------------------------------------------------------------------------
# Planning: boxes, checks
# ----------------------------------------------------------------------------------------------
def pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """[first, last + 1) of the pixels whose centre (i + 0.5) lies in [lo, hi], clipped to [0, size)."""
    first = max(0, math.ceil(lo - 0.5))
    stop = min(int(size), math.floor(hi - 0.5) + 1)
    return first, max(first, stop)


def area_box(area: Area, dimensions: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) in level-0 pixels of an area's box on a slide of `dimensions` (w, h); None when the
    area has no valid ring. Width or height 0 when it lies outside the slide or is narrower than a pixel."""
    extent = area.polygon.extent()
    if extent is None:
        return None
    x0, x1 = pixel_span(extent[0], extent[2], dimensions[0])
    y0, y1 = pixel_span(extent[1], extent[3], dimensions[1])
    return x0, y0, x1 - x0, y1 - y0


def _outside(extent: tuple[float, float, float, float] | None, dimensions: tuple[int, int]) -> bool:
    if extent is None:
        return False
    return extent[2] <= 0 or extent[3] <= 0 or extent[0] >= dimensions[0] or extent[1] >= dimensions[1]


def _describe(area: Area) -> str:
    bits = [f"area {area.number}"]
    if area.name:
        bits.append(repr(area.name))
    bits.append(f"class {area.class_name!r}" if area.class_name else "no class")
    return " ".join(bits[:1]) + f" ({', '.join(bits[1:])})"


@dataclass
class PlannedArea:
    area: Area
    box: tuple[int, int, int, int]
    image_name: str


@dataclass
class PlannedSlide:
    stem: str
    slide_path: Path
    objects: SlideObjects
    mpp: float
    dimensions: tuple[int, int]
    areas: list[PlannedArea]


def how_to_draw_area(nucleus_class: str) -> str:
    return (f"in QuPath draw an annotation around each corrected region with the rectangle or polygon tool and give "
            f"it any class but '{nucleus_class}' (e.g. 'Region') or none, then export again (File > Export objects "
            f"as GeoJSON, 'Export as FeatureCollection')")


def plan_slide(stem: str, slide_path: Path, objects: SlideObjects, nucleus_class: str,
               mpp: float | None, rasterise: Callable | None = None) -> PlannedSlide:
    """Open the slide (its size and pixel size) and check every area of `objects` against it; UserError for
    the problems listed in the module docstring. With `rasterise`, an area whose polygon holds no pixel
    centre is refused here too (else when it is imported)."""
    path = objects.path
    if not objects.areas:
        extra = (f" ({objects.skipped_annotations} annotation(s) of other classes than --area_class skipped)"
                 if objects.skipped_annotations else "")
        raise UserError(f"{path}: no area in the file ({len(objects.nuclei)} nuclei{extra}); an area marks where "
                        f"every nucleus is outlined: {how_to_draw_area(nucleus_class)}")
    with slides.open_slide(slide_path, mpp=mpp) as reader:
        dims = reader.dimensions
        pixel_size = reader.require_mpp()
    inside_areas = [a for a in objects.areas if not _outside(a.polygon.extent(), dims)]
    outside_nuclei = sum(_outside(n.bounds(), dims) for n in objects.nuclei)
    if not inside_areas:
        inside_nuclei = len(objects.nuclei) - outside_nuclei
        raise UserError(f"{path}: none of its {len(objects.areas)} area(s) lies inside {slide_path.name} "
                        f"({dims[0]} x {dims[1]} px at level 0; {inside_nuclei} of {len(objects.nuclei)} nuclei do): "
                        f"is it the export of another slide, or are its coordinates in another frame (a crop, a "
                        f"downsampled image, micrometres)?")
    outside_areas = len(objects.areas) - len(inside_areas)
    if outside_areas or outside_nuclei:
        log.warning("%s: %d area(s) and %d nuclei lie outside %s (%d x %d px at level 0) and are not used: are "
                    "their coordinates in another frame (another slide, a crop, a downsampled image)?", path.name,
                    outside_areas, outside_nuclei, slide_path.name, dims[0], dims[1])
    planned = []
    for area in inside_areas:
        box = area_box(area, dims)
        if box is None or box[2] == 0 or box[3] == 0:
            raise UserError(f"{path}: {_describe(area)}: zero size (fewer than three distinct points, no area, or "
                            f"narrower than one pixel); delete it in QuPath or draw it again")
        if max(box[2], box[3]) > MAX_AREA_SIDE:
            raise UserError(f"{path}: {_describe(area)}: {box[2]} x {box[3]} px at level 0, larger than "
                            f"{MAX_AREA_SIDE} px a side; split it into smaller areas in QuPath")
        if rasterise is not None and not area_mask(rasterise, area, box).any():
            raise UserError(f"{path}: {_describe(area)}: zero size (no pixel centre inside the polygon); delete it "
                            f"in QuPath or draw it again")
        planned.append(PlannedArea(area, box, f"{stem}_x{box[0]}_y{box[1]}_{box[2]}x{box[3]}"))
    names = [p.image_name for p in planned]
    for p in planned:  # two areas with one box: number the later ones
        if names.count(p.image_name) > 1:
            p.image_name = f"{p.image_name}_{p.area.number}"
    return PlannedSlide(stem, slide_path, objects, pixel_size, dims, planned)


def pair_slides(slide_args: Sequence[str], annotations: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(stem, slide, GeoJSON) per `--slide`: with one slide `--annotations` may be its GeoJSON file; otherwise
    (or when it is a folder) each slide's `<stem>.geojson` / `<stem>.json` in the `--annotations` folder."""
    paths = [Path(p) for p in slide_args]
    for p in paths:
        if not p.is_file():
            raise UserError(f"--slide {p}: file not found")
    stems: dict[str, Path] = {}
    for p in paths:
        stem = p.name[: -len(".ome.tiff")] if p.name.lower().endswith(".ome.tiff") else p.stem
        if stem in stems:
            raise UserError(f"--slide {p}: two slides share the name {stem!r} ({stems[stem]} and {p}); their areas "
                            f"would get the same image names")
        stems[stem] = p
    notes = Path(annotations)
    if notes.is_file():
        if len(paths) != 1:
            raise UserError(f"--annotations {notes}: one file for {len(paths)} slides; give a folder holding "
                            f"<slide stem>.geojson for each slide")
        return [(next(iter(stems)), paths[0], notes)]
    if not notes.is_dir():
        raise UserError(f"--annotations {notes}: file or folder not found")
    pairs = []
    for stem, p in stems.items():
        found = [notes / (stem + s) for s in ANNOTATION_SUFFIXES if (notes / (stem + s)).is_file()]
        if not found:
            raise UserError(f"--slide {p}: no annotation file {notes / (stem + '.geojson')}")
        pairs.append((stem, p, found[0]))
    return pairs


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------
def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _overlaps(extent: tuple[float, float, float, float] | None, box: tuple[int, int, int, int]) -> bool:
    if extent is None:
        return False
    x, y, w, h = box
    return extent[0] < x + w and extent[2] > x and extent[1] < y + h and extent[3] > y


def area_mask(rasterise: Callable, area: Area, box: tuple[int, int, int, int]) -> np.ndarray:
    """bool (h, w): the pixels of `box` whose centre lies inside the area polygon (edge rule: EDGE_EPSILON)."""
    x, y, w, h = box
    return rasterise([area.polygon.shifted(-x - EDGE_EPSILON, -y - EDGE_EPSILON)], (h, w)).labels > 0


def import_area(reader: Any, planned: PlannedArea, nuclei: Sequence[Polygonal], rasterise: Callable,
                shape_pixels: Callable, ignored: Sequence[Polygonal] = (),
                extents: Sequence[tuple[float, float, float, float] | None] | None = None
                ) -> tuple[np.ndarray, Any, np.ndarray, set[int]]:
    """(RGB image, rasterised labels, ignore mask bool: outside the area or inside an `ignored` polygon,
    indices into `nuclei` with a pixel inside the area). `extents`: the nuclei's `bounds()`, when known."""
    x, y, w, h = planned.box
    size = (h, w)
    dx, dy = -x - EDGE_EPSILON, -y - EDGE_EPSILON
    inside = area_mask(rasterise, planned.area, planned.box)
    if not inside.any():
        raise UserError(f"{planned.image_name}: {_describe(planned.area)}: zero size (no pixel centre inside "
                        f"the polygon); delete it in QuPath or draw it again")
    if extents is None:
        extents = [n.bounds() for n in nuclei]
    candidates = [i for i, e in enumerate(extents) if _overlaps(e, planned.box)]
    shifted = [nuclei[i].shifted(dx, dy) for i in candidates]
    result = rasterise(shifted, size)
    # used: the nuclei with a pixel of their own inside the area (ids run 1, 2, ... over the drawn shapes)
    inside_ids = np.unique(result.labels[inside])
    inside_ids = inside_ids[inside_ids > 0].astype(np.int64)
    if result.skipped_degenerate == 0:
        used = {candidates[k - 1] for k in inside_ids.tolist()}
    else:
        drawn = [i for i, shape in zip(candidates, shifted) if shape_pixels(shape, size) is not None]
        used = {drawn[k - 1] for k in inside_ids.tolist()}
    ignore = ~inside
    for shape in ignored:
        if _overlaps(shape.extent(), planned.box):
            ignore |= rasterise([shape.shifted(dx, dy)], size).labels > 0
    image = reader.read_region(x, y, w, h, level=0)
    return image, result, ignore, used


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir}: folder exists and is not empty; use --overwrite or choose "
                        "another folder")


def run(args: argparse.Namespace, rasterise: Callable, shape_pixels: Callable) -> int:
    """The `--slide` path of `import_annotations` (`annotations.run` passes its rasteriser: `rasterise(shapes,
    (H, W))` with `.labels` and the overlap counts, `shape_pixels(shape, (H, W))` -> flat indices or None)."""
    from tqdm import tqdm

    if args.format != "qupath_geojson":
        raise UserError(f"--format {args.format}: --slide takes QuPath GeoJSON (--format qupath_geojson)")
    if getattr(args, "images", None):
        raise UserError("--images: not used with --slide (the pixels come from the slide)")
    if args.mpp is not None and not (math.isfinite(args.mpp) and args.mpp > 0):
        raise UserError(f"--mpp {args.mpp}: must be a positive number of micrometres per pixel")
    nucleus_class = str(getattr(args, "nucleus_class", NUCLEUS_CLASS) or "").strip()
    if not nucleus_class:
        raise UserError("--nucleus_class: must name a class (QuPath's default is 'Nucleus')")
    area_classes = (utils.parse_list(args.area_class, str, "--area_class")
                    if getattr(args, "area_class", None) else None)
    if area_classes is not None and class_key(nucleus_class) in {class_key(c) for c in area_classes}:
        raise UserError(f"--area_class {args.area_class}: names the nucleus class {nucleus_class!r}")
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.overwrite)
    pairs = pair_slides(args.slide, args.annotations)

    # 1. parse, open and check everything: nothing is read or written while an input can still fail
    planned = []
    for stem, slide_path, note_path in pairs:
        objects = parse_slide_geojson(note_path, nucleus_class, area_classes)
        planned.append(plan_slide(stem, slide_path, objects, nucleus_class, args.mpp, rasterise))
    first = planned[0]
    for p in planned[1:]:
        if abs(p.mpp - first.mpp) > 0.01 * first.mpp:
            raise UserError(f"--slide {p.slide_path}: pixel size {p.mpp:g} µm/px differs from {first.slide_path.name}'s "
                            f"{first.mpp:g} µm/px; a dataset holds one pixel size (dataset.json mpp): import the slides "
                            f"of each pixel size into their own --output_dir")
    mpp = float(np.mean([p.mpp for p in planned]))

    # 2. read, rasterise and write into a staging folder; moved into --output_dir when everything is done
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.import-", dir=output_dir.parent))
    rows, groups, unused_total, total_areas = [], [], 0, sum(len(p.areas) for p in planned)
    try:
        for folder in (dataset.FOLDERS_IMAGE_DIR, dataset.FOLDERS_LABEL_DIR, dataset.FOLDERS_IGNORE_DIR):
            (staging / folder).mkdir()
        bar = tqdm(total=total_areas, desc="importing areas", unit="area", disable=total_areas < 5)
        for p in planned:
            used: set[int] = set()
            extents = [n.bounds() for n in p.objects.nuclei]
            with slides.open_slide(p.slide_path, mpp=args.mpp) as reader:
                for item in p.areas:
                    image, result, ignore, inside = import_area(reader, item, p.objects.nuclei, rasterise,
                                                                shape_pixels, p.objects.ignored, extents)
                    used |= inside
                    name = item.image_name
                    (staging / dataset.FOLDERS_IMAGE_DIR / f"{name}.png").write_bytes(_png_bytes(image))
                    export.save_label_tiff(staging / dataset.FOLDERS_LABEL_DIR / f"{name}.tif", result.labels,
                                           smallest=True)
                    if ignore.any():
                        (staging / dataset.FOLDERS_IGNORE_DIR / f"{name}.png").write_bytes(
                            _png_bytes(ignore.astype(np.uint8) * 255))
                    x, y, w, h = item.box
                    rows.append({"image": f"{name}.png", "slide": str(p.slide_path), "annotations": p.objects.path.name,
                                 "area": item.area.number, "area_name": item.area.name,
                                 "area_class": item.area.class_name, "x": x, "y": y, "width": w, "height": h,
                                 "mpp": p.mpp, "nuclei": result.nuclei, "ignored_pixels": int(ignore.sum()),
                                 "skipped_degenerate": result.skipped_degenerate,
                                 "overlapping_polygons": result.overlapping_polygons,
                                 "overwritten_pixels": result.overwritten_pixels, "hidden_nuclei": result.hidden_nuclei})
                    groups.append((name, p.stem))
                    bar.update(1)
            unused = len(p.objects.nuclei) - len(used)
            if p.objects.nuclei and not used:
                log.warning("%s: none of its %d nuclei lies inside an area (the areas are trained as background "
                            "only): are the nuclei's coordinates in another frame than the areas'?",
                            p.objects.path.name, len(p.objects.nuclei))
            unused_total += unused
            log.info("%s: %d area(s), %d of %d nuclei inside them (%d outside every area, not used); %d object(s) "
                     "without a polygon skipped", p.objects.path.name, len(p.areas), len(used),
                     len(p.objects.nuclei), unused, p.objects.skipped_objects)
        bar.close()
        if not any((staging / dataset.FOLDERS_IGNORE_DIR).iterdir()):
            (staging / dataset.FOLDERS_IGNORE_DIR).rmdir()
        utils.write_json(staging / dataset.FOLDERS_INFO, {"mpp": mpp})
        utils.write_csv(staging / dataset.FOLDERS_GROUPS, [{"stem": s, "group": g} for s, g in groups],
                        ["stem", "group"])
        utils.write_csv(staging / REPORT, rows, list(REPORT_COLUMNS))
        utils.make_output_dir(output_dir)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = output_dir / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = {k: sum(int(r[k]) for r in rows) for k in ("nuclei", "skipped_degenerate", "overlapping_polygons",
                                                       "overwritten_pixels", "hidden_nuclei")}
    skipped = sum(p.objects.skipped_objects for p in planned)
    print(f"{len(planned)} slide(s), {len(rows)} area(s) -> {len(rows)} training image(s) with {total['nuclei']} nuclei "
          f"at {mpp:g} µm/px in {output_dir} (folders layout); {unused_total} nuclei outside every area not used; "
          f"skipped: {total['skipped_degenerate']} degenerate polygon(s), {skipped} object(s) without a polygon; "
          f"{total['overlapping_polygons']} polygon(s) overlapped earlier ones ({total['overwritten_pixels']} pixels "
          f"overwritten, later wins; {total['hidden_nuclei']} nuclei hidden); details in {output_dir / REPORT}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--slide` options of `import_annotations` (added by `annotations.add_arguments`)."""
    parser.add_argument("--slide", nargs="+", default=None, metavar="SLIDE",
                        help="whole-slide image(s) the GeoJSON was drawn on (level-0 coordinates); each area "
                             "annotation becomes a training image read from the slide. --annotations is then the "
                             "GeoJSON file (one slide) or a folder of <slide stem>.geojson (docs/correction_loop.md)")
    parser.add_argument("--nucleus_class", default=NUCLEUS_CLASS,
                        help="with --slide: the QuPath class of nuclei drawn as annotations (any case); annotations of "
                             "other classes (or none) are areas")
    parser.add_argument("--area_class", default=None,
                        help="with --slide: only annotations of these classes (comma-separated) are areas, e.g. "
                             "Region; others are skipped (default: every non-nucleus annotation)")
