"""Tests of slides.py (OpenSlide / tiffslide readers) and sample_data's synthetic pyramidal TIFF writers."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

import sample_data
import slides
from utils import UserError

BACKENDS = ["openslide", "tiffslide"]


def _ramp_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB image: R = linear ramp in x, G = ramp in y, B = constant (resampling reproduces it)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([20 + (200 * xx) // max(width - 1, 1), 30 + (180 * yy) // max(height - 1, 1),
                     np.full_like(xx, 140)], axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def noise_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["generic", "aperio"])
def slide_path(request, tmp_path_factory, noise_image):
    """The noise image as a 3-level pyramid: plain tiled TIFF with resolution tags, or Aperio-style SVS."""
    out = tmp_path_factory.mktemp("slides")
    h, w = noise_image.shape[:2]
    if request.param == "generic":
        return sample_data.write_pyramidal_tiff(out / "generic.tif", noise_image, 0.25, tile_size=64, levels=3)
    return sample_data.write_pyramidal_tiff(out / "aperio.svs", noise_image, None, tile_size=64, levels=3,
                                            description=sample_data.aperio_description(w, h, 0.25, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_readers_report_mpp_levels_and_exact_pixels(slide_path, noise_image, backend):
    assert slides.is_slide_file(slide_path)
    with slides.open_slide(slide_path, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.mpp == pytest.approx(0.25)
        assert slide.dimensions == (320, 256)
        assert slide.level_dimensions == ((320, 256), (160, 128), (80, 64))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        np.testing.assert_array_equal(slide.read_region(13, 7, 100, 60), noise_image[7:67, 13:113])
        with tifffile.TiffFile(slide_path) as tif:
            tiled = [p for p in tif.pages if p.is_tiled]
            level1 = tiled[1].asarray()
        np.testing.assert_array_equal(slide.read_region(20, 10, 50, 40, level=1), level1[5:45, 10:60])
        # outside the slide: white
        corner = slide.read_region(-4, -6, 10, 10)
        assert (corner[:6] == 255).all() and (corner[:, :4] == 255).all()
        np.testing.assert_array_equal(corner[6:, 4:], noise_image[0:4, 0:6])
        assert (slide.read_region(318, 250, 5, 5)[:, 2:] == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_scaled_exactness(slide_path, noise_image, backend):
    with slides.open_slide(slide_path, backend=backend) as slide:
        # scale 1 is read_region
        np.testing.assert_array_equal(slide.read_scaled((5, 9, 70, 33), 1.0), slide.read_region(5, 9, 70, 33))
        # scale 0.5 reads the level at downsample 2 as it is, 0.25 the level at 4
        assert slide.best_level(0.5) == 1 and slide.best_level(0.26) == 1 and slide.best_level(0.25) == 2
        np.testing.assert_array_equal(slide.read_scaled((10, 4, 60, 50), 0.5),
                                      slide.read_region(20, 8, 60, 50, level=1))
        np.testing.assert_array_equal(slide.read_scaled((3, 2, 40, 30), 0.25),
                                      slide.read_region(12, 8, 40, 30, level=2))
        # seamless: adjacent boxes equal one box covering both; boxes tile the whole resampled image
        for scale in (0.37, 0.8, 1.6):
            whole = slide.read_scaled((0, 0, 90, 70), scale)
            left, right = slide.read_scaled((0, 0, 41, 70), scale), slide.read_scaled((41, 0, 49, 70), scale)
            np.testing.assert_array_equal(np.concatenate([left, right], axis=1), whole)
            top, bottom = slide.read_scaled((0, 0, 90, 29), scale), slide.read_scaled((0, 29, 90, 41), scale)
            np.testing.assert_array_equal(np.concatenate([top, bottom], axis=0), whole)
            w, h = int(320 * scale), int(256 * scale)
            full = slide.read_scaled((0, 0, w, h), scale)
            rows = [np.concatenate([slide.read_scaled((x, y, min(32, w - x), min(32, h - y)), scale)
                                    for x in range(0, w, 32)], axis=1) for y in range(0, h, 32)]
            assert np.abs(np.concatenate(rows, axis=0).astype(int) - full).max() <= 1


def test_read_scaled_reproduces_a_linear_ramp(tmp_path):
    """Independent reference: a normalised symmetric kernel reproduces a linear image at every target
    pixel centre ((c + 0.5) / scale - 0.5 in level-0 pixels), away from the borders."""
    yy, xx = np.mgrid[0:256, 0:256]
    image = np.stack([xx // 2 + 40, yy // 2 + 50, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    path = sample_data.write_pyramidal_tiff(tmp_path / "ramp.tif", image, 0.5, tile_size=64, levels=1)
    with slides.open_slide(path, backend="tiffslide") as slide:
        for scale in (0.3, 0.7, 1.5):
            out = slide.read_scaled((0, 0, int(256 * scale), int(256 * scale)), scale).astype(float)
            c = np.arange(out.shape[1])
            centre = (c + 0.5) / scale - 0.5
            inner = (centre > 8) & (centre < 240)
            # the ramp x // 2 is linear to within 0.5 (its steps); kernel averages keep that bound + rounding
            expected = centre / 2 + 40 - 0.25
            assert np.abs(out[10, inner, 0] - expected[inner]).max() <= 1.0
            assert np.abs(out[inner, 10, 1] - (centre[inner] / 2 + 50 - 0.25)).max() <= 1.0
            assert (out[..., 2] == 90).all()


def _sparse_sums(source, rows, wy, cols, wx):
    """The former `slides._resample` before its rounding: two CSR products of scipy (float32 sums of the taps in
    their stored order)."""
    from scipy import sparse

    height, width = source.shape[:2]

    def matrix(index, weight, size):
        n, taps = index.shape
        return sparse.csr_matrix((weight.ravel(), index.ravel(), np.arange(0, n * taps + 1, taps)), shape=(n, size))

    columns = np.ascontiguousarray(source.transpose(1, 0, 2)).reshape(width, height * 3).astype(np.float32)
    horizontal = (matrix(cols, wx, width) @ columns).reshape(cols.shape[0], height, 3)
    rows_major = np.ascontiguousarray(horizontal.transpose(1, 0, 2)).reshape(height, cols.shape[0] * 3)
    return (matrix(rows, wy, height) @ rows_major).reshape(rows.shape[0], cols.shape[0], 3)


@pytest.mark.parametrize("band", [1, 7, 32])
def test_banded_resampling_equals_the_sparse_products(monkeypatch, band):
    """`_resample` in bands of rows gives the bits of the two sparse products it replaced (the same float32 products
    and sums in the same order: its sums before rounding are theirs, bit for bit), shrinking and enlarging, at the
    slide's edges (repeated edge taps) and inside, on noise and on black and white."""
    monkeypatch.setattr(slides, "_RESAMPLE_BAND", band)
    rng = np.random.default_rng(band)
    for trial, f in enumerate((0.2527 / 0.25, 0.2498 / 0.25, 0.5054, 0.37, 1 / 3, 0.1, 0.8, 1.7, 2.0, 4.0)):
        height, width = (int(v) for v in rng.integers(1, 160, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 2:
            image = np.where(rng.random((height, width, 1)) < 0.3, 0, 255).astype(np.uint8).repeat(3, axis=2)
        x0, y0 = (int(v) for v in rng.integers(-5, 20, 2))
        w, h = (int(v) for v in rng.integers(1, 140, 2))
        cols, wx = slides._kernel(x0, w, f, width)
        rows, wy = slides._kernel(y0, h, f, height)
        source = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        rows, cols = rows - rows.min(), cols - cols.min()
        sums = _sparse_sums(source, rows, wy, cols, wx)
        assert sums.dtype == np.float32
        for r0 in range(0, h, band):
            band_sums = slides._resampled_sums(source, rows[r0:r0 + band], wy[r0:r0 + band], cols, wx)
            np.testing.assert_array_equal(band_sums, sums[r0:r0 + band], err_msg=f"scale {f}, source {height} x {width}")
        got = slides._resample(source, rows, wy, cols, wx)
        assert got.dtype == np.uint8 and got.shape == (h, w, 3)
        np.testing.assert_array_equal(got, np.clip(np.rint(sums), 0, 255).astype(np.uint8))


def test_thumbnail_and_mpp_override(slide_path, noise_image):
    with slides.open_slide(slide_path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.require_mpp() == 0.5
        thumb, downsample = slide.thumbnail(64)
        assert thumb.shape == (51, 64, 3) and downsample == pytest.approx(5.0)
        np.testing.assert_array_equal(thumb, slide.read_scaled((0, 0, 64, 51), 0.2))
        big, ds = slide.thumbnail(1000)
        assert ds == 1.0
        np.testing.assert_array_equal(big, noise_image)


def test_a_thumbnail_read_by_threads_equals_the_one_read_strip_by_strip(slide_path, monkeypatch):
    """Small strips (many of them), read by 3 threads and by one: the same pixels, on either reader."""
    monkeypatch.setattr(slides, "_THUMBNAIL_CHUNK_PIXELS", 2000)
    for backend in BACKENDS:
        if backend == "openslide" and not slides.openslide_available():
            continue
        with slides.open_slide(slide_path, backend=backend) as slide:
            one, ds = slide.thumbnail(200, threads=1)
            three, ds3 = slide.thumbnail(200, threads=3)
            default, _ = slide.thumbnail(200)
            assert one.shape == (160, 200, 3) and ds == ds3
            np.testing.assert_array_equal(one, three)
            np.testing.assert_array_equal(one, default)
            np.testing.assert_array_equal(one, slide.read_scaled((0, 0, 200, 160), 1 / ds))


@pytest.mark.skipif(not slides.openslide_available(), reason="OpenSlide is not installed")
def test_openslide_opens_first_and_tiffslide_reads_the_levels_where_its_pixels_are_the_same(slide_path, noise_image):
    """SVS and generic TIFF: OpenSlide opens the file (and gives the metadata), its tiffslide twin reads every level
    of a whole-number downsample; every read equals OpenSlide's own."""
    with slides.open_slide(slide_path) as slide, slides.open_slide(slide_path, backend="openslide") as reference:
        assert slide.backend == "openslide" and slide.twin_levels == (0, 1, 2) and reference.twin_levels == ()
        assert slide.mpp == reference.mpp == pytest.approx(0.25) and slide.properties == reference.properties
        for box, scale in (((0, 0, 320, 256), 1.0), ((37, 11, 101, 77), 1.0), ((5, 3, 90, 70), 0.5),
                           ((0, 0, 80, 64), 0.25), ((3, 2, 40, 30), 0.3), ((-7, -5, 50, 40), 1.0)):
            np.testing.assert_array_equal(slide.read_scaled(box, scale), reference.read_scaled(box, scale))
        np.testing.assert_array_equal(slide.read_region(0, 0, 320, 256), noise_image)
        np.testing.assert_array_equal(slide.thumbnail(100)[0], reference.thumbnail(100)[0])
    with slides.open_slide(slide_path, backend="tiffslide") as alone:
        assert alone.twin_levels == ()


@pytest.mark.skipif(not slides.openslide_available(), reason="OpenSlide is not installed")
def test_levels_of_a_fractional_downsample_stay_with_openslide(tmp_path):
    """Odd level-0 sizes: the reduced levels' downsamples are not whole numbers (OpenSlide reads them at a
    sub-pixel offset), so only level 0 is read by the twin; every level reads as OpenSlide reads it."""
    image = np.random.default_rng(3).integers(0, 256, (257, 331, 3), dtype=np.uint8)
    path = sample_data.write_pyramidal_tiff(tmp_path / "odd.tif", image, 0.25, tile_size=64, levels=3)
    with slides.open_slide(path) as slide, slides.open_slide(path, backend="openslide") as reference:
        assert [ds == round(ds) for ds in slide.level_downsamples] == [True, False, False]
        assert slide.twin_levels == (0,)
        for level in range(3):
            w, h = slide.level_dimensions[level]
            np.testing.assert_array_equal(slide.read_region(0, 0, w, h, level),
                                          reference.read_region(0, 0, w, h, level))
        np.testing.assert_array_equal(slide.read_scaled((1, 2, 70, 50), 0.45), reference.read_scaled((1, 2, 70, 50), 0.45))


@pytest.mark.skipif(not slides.openslide_available(), reason="OpenSlide is not installed")
def test_openslide_keeps_the_levels_where_its_twin_differs(slide_path, monkeypatch):
    """One differing pixel in a level's check: that level stays with OpenSlide; another OpenSlide driver, a file
    tiffslide cannot open, a different pyramid: all levels do."""
    original = slides.SlideReader._read_level

    def one_pixel_off(self, level, lx, ly, width, height, twin=None):
        out = original(self, level, lx, ly, width, height, twin)
        if twin and level == 1:
            out[height // 2, width // 2, 0] ^= 1
        return out

    with monkeypatch.context() as m:
        m.setattr(slides.SlideReader, "_read_level", one_pixel_off)
        with slides.open_slide(slide_path) as slide:
            assert slide.twin_levels == (0, 2)
    with monkeypatch.context() as m:
        m.setattr(slides, "TWIN_VENDORS", ("hamamatsu",))
        with slides.open_slide(slide_path) as slide:
            assert slide.backend == "openslide" and slide.twin_levels == ()

    def cannot_open(path):
        raise ValueError("unsupported")

    real_open = slides._open_tiffslide

    def other_pyramid(path):
        handle = real_open(path)
        handle.__dict__["level_downsamples"] = (1.0, 2.0, 4.5)   # tiffslide's cached property, changed
        return handle

    for opener in (cannot_open, other_pyramid):
        with monkeypatch.context() as m:
            m.setattr(slides, "_open_tiffslide", opener)
            with slides.open_slide(slide_path) as slide:
                assert slide.backend == "openslide" and slide.twin_levels == ()
    with slides.open_slide(slide_path) as slide:
        assert slide.twin_levels == (0, 1, 2)


def test_is_slide_file(tmp_path):
    from PIL import Image

    image = _ramp_image(64, 64)
    Image.fromarray(image).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "strip.tif", image, photometric="rgb")
    tifffile.imwrite(tmp_path / "tiled_labels.tif", np.zeros((64, 64), np.uint32), tile=(32, 32))
    sample_data.write_pyramidal_tiff(tmp_path / "tiled.tiff", image, 0.25, tile_size=32, levels=1)
    (tmp_path / "text.tif").write_text("not a tiff")
    assert not slides.is_slide_file(tmp_path / "a.png")
    assert not slides.is_slide_file(tmp_path / "strip.tif")
    assert not slides.is_slide_file(tmp_path / "tiled_labels.tif")
    assert not slides.is_slide_file(tmp_path / "text.tif")
    assert slides.is_slide_file(tmp_path / "tiled.tiff")
    assert slides.is_slide_file(tmp_path / "missing.svs")  # vendor suffix: routed to the slide path


@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_bad_slides_are_one_line_user_errors(tmp_path, backend):
    (tmp_path / "notes.svs").write_text("this is not a slide\n")
    with pytest.raises(UserError, match=r"notes\.svs: not a slide or image that OpenSlide or tiffslide can open"):
        slides.open_slide(tmp_path / "notes.svs", backend=backend)
    image = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    good = sample_data.write_pyramidal_tiff(tmp_path / "good.tif", image, 0.25, tile_size=64, levels=3)
    data = good.read_bytes()
    for fraction in (0.3, 0.9):
        cut = tmp_path / f"cut{int(fraction * 10)}.tif"
        cut.write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(UserError, match=rf"cut{int(fraction * 10)}\.tif: "):
            slides.open_slide(cut, backend=backend)
    # an OME-TIFF cut anywhere after its first tiles: the OME-XML (written last) or the SubIFDs are missing
    import label_pyramid

    ome = label_pyramid.write_tiled_pyramid(tmp_path / "rgb.ome.tif", (512, 512),
                                            lambda y, x, h, w: image[y:y + h, x:x + w], dtype=np.uint8,
                                            samples=3, reduce="mean", tile_size=64, levels=3, ome=True,
                                            level_kwargs=lambda level, ds: {"metadata": {"axes": "YXS"}}
                                            if level == 0 else {})
    data = ome.read_bytes()
    for fraction in (0.5, 0.99):
        cut = tmp_path / f"cut{int(fraction * 100)}.ome.tif"
        cut.write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(UserError, match=r"truncated or damaged TIFF"):
            slides.open_slide(cut, backend=backend)
    with pytest.raises(UserError, match="file not found"):
        slides.open_slide(tmp_path / "missing.svs", backend=backend)
    no_mpp = sample_data.write_pyramidal_tiff(tmp_path / "nompp.tif", image, None, tile_size=64, levels=2)
    with slides.open_slide(no_mpp, backend=backend) as slide:
        assert slide.mpp is None
        with pytest.raises(UserError, match=r"nompp\.tif: no pixel size \(mpp\) in the file's metadata; pass --mpp"):
            slide.require_mpp()
    with pytest.raises(UserError, match="--mpp"):
        slides.open_slide(no_mpp, mpp=-1)


def test_tiffslide_alone_without_openslide(monkeypatch, slide_path, noise_image):
    """A machine without openslide-bin: OpenSlide's import fails, tiffslide still opens TIFF slides."""
    import builtins

    real_import = builtins.__import__

    def no_openslide(name, *args, **kwargs):
        if name == "openslide" or name.startswith("openslide."):
            raise OSError("libopenslide.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openslide)
    assert not slides.openslide_available()
    with slides.open_slide(slide_path) as slide:
        assert slide.backend == "tiffslide" and slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(0, 0, 32, 32), noise_image[:32, :32])


def test_real_sample_slide_both_readers(real_sample_dir, tmp_path):
    """Four real NuInsSeg tiles as a 2x2 mosaic slide: both readers return the exact pixels and mpp."""
    image, labels = sample_data.real_sample_mosaic(real_sample_dir, n=2)
    assert image.shape == (1024, 1024, 3) and labels.shape == (1024, 1024)
    ids = np.unique(labels[labels > 0])
    assert ids[0] == 1 and ids[-1] == len(ids)  # unique ids across tiles, no gaps
    path = sample_data.write_pyramidal_tiff(tmp_path / "mosaic.tif", image, 0.25, tile_size=256)
    for backend in BACKENDS:
        with slides.open_slide(path, backend=backend) as slide:
            assert slide.mpp == pytest.approx(0.25) and slide.level_dimensions[1] == (512, 512)
            np.testing.assert_array_equal(slide.read_region(384, 500, 300, 200), image[500:700, 384:684])
            half = slide.read_scaled((0, 0, 512, 512), 0.5)
            reference = image.reshape(512, 2, 512, 2, 3).astype(np.uint32).sum(axis=(1, 3))
            np.testing.assert_array_equal(half, ((reference + 2) // 4).astype(np.uint8))


def test_ome_tiff_goes_to_tiffslide_with_its_pyramid_and_physical_size(tmp_path, noise_image):
    import label_pyramid

    def level_kwargs(level, downsample):
        if level:
            return {}
        return {"metadata": {"axes": "YXS", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm",
                             "PhysicalSizeY": 500, "PhysicalSizeYUnit": "nm",
                             "UUID": "urn:uuid:00000000-0000-0000-0000-000000000000"}}

    path = label_pyramid.write_tiled_pyramid(
        tmp_path / "rgb.ome.tif", noise_image.shape[:2], lambda y, x, h, w: noise_image[y:y + h, x:x + w],
        dtype=np.uint8, samples=3, reduce="mean", tile_size=64, levels=3, subifds=True, ome=True,
        level_kwargs=level_kwargs)
    assert slides.is_slide_file(path)
    with slides.open_slide(path) as slide:
        assert slide.backend == "tiffslide" and len(slide.level_dimensions) == 3
        assert slide.mpp == pytest.approx(0.5)  # 500 nm from the OME-XML
        np.testing.assert_array_equal(slide.read_region(3, 4, 50, 40), noise_image[4:44, 3:53])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_from_several_threads_agree(slide_path, backend):
    """The slide pipeline reads ahead in threads sharing one reader."""
    from concurrent.futures import ThreadPoolExecutor

    boxes = [(x, y, 40, 30) for x in range(0, 200, 37) for y in range(0, 150, 29)]
    with slides.open_slide(slide_path, backend=backend) as slide:
        expected = [slide.read_scaled(box, 0.7) for box in boxes]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda box: slide.read_scaled(box, 0.7), boxes))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_tiff_is_one_line_not_tifffile_log_noise(tmp_path, caplog):
    """Telling whether a damaged TIFF is a slide must not let tifffile log its own ERROR lines onto the
    terminal: the file is reported once, by the truncation check's UserError."""
    import logging

    image = np.full((600, 700, 3), 200, np.uint8)
    full = tmp_path / "full.tif"
    sample_data.write_pyramidal_tiff(full, image, 0.25, tile_size=256)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:300])   # inside the first page's tags: tifffile logs, does not raise
    with caplog.at_level(logging.DEBUG):
        slides.is_slide_file(cut)
        with pytest.raises(UserError, match=r"cut\.tif: truncated or damaged TIFF"):
            slides.open_slide(cut)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.text


def _former_read_level(reader, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
    """The former `SlideReader._read_level` (issue 17 step 3 replaced it): the backend's region as a plain
    array (`np.asarray` of OpenSlide's PIL image), `image_io.to_rgb`, pasted into a white canvas."""
    import image_io

    out = np.full((height, width, 3), 255, dtype=np.uint8)
    level_w, level_h = reader.level_dimensions[level]
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
    if x1 <= x0 or y1 <= y0:
        return out
    location = (reader._location(level, x0), reader._location(level, y0))
    size = (x1 - x0, y1 - y0)
    if reader.backend == "openslide":
        region = np.asarray(reader._slide.read_region(location, level, size))
    else:
        region = reader._slide.read_region(location, level, size, as_array=True, padding=False)
    out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = image_io.to_rgb(region)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_straight_into_the_result_equal_the_former_read_with_transparency(tmp_path, backend, noise_image,
                                                                                 slide_path):
    """The read path that writes the backend's pixels straight into the result (opaque OpenSlide regions by
    their RGB bytes, alpha composited only where it is below 255) gives the former read's pixels: on an RGBA
    slide with fully transparent rows, partly transparent pixels and opaque tiles, for boxes inside, across the
    edges and outside, and on the opaque pyramid (every level)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 400, 4), dtype=np.uint8)
    image[..., 3] = np.where(rng.random((300, 400)) < 0.7, 255, image[..., 3])
    image[:40, :, 3] = 0                       # transparent rows
    image[128:256, 256:384, 3] = 255           # one opaque tile
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", extrasamples=[2], compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    boxes = [(0, 0, 400, 300), (-10, 5, 420, 300), (256, 128, 128, 128), (300, 200, 200, 150), (10, 10, 50, 20),
             (500, 0, 10, 10), (-30, -20, 20, 10)]
    with slides.open_slide(path, backend=backend) as slide:
        raw = np.asarray(slide._slide.read_region((0, 0), 0, (400, 300))) if backend == "openslide" else \
            slide._slide.read_region((0, 0), 0, (400, 300), as_array=True, padding=False)
        assert raw.shape[2] == 4 and 0 < int((raw[..., 3] < 255).sum()) < raw[..., 3].size  # transparency kept
        for box in boxes:
            new = slide.read_region(*box)
            assert new.dtype == np.uint8 and new.shape == (box[3], box[2], 3)
            np.testing.assert_array_equal(new, _former_read_level(slide, 0, *box))
        assert (slide.read_region(0, 0, 400, 40) == 255).all()            # fully transparent: white
    with slides.open_slide(slide_path, backend=backend) as slide:     # opaque pyramid: every level
        for level in range(len(slide.level_dimensions)):
            w, h = slide.level_dimensions[level]
            for lx, ly, bw, bh in ((0, 0, w, h), (-5, 3, w // 2, h + 4), (w // 3, h // 4, 17, 9)):
                np.testing.assert_array_equal(slide._read_level(level, lx, ly, bw, bh),
                                              _former_read_level(slide, level, lx, ly, bw, bh))


def test_tifffile_log_blocks_overlapping_in_threads_restore_propagation_and_keep_records_apart():
    """Read threads open slides at once: when two `_tifffile_log_to` blocks overlap (A enters, B enters, A
    leaves, B leaves), tifffile's propagation must come back as it was (saving it per block left it off for
    good, which also let pytest's log capture see tifffile's records in later tests), and a handler must not
    collect the records logged by the other thread."""
    import logging
    import threading

    tif_log = logging.getLogger("tifffile")
    before = tif_log.propagate
    seen: dict[str, list[str]] = {"a": [], "b": []}

    class Keep(logging.Handler):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def emit(self, record):
            seen[self.key].append(record.getMessage())

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with slides._tifffile_log_to(Keep("a")):
            a_in.set()
            b_in.wait(5)
            tif_log.error("from a")
        a_out.set()

    def b():
        a_in.wait(5)
        with slides._tifffile_log_to(Keep("b")):
            b_in.set()
            a_out.wait(5)
            assert tif_log.propagate is False   # still inside b's block
            tif_log.error("from b")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert tif_log.propagate == before
    assert seen == {"a": ["from a"], "b": ["from b"]}
    assert not [h for h in tif_log.handlers if isinstance(h, Keep)]


@pytest.mark.skipif(not slides.openslide_available(), reason="OpenSlide is not installed")
@pytest.mark.parametrize("photometric, subsampling", [("ycbcr", (2, 2)), ("ycbcr", (2, 1)), ("rgb", None)])
def test_the_twin_reads_jpeg_tiles_as_openslide_decodes_them(tmp_path, photometric, subsampling):
    """JPEG tiles as scanners write them (YCbCr with subsampled chroma, or RGB): the reader with its twin reads
    OpenSlide's pixels, and the twin does read level 0."""
    rng = np.random.default_rng(5)
    image = np.clip(_ramp_image(384, 448).astype(np.int16) + rng.integers(-40, 40, (384, 448, 3)), 0, 255)
    image = image.astype(np.uint8)
    path = tmp_path / f"{photometric}.tif"
    extra = {"subsampling": subsampling} if subsampling else {}
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            tw.write(np.ascontiguousarray(image[::2 ** k, ::2 ** k]), tile=(64, 64), compression="jpeg",
                     compressionargs={"level": 85}, photometric=photometric, subfiletype=1 if k else 0,
                     resolution=(1e4 / (0.25 * 2 ** k),) * 2, resolutionunit="CENTIMETER", **extra)
    with slides.open_slide(path) as slide, slides.open_slide(path, backend="openslide") as reference:
        assert 0 in slide.twin_levels
        for box, scale in (((0, 0, 448, 384), 1.0), ((13, 29, 200, 150), 1.0), ((3, 5, 100, 80), 0.5)):
            np.testing.assert_array_equal(slide.read_scaled(box, scale), reference.read_scaled(box, scale))


@pytest.mark.skipif(not slides.openslide_available(), reason="OpenSlide is not installed")
def test_a_level_with_a_missing_tile_stays_with_openslide(tmp_path, monkeypatch):
    """A sparse file (a tile without bytes, away from the level's centre, where the pixel check cannot see it):
    OpenSlide reads it white, tiffslide black, so that level is read by OpenSlide; the other level is the twin's."""
    image = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    path = sample_data.write_pyramidal_tiff(tmp_path / "sparse.tif", image, 0.25, tile_size=128, levels=2)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        offset, size = tag.valueoffset, {"SHORT": 2, "LONG": 4, "LONG8": 8}[tag.dtype_name]
    with open(path, "r+b") as f:   # the first tile of level 0 has no bytes
        f.seek(offset)
        f.write(b"\0" * size)
    with slides.open_slide(path) as slide:
        assert slide.twin_levels == (1,)
        assert (slide.read_region(0, 0, 128, 128) == 255).all()   # as OpenSlide reads it
        np.testing.assert_array_equal(slide.read_region(128, 0, 64, 64), image[:64, 128:192])
    monkeypatch.setattr(slides, "_all_tiles_stored", lambda handle, level: True)
    with slides.open_slide(path) as slide:   # what the pixel check alone would let through
        assert slide.twin_levels == (0, 1) and (slide.read_region(0, 0, 128, 128) == 0).all()
