"""Compiled kernels (numba) for the post-processing's heaviest passes: the HV maps' edge energy, the bounding boxes
of labelled components, the Gaussian smoothing of the watershed's surfaces, the per-nucleus sums of the measurements;
each the same result as the library call (or numpy code) it stands in for.

`postprocess.edge_energy` normalises each HV channel, takes a Sobel derivative along the channel's axis and a
smoothing along the other (`scipy.ndimage.correlate1d`, mode "nearest") and keeps the larger drop. scipy's filter
copies every line into a float64 buffer and runs a scalar loop over it; on a 2176² region crop the energy took about
160 ms of the post-processing's 500. `edge_energy` here is the same computation fused into four passes over the
image that stay in the caches and that the compiler vectorises, with the same arithmetic as scipy's (float64 sums
in scipy's order: the centre tap times its weight, then the outermost pair of taps first, added or subtracted as the
kernel is symmetric or antisymmetric, the sum rounded to float32 as scipy's float32 output is), the normalisation
as numpy's float32 operations and numpy's rules for the maximum (NaN wins; of two equal values the second), so the
energy is the same bits (`tests/test_jit_kernels.py` checks it against the scipy path).

numba is optional: without it (`AVAILABLE` False) or where the compiled path does not apply (`edge_energy` returns
None: a NaN among the foreground's HV values, a kernel neither symmetric nor antisymmetric), the caller computes
the energy with scipy. Compiled code is cached on disk (numba's `cache=True`: `__pycache__` beside this file, or
numba's user cache where that cannot be written), so only the first use on a machine compiles (a few seconds);
later processes load it (about 0.1 s). Single-threaded, like the rest of a worker's post-processing.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

try:   # optional: the scipy path gives the same energy
    import numba
except ImportError:   # pragma: no cover - depends on the installation
    numba = None

AVAILABLE = numba is not None
_EPS = float(np.finfo(np.float64).eps)   # scipy's test of a kernel's symmetry


def kernel_symmetry(weights: np.ndarray) -> int:
    """1 for a symmetric odd kernel, -1 for an antisymmetric one, 0 otherwise (scipy's test, to DBL_EPSILON)."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.size % 2 == 0:
        return 0
    r = w.size // 2
    left, right = w[:r][::-1], w[r + 1:]
    if np.all(np.abs(right - left) <= _EPS):
        return 1
    if np.all(np.abs(right + left) <= _EPS):
        return -1
    return 0


def _jit(function):
    """numba's compiled `function`, cached on disk where numba finds a folder to write (otherwise compiled in each
    process that uses it: a read-only installation with no writable user cache)."""
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(function)
    except RuntimeError:   # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(function)


if AVAILABLE:

    @_jit
    def _masked_range(channel, mask):
        """(min, max, count, has_nan) of `channel` where `mask` (float32 values; min/max as float64)."""
        lo = np.inf
        hi = -np.inf
        count = 0
        has_nan = False
        h, w = channel.shape
        for y in range(h):
            for x in range(w):
                if mask[y, x]:
                    v = channel[y, x]
                    if v != v:
                        has_nan = True
                    else:
                        count += 1
                        if v < lo:
                            lo = v
                        if v > hi:
                            hi = v
        return float(lo), float(hi), count, has_nan

    @_jit
    def _normalised_row(src, lo, span, zero, out):
        """numpy's `clip((src - lo) / span, 0, 1)` in float32 (`lo`, `span` float32), or +0 where `zero`."""
        one = np.float32(1.0)
        nil = np.float32(0.0)
        if zero:
            out[:] = nil
            return
        for x in range(src.shape[0]):
            v = (src[x] - lo) / span
            v = nil if v < nil else v   # (so -0 stays -0 and NaN stays NaN, as numpy's clip leaves them)
            out[x] = one if v > one else v

    @_jit
    def _taps_along_row(line, weights, symmetry, r, acc):
        """acc[x] = scipy's sum for output x of a padded float64 `line` (its value x sits at line[x + r])."""
        n = acc.shape[0]
        wc = weights[r]
        for x in range(n):
            acc[x] = line[x + r] * wc
        for j in range(r, 0, -1):
            wj = weights[r - j]
            a = line[r - j:r - j + n]
            b = line[r + j:r + j + n]
            if symmetry > 0:
                for x in range(n):
                    acc[x] += (a[x] + b[x]) * wj
            else:
                for x in range(n):
                    acc[x] += (a[x] - b[x]) * wj

    @_jit
    def _source_index(k, n, reflect):
        """Where output tap k (possibly outside 0..n-1) reads: scipy's "reflect" (d c b a | a b c d | d c b a,
        repeated) or "nearest" mode."""
        if reflect:
            period = 2 * n
            k %= period
            return period - 1 - k if k >= n else k
        return min(max(k, 0), n - 1)

    @_jit
    def _taps_across(rows, y, h, weights, symmetry, reflect, r, acc):
        """acc[x] = scipy's sum for output (y, x) of a filter along axis 0 ("reflect" or "nearest" mode) of a
        float32 image of `h` rows whose row k is held in rows[k % len(rows)]: the image itself, or a ring holding
        its rows y - r .. y + r."""
        n = acc.shape[0]
        depth = rows.shape[0]
        wc = weights[r]
        row = rows[y % depth]
        for x in range(n):
            acc[x] = np.float64(row[x]) * wc
        for j in range(r, 0, -1):
            wj = weights[r - j]
            a = rows[_source_index(y - j, h, reflect) % depth]
            b = rows[_source_index(y + j, h, reflect) % depth]
            if symmetry > 0:
                for x in range(n):
                    acc[x] += (np.float64(a[x]) + np.float64(b[x])) * wj
            else:
                for x in range(n):
                    acc[x] += (np.float64(a[x]) - np.float64(b[x])) * wj

    @_jit
    def _pad_line(values, r, reflect, line):
        """line = values (as float64) with the r taps beyond either end that scipy's "reflect" or "nearest" mode
        reads there."""
        n = values.shape[0]
        for x in range(n):
            line[r + x] = values[x]
        for k in range(r):
            line[k] = values[_source_index(k - r, n, reflect)]
            line[r + n + k] = values[_source_index(n + k, n, reflect)]

    @_jit
    def _keep_larger_drop(energy_row, acc):
        """energy_row = numpy's maximum(energy_row, -float32(acc)) (NaN wins; of two equal values the second)."""
        for x in range(acc.shape[0]):
            a = energy_row[x]
            b = -np.float32(acc[x])
            keep = (a != a) | ((a > b) & (b == b))
            energy_row[x] = a if keep else b

    @_jit
    def _energy(h0, h1, params, deriv, sym_d, smooth, sym_s, energy):
        """The energy of `postprocess.edge_energy` into `energy` (zeros on entry): channel 0 derived along x and
        smoothed along y, channel 1 derived along y and smoothed along x; `params`: per channel (lo, span, zero).

        One pass down the rows: before output row y, row y + r of channel 0's derivative and of channel 1's
        normalised map are made (rings of 2r + 1 rows, which stay in the caches), then both filters across the
        rows and the last pass along the row give row y of both channels' drops."""
        h, w = h0.shape
        r = deriv.shape[0] // 2
        depth = 2 * r + 1
        line = np.empty(w + 2 * r, np.float64)
        acc = np.empty(w, np.float64)
        normal = np.empty(w, np.float32)
        ring0 = np.empty((depth, w), np.float32)   # channel 0 derived along its rows
        ring1 = np.empty((depth, w), np.float32)   # channel 1 normalised
        lo0, span0, zero0 = np.float32(params[0, 0]), np.float32(params[0, 1]), params[0, 2] != 0
        lo1, span1, zero1 = np.float32(params[1, 0]), np.float32(params[1, 1]), params[1, 2] != 0
        made = -1
        for y in range(h):
            while made < min(y + r, h - 1):
                made += 1
                _normalised_row(h0[made], lo0, span0, zero0, normal)
                _pad_line(normal, r, False, line)
                _taps_along_row(line, deriv, sym_d, r, acc)
                out = ring0[made % depth]
                for x in range(w):
                    out[x] = acc[x]
                _normalised_row(h1[made], lo1, span1, zero1, ring1[made % depth])
            # channel 0: the smoothing down the columns
            _taps_across(ring0, y, h, smooth, sym_s, False, r, acc)
            _keep_larger_drop(energy[y], acc)
            # channel 1: the derivative down the columns, then the smoothing along the row
            _taps_across(ring1, y, h, deriv, sym_d, False, r, acc)
            for x in range(w):
                normal[x] = acc[x]
            _pad_line(normal, r, False, line)
            _taps_along_row(line, smooth, sym_s, r, acc)
            _keep_larger_drop(energy[y], acc)


    @_jit
    def _boxes(labels, max_label, y0, y1, x0, x1):
        """The bounding box of every id 1..max_label of a 2-D label image (ids above max_label ignored), as four
        arrays; y0 stays at the image's height where an id has no pixel. Each run of one id along a row updates its
        box once."""
        h, w = labels.shape
        for y in range(h):
            row = labels[y]
            x = 0
            while x < w:
                k = row[x]
                start = x
                x += 1
                while x < w and row[x] == k:
                    x += 1
                if k <= 0 or k > max_label:
                    continue
                if y0[k] == h:
                    y0[k] = y
                y1[k] = y + 1
                if start < x0[k]:
                    x0[k] = start
                if x > x1[k]:
                    x1[k] = x


    @_jit
    def _correlate_axis0(src, weights, symmetry, reflect, out):
        """scipy's `correlate1d(src, weights, axis=0, mode)` (float32 in and out, float64 sums in its order)."""
        h, w = src.shape
        r = weights.shape[0] // 2
        acc = np.empty(w, np.float64)
        for y in range(h):
            _taps_across(src, y, h, weights, symmetry, reflect, r, acc)
            o = out[y]
            for x in range(w):
                o[x] = acc[x]

    @_jit
    def _correlate_axis1(src, weights, symmetry, reflect, out):
        """scipy's `correlate1d(src, weights, axis=1, mode)` (float32 in and out, float64 sums in its order)."""
        h, w = src.shape
        r = weights.shape[0] // 2
        line = np.empty(w + 2 * r, np.float64)
        acc = np.empty(w, np.float64)
        for y in range(h):
            _pad_line(src[y], r, reflect, line)
            _taps_along_row(line, weights, symmetry, r, acc)
            o = out[y]
            for x in range(w):
                o[x] = acc[x]


    @_jit
    def _instance_sums(k, r, c, cy, cx, pix, rgb, foreground, moments, channels, gray, confidence):
        """Per-instance sums over the pixels in their order (instance row k[i], coordinates r[i], c[i], flat
        position pix[i]): second central moments (float64), channel sums (int64), BT.601 grey (float32) and the
        foreground's sum (float64); the colour sums where `rgb` has rows, the foreground's where it has values."""
        with_rgb = rgb.shape[0] > 0
        with_fg = foreground.shape[0] > 0
        w_r, w_g, w_b = np.float32(0.299), np.float32(0.587), np.float32(0.114)
        for i in range(k.shape[0]):
            j = k[i]
            dy = np.float64(r[i]) - cy[j]
            dx = np.float64(c[i]) - cx[j]
            moments[0, j] += dy * dy
            moments[1, j] += dx * dx
            moments[2, j] += dy * dx
            if with_rgb:
                p = pix[i]
                red, green, blue = rgb[p, 0], rgb[p, 1], rgb[p, 2]
                channels[0, j] += red
                channels[1, j] += green
                channels[2, j] += blue
                gray[j] += (np.float32(red) * w_r + np.float32(green) * w_g) + np.float32(blue) * w_b
            if with_fg:
                confidence[j] += np.float64(foreground[pix[i]])


def instance_sums(k: np.ndarray, r: np.ndarray, c: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                  pix: np.ndarray, rgb: np.ndarray | None, foreground: np.ndarray | None) -> dict | None:
    """The per-instance sums of `export`'s measurements in one pass over the instances' pixels, the same values as
    its `bincount`s and `add.at`: for pixel i of instance row k[i] at (r[i], c[i]), flat position pix[i] in the
    (H*W, 3) uint8 `rgb` and the flat `foreground`: "mu20", "mu02", "mu11" (sums of dy², dx², dy·dx about the
    centroids `cy`, `cx`, float64, in the pixels' order as `bincount` adds them), "channels" (3, m) exact sums of
    R, G, B (float64), "gray" (float32 sums of 0.299 R + 0.587 G + 0.114 B, each product and sum in float32 as
    `export.luma`, added in the pixels' order as `add.at` does), "foreground" (float64 sums). None where numba is
    not installed or `rgb` is not uint8 (the caller's numpy path)."""
    if not AVAILABLE or (rgb is not None and (rgb.dtype != np.uint8 or rgb.ndim != 2 or rgb.shape[1] != 3)):
        return None
    m = int(cy.shape[0])
    moments = np.zeros((3, m), np.float64)
    channels = np.zeros((3, m), np.int64)
    gray = np.zeros(m, np.float32)
    confidence = np.zeros(m, np.float64)
    rgb_in = np.zeros((0, 3), np.uint8) if rgb is None else np.ascontiguousarray(rgb)
    fg_in = np.zeros(0, np.float32) if foreground is None else np.ascontiguousarray(foreground).ravel()
    _instance_sums(np.ascontiguousarray(k, np.int64), np.ascontiguousarray(r, np.int64),
                   np.ascontiguousarray(c, np.int64), np.ascontiguousarray(cy, np.float64),
                   np.ascontiguousarray(cx, np.float64), np.ascontiguousarray(pix, np.int64), rgb_in, fg_in,
                   moments, channels, gray, confidence)
    return {"mu20": moments[0], "mu02": moments[1], "mu11": moments[2], "channels": channels.astype(np.float64),
            "gray": gray, "foreground": confidence}


@lru_cache(maxsize=16)
def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """The weights of `scipy.ndimage.gaussian_filter1d(., sigma, truncate=truncate)`, exactly: its response to a
    unit impulse in float64 (each output is 1.0 times one weight plus zeros)."""
    from scipy import ndimage

    radius = int(truncate * float(sigma) + 0.5)
    impulse = np.zeros(4 * radius + 1, np.float64)
    impulse[2 * radius] = 1.0
    response = ndimage.gaussian_filter1d(impulse, sigma, truncate=truncate, mode="constant")
    return np.ascontiguousarray(response[radius:3 * radius + 1][::-1])


def gaussian_filter(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter(image, sigma, truncate=truncate)` (mode "reflect") of a 2-D float32 image, the
    same bits: the two passes of scipy's filter (down the columns, then along the rows, each rounded to float32)
    compiled, about a third of scipy's time on the watershed's mosaics. scipy's filter where numba is not installed
    or for other images."""
    image = np.asarray(image)
    weights = _gaussian_weights(float(sigma), float(truncate)) if float(sigma) > 0 else None
    if (not AVAILABLE or image.ndim != 2 or image.dtype != np.float32 or image.size == 0 or weights is None
            or weights.size < 3 or kernel_symmetry(weights) != 1):
        from scipy import ndimage

        return ndimage.gaussian_filter(image, sigma, truncate=truncate)
    image = np.ascontiguousarray(image)
    columns = np.empty_like(image)
    _correlate_axis0(image, weights, 1, True, columns)
    out = np.empty_like(image)
    _correlate_axis1(columns, weights, 1, True, out)
    return out


def find_objects(labels: np.ndarray, max_label: int) -> list:
    """`scipy.ndimage.find_objects(labels, max_label)` of a 2-D integer label image: for each id 1..max_label its
    bounding box as a (rows, columns) pair of slices, None for an id without pixels. Compiled: one pass with one
    update per run of an id along a row, about a fifth of scipy's time on a region crop (scipy's where numba is
    not installed)."""
    labels = np.asarray(labels)
    max_label = int(max_label)
    if not AVAILABLE or labels.ndim != 2 or labels.dtype.kind not in "iu" or max_label < 1:
        from scipy import ndimage

        return ndimage.find_objects(labels, max_label=max_label) if max_label > 0 else []
    h, w = labels.shape
    y0 = np.full(max_label + 1, h, np.int64)
    x0 = np.full(max_label + 1, w, np.int64)
    y1, x1 = np.zeros(max_label + 1, np.int64), np.zeros(max_label + 1, np.int64)
    _boxes(np.ascontiguousarray(labels), max_label, y0, y1, x0, x1)
    return [(slice(a, b), slice(c, d)) if a < h else None
            for a, b, c, d in zip(y0[1:].tolist(), y1[1:].tolist(), x0[1:].tolist(), x1[1:].tolist())]


def edge_energy(h0: np.ndarray, h1: np.ndarray, foreground: np.ndarray, deriv: np.ndarray,
                smooth: np.ndarray) -> np.ndarray | None:
    """`postprocess.edge_energy` of the HV channels `h0`, `h1` (2-D float32) with the Sobel kernels `deriv` and
    `smooth` (odd, of one size), the same bits; None where this path does not apply (numba not installed, a kernel
    neither symmetric nor antisymmetric, a NaN among the channels' values on the foreground)."""
    sym_d, sym_s = kernel_symmetry(deriv), kernel_symmetry(smooth)
    if not AVAILABLE or sym_d == 0 or sym_s == 0 or len(deriv) != len(smooth):
        return None
    h0 = np.ascontiguousarray(h0, np.float32)
    h1 = np.ascontiguousarray(h1, np.float32)
    mask = np.ascontiguousarray(foreground, bool)
    energy = np.zeros(mask.shape, np.float32)
    if energy.size == 0:
        return energy
    params = np.zeros((2, 3), np.float64)
    for k, channel in enumerate((h0, h1)):
        lo, hi, count, has_nan = _masked_range(channel, mask)
        if has_nan:
            return None
        # `postprocess._normalise`: 0 everywhere without foreground or without a range; otherwise numpy's float32
        # (channel - lo) / (hi - lo), the divisor rounded to float32 as numpy rounds a Python float operand
        if count == 0 or hi - lo < 1e-6:
            params[k] = (0.0, 1.0, 1.0)
        else:
            params[k] = (lo, float(np.float32(hi - lo)), 0.0)
    _energy(h0, h1, params, np.asarray(deriv, np.float64), sym_d, np.asarray(smooth, np.float64), sym_s, energy)
    return energy
