"""The compiled kernels (`jit_kernels`, numba) against the library calls they stand in for: the bounding boxes
against `ndi.find_objects`; the edge energy (`jit_kernels.edge_energy`) against scipy's path in `postprocess.edge_energy`:
the same bits on random maps (values that round differently under any other order of the sums), on maps of real
nuclei, for every Sobel size, on images smaller than the kernel, with empty / full / random foregrounds, constant
channels, NaN outside the foreground; the whole post-processing gives the same labels either way.

What the bit-for-bit checks catch: sums in float32 instead of float64, another normalisation (a multiplication by
the reciprocal), numpy's rules for the clip and the maximum on signed zeros and NaN, the "nearest" border. What they
cannot: the order of the float64 sums of one output (their float32 roundings agree except in the rarest ties)."""
from __future__ import annotations

import numpy as np
import pytest

import jit_kernels
import postprocess as pp
from dataset import hv_targets

needs_numba = pytest.mark.skipif(not jit_kernels.AVAILABLE, reason="numba is not installed: scipy's path only")


def _scipy_energy(monkeypatch, hv, foreground, ksize):
    with monkeypatch.context() as m:
        m.setattr(jit_kernels, "AVAILABLE", False)
        return pp.edge_energy(hv, foreground, ksize)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_kernel_symmetry():
    deriv, smooth = pp._sobel_kernels(7)
    assert jit_kernels.kernel_symmetry(smooth) == 1
    assert jit_kernels.kernel_symmetry(deriv) == -1
    assert jit_kernels.kernel_symmetry(np.array([1.0, 2.0, 4.0])) == 0
    assert jit_kernels.kernel_symmetry(np.array([1.0, 1.0])) == 0   # even: scipy's generic loop


@needs_numba
@pytest.mark.parametrize("ksize", [3, 5, 7, 11, 31])
def test_compiled_energy_is_scipys_bit_for_bit(monkeypatch, ksize):
    rng = np.random.default_rng(ksize)
    for shape in [(97, 131), (40, 300), (1, 1), (1, 9), (9, 1), (2, 3), (ksize // 2, ksize + 1)]:
        hv = rng.uniform(-1.3, 1.2, (2,) + shape).astype(np.float32)
        hv[:, rng.random(shape) < 0.05] = -0.0   # signed zeros and values outside the foreground's range
        for foreground in (rng.random(shape) < 0.4, np.ones(shape, bool), np.zeros(shape, bool)):
            got = pp.edge_energy(hv, foreground, ksize)
            ref = _scipy_energy(monkeypatch, hv, foreground, ksize)
            assert _same_bits(got, ref), (shape, ksize, foreground.mean())
    # a constant channel (no range: normalised to 0) next to a varying one
    hv = np.stack([np.full((50, 60), 0.25, np.float32), rng.standard_normal((50, 60)).astype(np.float32)])
    fg = rng.random((50, 60)) < 0.5
    assert _same_bits(pp.edge_energy(hv, fg, ksize), _scipy_energy(monkeypatch, hv, fg, ksize))
    assert _same_bits(pp.edge_energy(hv[::-1].copy(), fg, ksize), _scipy_energy(monkeypatch, hv[::-1].copy(), fg,
                                                                                  ksize))


def _touching_nuclei(seed: int = 0, side: int = 256) -> np.ndarray:
    """A label map of touching discs and ellipses (ids 1..n)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), np.int32)
    yy, xx = np.mgrid[:side, :side]
    for k in range(1, 70):
        cy, cx = rng.uniform(8, side - 8, 2)
        ry, rx = rng.uniform(4, 11, 2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
    return labels


@needs_numba
def test_compiled_energy_on_maps_of_real_shaped_nuclei(monkeypatch):
    """HV maps of touching nuclei (as the network learns them), with float noise, views that are not contiguous and
    float64 maps: the same bits as scipy's, and the same labels from the whole post-processing."""
    labels = _touching_nuclei()
    hv = hv_targets(labels).astype(np.float32)
    hv += np.random.default_rng(1).normal(0, 0.02, hv.shape).astype(np.float32)
    fg = labels > 0
    assert _same_bits(pp.edge_energy(hv, fg), _scipy_energy(monkeypatch, hv, fg, 7))
    wide = np.zeros((2, 256, 512), np.float32)
    wide[:, :, ::2] = hv
    view = wide[:, :, ::2]   # strided
    assert _same_bits(pp.edge_energy(view, fg), _scipy_energy(monkeypatch, view, fg, 7))
    assert _same_bits(pp.edge_energy(hv.astype(np.float64), fg), _scipy_energy(monkeypatch, hv.astype(np.float64),
                                                                               fg, 7))
    prob = np.where(fg, 0.9, 0.1).astype(np.float32)
    compiled = pp.postprocess(prob, hv)
    with monkeypatch.context() as m:
        m.setattr(jit_kernels, "AVAILABLE", False)
        reference = pp.postprocess(prob, hv)
    assert compiled.max() > 30 and np.array_equal(compiled, reference)


@needs_numba
def test_nan_in_the_maps(monkeypatch):
    """A NaN on the foreground: the compiled path steps aside (None) and scipy's path gives its all-NaN energy; NaN
    outside the foreground: the compiled path gives scipy's values, NaN where scipy's are."""
    rng = np.random.default_rng(3)
    hv = rng.uniform(-1, 1, (2, 40, 50)).astype(np.float32)
    fg = np.zeros((40, 50), bool)
    fg[10:30, 10:40] = True
    deriv, smooth = pp._sobel_kernels(7)
    inside = hv.copy()
    inside[1, 20, 20] = np.nan
    assert jit_kernels.edge_energy(inside[0], inside[1], fg, deriv, smooth) is None
    assert np.isnan(pp.edge_energy(inside, fg)).all()
    outside = hv.copy()
    outside[0, 2, 3] = np.nan
    got, ref = pp.edge_energy(outside, fg), _scipy_energy(monkeypatch, outside, fg, 7)
    assert np.isnan(got).any() and np.array_equal(np.isnan(got), np.isnan(ref))
    assert _same_bits(got[~np.isnan(got)], ref[~np.isnan(ref)])


def test_without_numba_the_scipy_path_runs(monkeypatch):
    """Where numba is not installed the energy comes from scipy (`edge_energy` here returns None)."""
    monkeypatch.setattr(jit_kernels, "AVAILABLE", False)
    deriv, smooth = pp._sobel_kernels(7)
    hv = np.random.default_rng(0).uniform(-1, 1, (2, 20, 20)).astype(np.float32)
    fg = np.ones((20, 20), bool)
    assert jit_kernels.edge_energy(hv[0], hv[1], fg, deriv, smooth) is None
    energy = pp.edge_energy(hv, fg)
    assert energy.shape == (20, 20) and energy.dtype == np.float32 and energy.max() > 0


@needs_numba
def test_compiles_without_a_cache_folder(tmp_path):
    """Where numba finds no folder to write its cache (a read-only installation without a writable user cache: numba
    raises "cannot cache function ...: no locator available" when the function is defined), the kernels are compiled
    without a cache and give the same energy. (numba's error is raised here for every cached definition, in a
    process of its own.)"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "no_cache.py"
    script.write_text(
        "import sys\nimport numba\nimport numpy as np\n"
        "real = numba.njit\n"
        "def strict(*args, **kwargs):\n"
        "    if kwargs.get('cache'):\n"
        "        raise RuntimeError('cannot cache function: no locator available')\n"
        "    return real(*args, **kwargs)\n"
        "numba.njit = strict\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "import jit_kernels, postprocess as pp\n"
        "hv = np.random.default_rng(0).uniform(-1, 1, (2, 30, 40)).astype(np.float32)\n"
        "fg = np.ones((30, 40), bool)\n"
        "got = jit_kernels.edge_energy(hv[0], hv[1], fg, *pp._sobel_kernels(7))\n"
        "jit_kernels.AVAILABLE = False\n"
        "ref = pp.edge_energy(hv, fg)\n"
        "print(got is not None and np.array_equal(got.view(np.uint32), ref.view(np.uint32)))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@needs_numba
def test_find_objects_is_scipys():
    """`jit_kernels.find_objects` gives `ndi.find_objects(labels, max_label)`: random blobs with gaps in the ids,
    ids above max_label, several integer types, views that are not contiguous, one row / one column / one pixel,
    an image without labels; a real labelling (components and holes of a nuclei mask)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    for shape in [(60, 80), (1, 50), (50, 1), (1, 1), (7, 3)]:
        blobs, n = ndi.label(rng.random(shape) < 0.45)
        labels = np.where(blobs % 4 == 3, 0, blobs)   # gaps
        for dtype in (np.int32, np.uint32, np.int64, np.uint16):
            lab = labels.astype(dtype)
            for max_label in {max(n, 1), max(n // 2, 1), n + 3}:
                assert jit_kernels.find_objects(lab, max_label) == ndi.find_objects(lab, max_label=max_label)
    wide = np.zeros((40, 100), np.int32)
    wide[:, ::2] = ndi.label(rng.random((40, 50)) < 0.5)[0]
    view = wide[:, ::2]
    assert jit_kernels.find_objects(view, int(view.max())) == ndi.find_objects(view)
    assert jit_kernels.find_objects(np.zeros((5, 5), np.int32), 2) == [None, None]
    mask = _touching_nuclei(3) > 0
    for lab, n in (pp._label4(mask), pp._label4(~mask)):
        assert n > 0 and jit_kernels.find_objects(lab, n) == ndi.find_objects(lab)


def test_find_objects_without_numba(monkeypatch):
    from scipy import ndimage as ndi

    monkeypatch.setattr(jit_kernels, "AVAILABLE", False)
    labels = ndi.label(np.random.default_rng(1).random((30, 30)) < 0.5)[0]
    assert jit_kernels.find_objects(labels, int(labels.max())) == ndi.find_objects(labels)
    assert jit_kernels.find_objects(labels, 0) == []


@needs_numba
def test_gaussian_filter_is_scipys_bit_for_bit():
    """`jit_kernels.gaussian_filter` gives `ndi.gaussian_filter`'s float32 image bit for bit ("reflect" mode): random
    images down to 1x1 and images narrower than the kernel's reach (reflected more than once), several sigmas, a
    mosaic-like surface of energies in [0, 1] with exact zeros; other inputs go to scipy's filter."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    for shape in [(9, 9), (1, 1), (3, 20), (20, 3), (2, 2), (120, 97), (1, 30)]:
        for sigma in (1.0, 0.5, 2.0, 0.3, 3.7):
            image = rng.random(shape, dtype=np.float32) * 2 - 0.5
            assert _same_bits(jit_kernels.gaussian_filter(image, sigma), ndi.gaussian_filter(image, sigma)), \
                (shape, sigma)
    surface = np.clip(rng.normal(0.3, 0.4, (90, 140)), 0, 1).astype(np.float32)
    assert _same_bits(jit_kernels.gaussian_filter(surface, 1.0), ndi.gaussian_filter(surface, 1.0))
    assert _same_bits(jit_kernels.gaussian_filter(surface[:, ::2], 1.0), ndi.gaussian_filter(surface[:, ::2], 1.0))
    as64 = surface.astype(np.float64)   # not float32: scipy's filter itself
    assert np.array_equal(jit_kernels.gaussian_filter(as64, 1.0), ndi.gaussian_filter(as64, 1.0))


@needs_numba
def test_measurements_from_the_compiled_sums_are_numpys(monkeypatch):
    """`export.measure_nuclei` with the compiled per-nucleus sums (`jit_kernels.instance_sums`) gives numpy's
    values exactly (every column, every nucleus: moments, channel means, grey, confidence), on touching nuclei
    with a random RGB image and foreground; a float image takes numpy's path in both."""
    import export

    labels = _touching_nuclei(4, 200)
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, labels.shape + (3,), dtype=np.uint8)
    fg = rng.random(labels.shape).astype(np.float32)
    for image in (rgb, None, rgb.astype(np.float32)):
        compiled = export.measure_nuclei(labels, image, 0.25, foreground=fg)
        with monkeypatch.context() as m:
            m.setattr(jit_kernels, "AVAILABLE", False)
            reference = export.measure_nuclei(labels, image, 0.25, foreground=fg)
        assert len(compiled) > 30 and compiled == reference
    parts = jit_kernels.instance_sums(np.array([0, 1, 0]), np.array([0, 0, 1]), np.array([0, 1, 0]),
                                      np.array([0.5, 0.0]), np.array([0.0, 1.0]), np.array([0, 1, 2]),
                                      np.array([[10, 20, 30], [1, 2, 3], [255, 0, 0]], np.uint8),
                                      np.array([0.5, 0.25, 1.0], np.float32))
    # by hand: instance 0 = pixels (0, 0) and (1, 0) about (0.5, 0); instance 1 = pixel (0, 1)
    assert parts["mu20"].tolist() == [0.5, 0.0] and parts["mu02"].tolist() == [0.0, 0.0]
    assert parts["channels"][:, 0].tolist() == [265, 20, 30] and parts["foreground"].tolist() == [1.5, 0.25]
    gray0 = np.float32(10) * np.float32(0.299) + np.float32(20) * np.float32(0.587) + np.float32(30) * np.float32(0.114)
    gray0 += np.float32(255) * np.float32(0.299) + np.float32(0) * np.float32(0.587) + np.float32(0) * np.float32(0.114)
    assert parts["gray"][0] == gray0
