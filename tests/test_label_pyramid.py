"""Tests of label_pyramid.py: streaming pyramidal OME-TIFF of uint32 labels (and the RGB pyramid core)."""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

import label_pyramid


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Random uint32 ids (full range, so nothing may be averaged or truncated) on an odd-sized image."""
    return np.random.default_rng(0).integers(0, 2**32, (300, 370), dtype=np.uint64).astype(np.uint32)


def _write(path, labels, **kwargs):
    calls = []

    def read_tile(y, x, h, w):
        calls.append((y, x, h, w))
        return labels[y:y + h, x:x + w]

    label_pyramid.write_label_pyramid(path, labels.shape, read_tile, **kwargs)
    return calls


def test_round_trip_every_level_equals_the_subsampled_reference(tmp_path, labels):
    path = tmp_path / "labels.ome.tif"
    calls = _write(path, labels, mpp=0.5, tile_size=64, min_size=50)
    # read_tile: each level-0 tile once, in row-major order
    assert calls == [(y, x, min(64, 300 - y), min(64, 370 - x)) for y in range(0, 300, 64) for x in range(0, 370, 64)]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(300, 370), (150, 185), (75, 93), (38, 47)]
        for k, level in enumerate(levels):
            data = level.asarray()
            assert data.dtype == np.uint32
            np.testing.assert_array_equal(data, labels[::2 ** k, ::2 ** k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.tif"]  # temporaries removed


def test_layout_and_ome_metadata(tmp_path, labels):
    """napari/QuPath layout: one OME image, tiled zlib pages, sub-resolutions as SubIFDs of page 0,
    PhysicalSizeX/Y in micrometres and resolution tags on every level."""
    path = tmp_path / "labels.ome.tif"
    _write(path, labels, mpp=0.25, tile_size=64, min_size=100)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1  # the levels are not separate images
        page = tif.pages.first
        assert page.is_tiled and page.tilewidth == 64 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 2
        for k, level in enumerate(tif.series[0].levels):
            assert level.keyframe.is_tiled
            assert level.keyframe.get_resolution("CENTIMETER")[0] == pytest.approx(1e4 / (0.25 * 2 ** k))
        root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = root.find("ome:Image/ome:Pixels", ns)
    assert pixels.get("Type") == "uint32" and pixels.get("SizeX") == "370" and pixels.get("SizeY") == "300"
    assert float(pixels.get("PhysicalSizeX")) == 0.25 and float(pixels.get("PhysicalSizeY")) == 0.25
    assert pixels.get("PhysicalSizeXUnit") == "µm"


def test_byte_determinism(tmp_path, labels, monkeypatch):
    """The same bytes every run, whatever the number of threads compressing the tiles (1 and 4)."""
    import utils

    digests = set()
    for run, cores in enumerate((1, 4)):
        monkeypatch.setattr(utils, "usable_cores", lambda cores=cores: cores)
        out = tmp_path / f"run{run}"
        out.mkdir()
        _write(out / "labels.ome.tif", labels, mpp=0.25, tile_size=64, min_size=64)
        digests.add(hashlib.sha256((out / "labels.ome.tif").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_failure_leaves_the_existing_file_untouched(tmp_path, labels):
    path = tmp_path / "labels.ome.tif"
    path.write_bytes(b"previous result")

    def failing(y, x, h, w):
        if y >= 128:
            raise RuntimeError("network failed")
        return labels[y:y + h, x:x + w]

    with pytest.raises(RuntimeError, match="network failed"):
        label_pyramid.write_label_pyramid(path, labels.shape, failing, tile_size=64, min_size=64)
    assert path.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.tif"]
    with pytest.raises(ValueError, match="returned shape"):
        label_pyramid.write_label_pyramid(path, (100, 100), lambda y, x, h, w: np.zeros((3, 3), np.uint32),
                                          tile_size=64)
    assert path.read_bytes() == b"previous result"


def test_single_level_and_rgb_mean_reduction(tmp_path):
    small = np.arange(50 * 60, dtype=np.uint32).reshape(50, 60)
    path = tmp_path / "small.ome.tif"
    label_pyramid.write_label_pyramid(path, small.shape, lambda y, x, h, w: small[y:y + h, x:x + w])
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 1 and not tif.pages.first.subifds
        np.testing.assert_array_equal(tif.asarray(), small)
    # RGB: 2x2 means with the odd edge replicated, rounding half up (hand-computed)
    block = np.array([[[0, 10, 255], [1, 10, 255], [7, 0, 0]],
                      [[2, 10, 255], [2, 11, 255], [8, 0, 0]],
                      [[3, 3, 3], [5, 5, 5], [9, 9, 9]]], dtype=np.uint8)
    expected = np.array([[[1, 10, 255], [8, 0, 0]], [[4, 4, 4], [9, 9, 9]]], dtype=np.uint8)
    np.testing.assert_array_equal(label_pyramid.reduce2(block, "mean"), expected)
    np.testing.assert_array_equal(label_pyramid.reduce2(block, "nearest"), block[::2, ::2])
    assert label_pyramid.level_shapes((5000, 3001), min_size=2048) == [(5000, 3001), (2500, 1501), (1250, 751)]
    assert label_pyramid.level_shapes((100, 100), levels=3) == [(100, 100), (50, 50), (25, 25)]


@pytest.mark.parametrize("shape,tile", [((300, 370), 64), ((257, 129), 32), ((40, 700), 32), ((700, 33), 32)])
def test_reduced_levels_made_while_level_0_streams_equal_whole_image_reductions(tmp_path, shape, tile):
    """The reduced levels, built tile by tile as level 0 streams (`_Reducer`), equal the whole image reduced level
    by level: RGB 2x2 means (tifffile encodes, OpenSlide's page layout) and labels subsampled (mostly empty, so
    empty and partly filled tiles and odd edges meet), with odd and even tile rows and columns at every level."""
    rng = np.random.default_rng(tile + shape[0])
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    label_pyramid.write_tiled_pyramid(path, shape, lambda y, x, h, w: rgb[y:y + h, x:x + w], dtype=np.uint8,
                                      samples=3, reduce="mean", tile_size=tile, levels=6, subifds=False)
    expected = rgb
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 6
        for k, page in enumerate(tif.pages):
            if k:
                expected = label_pyramid.reduce2(expected, "mean")
            np.testing.assert_array_equal(page.asarray(), expected)
    labels = np.where(rng.random(shape) < 0.02, rng.integers(1, 2**32, shape, dtype=np.uint64), 0).astype(np.uint32)
    labels[:, : shape[1] // 3] = 0
    labels[: shape[0] // 2] = 0
    path = tmp_path / "labels.ome.tif"
    label_pyramid.write_tiled_pyramid(path, shape, lambda y, x, h, w: labels[y:y + h, x:x + w], dtype=np.uint32,
                                      tile_size=tile, levels=6, ome=True)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == 6
        for k, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), labels[::2 ** k, ::2 ** k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.tif", "rgb.tif"]  # temporaries removed


def test_memory_stays_bounded_with_several_compressing_threads(tmp_path, monkeypatch):
    """With one compressing thread per core, tifffile takes tiles from the generator ahead of its threads; the
    writer bounds that to two tiles per thread: writing 1,024 fresh tiles (16 MiB in all) with 4 threads holds
    about 1 MiB at a time (3-4 MiB without the bound, growing with the image up to tifffile's 512 MiB)."""
    import tracemalloc

    import utils

    monkeypatch.setattr(utils, "usable_cores", lambda: 4)
    tile, n = 64, 32
    shape = (tile * n, tile * n)

    def read_tile(y, x, h, w):   # a new array per tile, as the slide pipeline's label tiles are
        return np.full((h, w), (y // tile) * n + x // tile + 1, np.uint32)

    tracemalloc.start()
    try:
        label_pyramid.write_label_pyramid(tmp_path / "big.ome.tif", shape, read_tile, mpp=0.25, tile_size=tile,
                                          min_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak   # about 1 MiB here; 3-4 MiB without the bound
    with tifffile.TiffFile(tmp_path / "big.ome.tif") as tif:
        level0 = tif.series[0].levels[0].asarray()
    assert level0[0, 0] == 1 and level0[-1, -1] == n * n


def _real_label_image(real_sample_dir) -> np.ndarray:
    """Real NuInsSeg label maps placed on a larger, mostly empty image (empty tiles, partial edge tiles)."""
    files = sorted(real_sample_dir.glob("*/label masks modify/*.tif"))[:3]
    image = np.zeros((1900, 1450), np.uint32)
    for k, f in enumerate(files):
        crop = tifffile.imread(f).astype(np.uint32)
        y, x = 37 + 600 * k, 101 + 300 * k
        region = image[y:y + crop.shape[0], x:x + crop.shape[1]]
        region[...] = np.where(crop[:region.shape[0], :region.shape[1]] > 0, crop[:region.shape[0], :region.shape[1]]
                               + 1000 * k, 0)
    return image


def _tile_streams(path):
    """Every page of a pyramid (SubIFDs included): (its tags but the tiles' offsets and byte counts, the inflated
    bytes of each tile)."""
    import zlib

    pages = []
    with tifffile.TiffFile(path) as tif:
        for level in tif.series[0].levels:
            for page in level.pages:
                tags = {t.code: t.value for t in page.tags.values() if t.code not in (324, 325, 330)}
                fh = tif.filehandle
                tiles = []
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    fh.seek(offset)
                    tiles.append(zlib.decompress(fh.read(count)))
                pages.append((tags, tiles))
    return pages


@pytest.mark.parametrize("workers,zlib_ng", [(1, False), (3, False), (1, True), (3, True)])
def test_own_tile_encoding_writes_the_bytes_tifffiles_encoding_writes(tmp_path, real_sample_dir, monkeypatch,
                                                                      workers, zlib_ng):
    """The label pyramid's tiles encoded by `_encoded_tiles` (edge tiles padded, the encoded empty tile reused,
    `workers` threads): without zlib-ng, by tifffile's deflate encoder, the very file tifffile's own encoding gives
    (the former path); with zlib-ng, a file whose every page has the same tags and every tile inflates to the same
    bytes (only the deflate streams differ). Real NuInsSeg labels on a mostly empty image with partial edge tiles,
    four levels (three made as level 0 streams), with and without a pixel size, one and several threads."""
    if zlib_ng and label_pyramid.utils.zlib_ng_encoder() is None:
        pytest.skip("imagecodecs without zlib-ng here")
    image = _real_label_image(real_sample_dir)
    monkeypatch.setattr(label_pyramid.utils, "usable_cores", lambda: workers)
    if not zlib_ng:
        monkeypatch.setattr(label_pyramid.utils, "zlib_ng_encoder", lambda: None)
    encoded = []
    real = label_pyramid._zlib_encoder

    def counting(level):
        encode = real(level)

        def count(tile):
            encoded.append(tile.shape)
            return encode(tile)
        return count

    for mpp in (None, 0.25):
        (tmp_path / f"own_{mpp}").mkdir()
        (tmp_path / f"former_{mpp}").mkdir()
        # the same file name: the OME metadata holds it
        own, former = tmp_path / f"own_{mpp}" / "labels.ome.tif", tmp_path / f"former_{mpp}" / "labels.ome.tif"
        with monkeypatch.context() as m:
            m.setattr(label_pyramid, "_zlib_encoder", counting)
            _write(own, image, mpp=mpp, tile_size=256, min_size=400)
        with monkeypatch.context() as m:
            m.setattr(label_pyramid, "_own_encoding", lambda *args: False)   # tifffile encodes every level
            _write(former, image, mpp=mpp, tile_size=256, min_size=400)
        if zlib_ng:
            assert own.read_bytes() != former.read_bytes() and _tile_streams(own) == _tile_streams(former)
        else:
            assert own.read_bytes() == former.read_bytes()
        with tifffile.TiffFile(own) as tif:
            assert len(tif.series[0].levels) == 4
            assert np.array_equal(tif.series[0].levels[0].asarray(), image)
    assert set(encoded) == {(256, 256)}   # every tile padded to the tile size
    tiles = [(y, x) for y in range(0, 1900, 256) for x in range(0, 1450, 256)]
    empty = sum(not image[y:y + 256, x:x + 256].any() for y, x in tiles)
    assert empty > 10
    # per file, level 0's non-empty tiles and the empty one once, then levels 1-3 (each at most as many): the empty
    # tiles' bytes are reused, never encoded again
    assert len(tiles) - empty + 1 < len(encoded) / 2 < 4 * (len(tiles) - empty + 1)
