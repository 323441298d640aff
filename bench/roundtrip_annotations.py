"""Round trip of the annotation importer: label maps -> polygons -> `import_annotations` -> label maps.

1. Every label map of a NuInsSeg folder (default ../shared/data/nuinsseg_sample) is exported with our own
   QuPath GeoJSON writer (`export.labels_to_geojson`), read back with `annotations.parse_qupath_geojson` and
   rasterised (`annotations.rasterise`); prints mean and minimum PQ against the original labels. What is lost:
   an instance's smaller disconnected pieces and its holes (the export writes one outer ring per instance).
2. A MoNuSeg-sized synthetic tile (1000 x 1000, `sample_data.render_tile`) goes through the whole command for
   both formats (the same outlines written as GeoJSON, pixel-edge vertices, and as ImageScope XML, pixel-centre
   vertices, i.e. shifted by -0.5); prints the seconds per image
   (after one warm-up import) and the PQ.

Usage: python bench/roundtrip_annotations.py [DATA_DIR]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import annotations  # noqa: E402
import dataset  # noqa: E402
import export  # noqa: E402
import main  # noqa: E402
import metrics  # noqa: E402
import sample_data  # noqa: E402


def real_round_trip(data_dir: Path) -> None:
    pqs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.geojson"
        for sample in dataset.discover_nuinsseg(data_dir):
            truth = dataset.read_label_mask(sample.label_path)
            path.write_text(json.dumps(export.labels_to_geojson(truth)))
            back = annotations.rasterise(annotations.parse_qupath_geojson(path).shapes, truth.shape).labels
            pqs.append(metrics.instance_metrics(truth, back)["pq"])
    print(f"{len(pqs)} label maps of {data_dir}: PQ(labels, import(export(labels))) mean {np.mean(pqs):.4f}, "
          f"min {np.min(pqs):.4f}")


def command_timing() -> None:
    import tifffile
    from PIL import Image

    image, labels, _ = sample_data.render_tile(np.random.default_rng(7), 1000, sample_data.ORGANS[2])
    count = len(np.unique(labels)) - 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for sub in ("images", "xml", "geojson"):
            (d / sub).mkdir()
        Image.fromarray(image).save(d / "images" / "tile.png")
        collection = export.labels_to_geojson(labels)
        (d / "geojson" / "tile.geojson").write_text(json.dumps(collection))
        # GeoJSON vertices are pixel edges, ImageScope's are pixel centres (annotations.VERTEX_CONVENTIONS):
        # the same outline is written half a pixel up and left
        regions = ["<Region><Vertices>" + "".join(f'<Vertex X="{x - 0.5}" Y="{y - 0.5}"/>' for x, y in
                                                  f["geometry"]["coordinates"][0]) + "</Vertices></Region>"
                   for f in collection["features"]]
        (d / "xml" / "tile.xml").write_text("<Annotations><Annotation><Regions>" + "".join(regions)
                                            + "</Regions></Annotation></Annotations>")
        runs = (("qupath_geojson", "geojson", False), ("imagescope_xml", "xml", True),
                ("qupath_geojson", "geojson", True))
        for fmt, folder, report in runs:  # the first run only warms up (imports)
            out = d / f"out_{fmt}"
            start = time.perf_counter()
            assert main.main(["-q", "import_annotations", "--format", fmt, "--images", str(d / "images"),
                              "--annotations", str(d / folder), "--output_dir", str(out), "--overwrite"]) == 0
            seconds = time.perf_counter() - start
            if report:
                back = tifffile.imread(out / "labels" / "tile.tif")
                print(f"{fmt}: 1000 x 1000 tile, {count} nuclei: {seconds:.2f} s, "
                      f"PQ {metrics.instance_metrics(labels, back)['pq']:.4f}")


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data" / "nuinsseg_sample"
    if folder.is_dir():
        real_round_trip(folder)
    else:
        print(f"{folder}: not found, real-label round trip skipped")
    command_timing()
