"""Writing a big image tile by tile as a tiled, compressed, pyramidal TIFF, in bounded memory.

`write_label_pyramid` writes a uint32 instance-label image (whole-slide predictions) as an OME-TIFF whose
sub-resolutions are SubIFDs (the layout QuPath, napari/tifffile and Bio-Formats read as one pyramidal image).
`write_tiled_pyramid` is the general streaming writer underneath, also used for synthetic RGB slides
(`sample_data.write_pyramidal_tiff_from_tiles`, levels as consecutive IFDs: the layout OpenSlide reads).

Memory: level 0 comes from `read_tile(y, x, h, w)` one tile at a time, in row-major order, and goes straight to the
output file. As it streams, each level-0 tile is also reduced 2x into its quarter of a level-1 tile, each complete
level-1 tile into its quarter of a level-2 tile, and so on (`_Reducer`); the upper quarters of a row wait for the
next row zlib-1 compressed (a small fraction of one row of the level's tiles). Complete tiles of the reduced levels
wait, in order, in temporary files beside the output (`_Spool`), encoded as the output stores them (zlib label
tiles) or else zlib-1 compressed, until the output file takes them after level 0 (TIFF levels follow each other),
so the pyramid's tail after the last level-0 tile is a copy of bytes. Tiles are encoded by one pool of threads, one
per usable core, with at most two tiles per thread waiting for each level: a few tiles per level are held, whatever
the image's area (peak RSS 53 MB writing a 4096² uint32 image with labels in every tile, 63 MB at 16,384², 68 MB at
20,480², `bench/bench_label_pyramid.py`). The temporary files (about 1/3 of the output) are removed.

Reduction: labels are subsampled (every second pixel, no averaging that would invent ids); RGB is the mean
of each 2x2 block (edges replicated on odd sizes). Level k has size ceil(H / 2^k) x ceil(W / 2^k).
The bytes depend only on the input (no timestamps, a UUID derived from the image's shape and pixel size).
zlib tiles of one sample are encoded here and given to tifffile as bytes, the encoded empty tile made once per
level (`_encoded_tiles`, `_Spool`; a whole slide being mostly empty tiles): by zlib-ng where imagecodecs has it
(`utils.deflate`: standard zlib streams, on label tiles 1.2-1.3x faster and 13 % smaller than tifffile's libdeflate at
the same level 6), else by tifffile's own encoder (then the same file as tifffile's encoding); other compressions are
tifffile's.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import utils

log = logging.getLogger(__name__)

ReadTile = Callable[[int, int, int, int], np.ndarray]


def level_shapes(shape: tuple[int, int], min_size: int = 2048, levels: int | None = None) -> list[tuple[int, int]]:
    """Sizes (H, W) of the pyramid levels: halving (rounded up) until the longest side is <= `min_size`,
    or exactly `levels` levels when given."""
    height, width = int(shape[0]), int(shape[1])
    shapes = [(height, width)]
    while True:
        h, w = shapes[-1]
        if levels is not None:
            if len(shapes) >= levels or (h == 1 and w == 1):
                break
        elif max(h, w) <= min_size:
            break
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def reduce2(block: np.ndarray, mode: str) -> np.ndarray:
    """2x reduction of an (h, w[, c]) block whose origin is even in the full image: 'nearest' keeps
    pixels (0, 0), (0, 2), ...; 'mean' averages each 2x2 block (edges replicated), rounding half up."""
    if mode == "nearest":
        return np.ascontiguousarray(block[::2, ::2])
    if mode != "mean":
        raise ValueError(f"unknown reduction {mode!r}")
    h, w = block.shape[:2]
    pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2)
    b = np.pad(block, pad, mode="edge").astype(np.uint32)
    total = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((total + 2) // 4).astype(block.dtype)


def _tile_grid(shape: tuple[int, int], tile: int) -> Iterator[tuple[int, int, int, int]]:
    height, width = shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield y, x, min(tile, height - y), min(tile, width - x)


def _zlib_encoder(level: int | None) -> Callable[[np.ndarray], bytes]:
    """encode(tile) -> zlib bytes: `utils.deflate` at `level` (6, tifffile's default, when None) where zlib-ng is
    installed, else `tifffile.TIFF.COMPRESSORS` of the deflate tag called as tifffile calls it (with `level=` only
    when one is given: the bytes tifffile writes)."""
    import tifffile

    if utils.zlib_ng_encoder() is not None:
        def encode(tile: np.ndarray) -> bytes:
            return utils.deflate(tile, 6 if level is None else level)
    else:
        compressor = tifffile.TIFF.COMPRESSORS[8]            # COMPRESSION.ADOBE_DEFLATE, tifffile's "zlib"

        def encode(tile: np.ndarray) -> bytes:
            return compressor(tile) if level is None else compressor(tile, level=level)
    return encode


def _padded(tile: np.ndarray, tile_shape: tuple, dtype) -> np.ndarray:
    """The tile, contiguous, padded with zeros to `tile_shape` (edge tiles), as TIFF stores them."""
    tile = np.ascontiguousarray(tile, dtype)
    if tile.shape[:2] != tuple(tile_shape[:2]):
        tile = np.pad(tile, [(0, t - s) for t, s in zip(tile_shape, tile.shape)])
    return tile


def _encoded_tiles(tiles: Iterator[np.ndarray], tile_shape: tuple, dtype, level: int | None,
                   workers: int, pool=None) -> Iterator[bytes]:
    """The zlib-encoded bytes of each tile (`_zlib_encoder`; tiles padded with zeros to `tile_shape`), in order,
    `workers` threads encoding ahead (two tiles each at most; those of `pool` when given, else a pool of its own).
    A tile of zeros is encoded once per writer and its bytes reused: a whole slide is mostly background, and an
    empty 512² tile costs about as much to encode as a tile of labels."""
    from concurrent.futures import ThreadPoolExecutor

    dtype = np.dtype(dtype)
    encode = _zlib_encoder(level)
    empty: Future | None = None
    own_pool = pool is None and workers > 1
    if own_pool:
        pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque = deque()
    try:
        for tile in tiles:
            tile = _padded(tile, tile_shape, dtype)
            if not tile.any():
                if empty is None:
                    empty = _done(encode(tile))
                future = empty
            else:
                future = _run(pool, encode, tile)
            pending.append(future)
            while len(pending) > 2 * max(workers, 1):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        if own_pool:
            pool.shutdown(wait=True)


class _Spool:
    """The tiles of one reduced level (1 and up), in order, in a temporary file until the output gets them after
    level 0. `encode` given (zlib label tiles): stored as the output stores them, encoded in `pool` as they come
    (the empty tile encoded once), so that the output only copies them. Else stored raw, zlib-1 compressed, and
    given back as arrays for tifffile to encode. At most two tiles per thread of `pool` wait to be stored."""

    def __init__(self, path: Path, tile_shape: tuple, dtype, encode: Callable[[np.ndarray], bytes] | None,
                 pool, workers: int):
        self._file = open(path, "w+b")
        self._tile_shape, self._dtype, self._encode, self._pool = tuple(tile_shape), np.dtype(dtype), encode, pool
        self._limit = 2 * max(workers, 1)
        self._index: list = []      # per tile: (offset, length) of its bytes, or None (empty); and its shape
        self._pending: deque = deque()
        self._empty: bytes | None = None

    def put(self, tile: np.ndarray | None, shape: tuple) -> None:
        """One tile of the level (clipped to the image at its edges), or None for an empty one of `shape`."""
        if tile is None or not tile.any():
            self._pending.append((None, shape))
        elif self._encode is not None:
            self._pending.append((_run(self._pool, self._encode, _padded(tile, self._tile_shape, self._dtype)), shape))
        else:
            self._pending.append((_run(self._pool, utils.deflate, np.ascontiguousarray(tile, self._dtype), 1), shape))
        while len(self._pending) > self._limit:
            self._store()

    def _store(self) -> None:
        future, shape = self._pending.popleft()
        if future is None:
            self._index.append((None, shape))
            return
        data = future.result()
        self._index.append(((self._file.tell(), len(data)), shape))
        self._file.write(data)

    def tiles(self) -> Iterator:
        """The level's tiles in order: encoded bytes, or arrays."""
        import zlib

        while self._pending:
            self._store()
        for where, shape in self._index:
            if where is None:
                if self._encode is None:
                    yield np.zeros(shape, self._dtype)
                    continue
                if self._empty is None:
                    self._empty = self._encode(np.zeros(self._tile_shape, self._dtype))
                yield self._empty
                continue
            self._file.seek(where[0])
            data = self._file.read(where[1])
            yield data if self._encode is not None else np.frombuffer(zlib.decompress(data), self._dtype).reshape(shape)

    def close(self) -> None:
        for future, _ in self._pending:
            if future is not None:
                future.cancel()
        self._file.close()


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _run(pool, fn, *args) -> Future:
    """`fn(*args)` in `pool`, or here and now when there is none (one usable core)."""
    return pool.submit(fn, *args) if pool is not None else _done(fn(*args))


class _Reducer:
    """Makes level k (k >= 1) of the pyramid from the tiles of level k - 1, given in row-major order: each is
    reduced 2x into its quarter of a level-k tile, and a level-k tile, once its last quarter is in, goes to the
    level's `_Spool` and on to the next reducer (level-k tiles too come in row-major order). The upper quarters
    of a row of level-k tiles wait for the next row of level k - 1: they are held zlib-1 compressed (non-empty
    ones only; label quarters shrink 10x or more), with at most the lower quarters of one tile uncompressed."""

    def __init__(self, shape: tuple[int, int], previous_grid: tuple[int, int], tile: int, pixel_shape, dtype,
                 reduce: str, spool: _Spool, following: "_Reducer | None"):
        self.height, self.width = shape
        self.tile, self.pixel_shape, self.dtype, self.reduce = tile, pixel_shape, np.dtype(dtype), reduce
        self.previous_rows, self.previous_cols = previous_grid
        self.spool, self.following = spool, following
        self._upper: dict[int, list] = {}   # column -> its upper quarters: (y, x, zlib bytes, shape)
        self._lower: list = []              # the lower quarters of the tile being completed: (y, x, quarter)

    def add(self, ty: int, tx: int, tile: np.ndarray | None) -> None:
        """Tile (ty, tx) of the previous level (None: empty)."""
        row, col = ty // 2, tx // 2
        quarter = None if tile is None else reduce2(tile, self.reduce)
        if quarter is not None and not quarter.any():
            quarter = None
        y, x = (ty % 2) * (self.tile // 2), (tx % 2) * (self.tile // 2)
        last_ty, last_tx = min(2 * row + 1, self.previous_rows - 1), min(2 * col + 1, self.previous_cols - 1)
        if ty != last_ty:       # an upper quarter: its tile is complete only in the next row
            if quarter is not None:
                self._upper.setdefault(col, []).append((y, x, utils.deflate(quarter, 1), quarter.shape))
            return
        if quarter is not None:
            self._lower.append((y, x, quarter))
        if tx != last_tx:
            return
        upper, lower, self._lower = self._upper.pop(col, []), self._lower, []
        size = self.pixel_shape(*self._tile_size(row, col))
        done = None
        if upper or lower:      # the tile is complete (its last quarter is in)
            import zlib

            done = np.zeros(size, self.dtype)
            parts = [(qy, qx, np.frombuffer(zlib.decompress(data), self.dtype).reshape(shape))
                     for qy, qx, data, shape in upper] + lower
            for qy, qx, part in parts:
                done[qy:qy + part.shape[0], qx:qx + part.shape[1]] = part
        self.spool.put(done, size)
        if self.following is not None:
            self.following.add(row, col, done)

    def _tile_size(self, row: int, col: int) -> tuple[int, int]:
        return min(self.tile, self.height - row * self.tile), min(self.tile, self.width - col * self.tile)


def write_tiled_pyramid(path: str | os.PathLike, shape: tuple[int, int], read_tile: ReadTile, *,
                        dtype, samples: int = 1, reduce: str = "nearest", tile_size: int = 512,
                        levels: int | None = None, min_size: int = 2048, compression: str = "zlib",
                        subifds: bool = True, photometric: str | None = None,
                        level_kwargs: Callable[[int, float], dict] | None = None,
                        bigtiff: bool | None = None, ome: bool = False, desc: str = "pyramid",
                        show_progress: bool = True) -> Path:
    """Stream a tiled pyramidal TIFF to `path` (temporary file + rename); see the module docstring.

    `read_tile(y, x, h, w)` returns level-0 pixels (h, w) or (h, w, samples) of `dtype`, called once per
    tile in row-major order. `subifds=True` stores levels >= 1 as SubIFDs of the first page (OME-TIFF
    pyramids), else as following pages marked reduced-resolution (OpenSlide's generic / Aperio layout).
    `level_kwargs(level, downsample)` gives extra `TiffWriter.write` keywords per level (description,
    resolution, metadata...); `ome=True` makes tifffile write OME-XML from level 0's `metadata`.
    `show_progress=False`: no progress bar (a caller writing while other work shows its own). Returns the path.
    """
    import tifffile
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    path = Path(path)
    tile_size = int(tile_size)
    if tile_size < 32 or tile_size % 32:
        raise ValueError(f"tile_size must be a multiple of 32, got {tile_size}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    dtype = np.dtype(dtype)
    shapes = level_shapes((height, width), min_size=min_size, levels=levels)
    pixel_shape = (lambda h, w: (h, w)) if samples == 1 else (lambda h, w: (h, w, samples))
    if bigtiff is None:
        bigtiff = height * width * samples * dtype.itemsize * 4 // 3 > 2**31
    if photometric is None:
        photometric = "minisblack" if samples == 1 else "rgb"
    level_extra = level_kwargs or (lambda level, ds: {})
    # the tiles are compressed in parallel threads (zlib releases the GIL), one per core this process may use, the
    # same bytes whatever the count (they are written in order); tifffile takes tiles from the generator ahead of
    # its threads up to `buffersize` bytes (512 MiB by default, which would undo the bounded memory): two tiles
    # per thread
    workers = utils.usable_cores()
    tile_bytes = tile_size * tile_size * samples * dtype.itemsize
    common = dict(compression=compression, photometric=photometric, metadata=None, maxworkers=workers,
                  buffersize=2 * workers * tile_bytes)

    def extra(level: int, downsample: float) -> dict:
        kwargs = dict(common)
        kwargs.update(level_extra(level, downsample))
        return kwargs

    own_encoding = _own_encoding(compression, samples, [level_extra(level, 1.0) for level in range(len(shapes))])
    tile_shape = pixel_shape(tile_size, tile_size)
    n_tiles = sum(1 for _ in _tile_grid((height, width), tile_size))

    tmp_dir = Path(tempfile.mkdtemp(prefix=".pyramid_", dir=path.parent if path.parent.exists() else None))
    out_tmp = utils.temp_file_beside(path)
    # one pool of threads (one per usable core) encodes the tiles of every level
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    spools: list[_Spool] = []
    try:
        encode = _zlib_encoder(None) if own_encoding else None
        spools = [_Spool(tmp_dir / f"level{level}.tiles", tile_shape, dtype, encode, pool, workers)
                  for level in range(1, len(shapes))]
        reducer = None
        for level in range(len(shapes) - 1, 0, -1):     # levels 1, 2, ... each feeding the next
            previous = (-(-shapes[level - 1][0] // tile_size), -(-shapes[level - 1][1] // tile_size))
            reducer = _Reducer(shapes[level], previous, tile_size, pixel_shape, dtype, reduce, spools[level - 1],
                               reducer)

        def level0_tiles(progress) -> Iterator[np.ndarray]:
            for y, x, h, w in _tile_grid((height, width), tile_size):
                tile = np.asarray(read_tile(y, x, h, w))
                if tile.shape != pixel_shape(h, w):
                    raise ValueError(f"read_tile({y}, {x}, {h}, {w}) returned shape {tile.shape}, "
                                     f"expected {pixel_shape(h, w)}")
                tile = tile.astype(dtype, copy=False)
                if reducer is not None:    # the reduced levels are made (and encoded) as level 0 streams
                    reducer.add(y // tile_size, x // tile_size, tile)
                progress.update(1)
                yield tile

        with tifffile.TiffWriter(out_tmp, bigtiff=bigtiff, ome=ome) as tw:
            with tqdm(total=n_tiles, desc=desc, unit="tile", disable=n_tiles < 64 or not show_progress,
                      leave=False) as progress:
                tiles = level0_tiles(progress)
                if own_encoding:
                    tiles = _encoded_tiles(tiles, tile_shape, dtype, None, workers, pool=pool)
                tw.write(tiles, shape=pixel_shape(height, width), dtype=dtype, tile=(tile_size, tile_size),
                         subifds=(len(shapes) - 1) if subifds and len(shapes) > 1 else None, subfiletype=0,
                         **extra(0, 1.0))
            for level in range(1, len(shapes)):
                tw.write(spools[level - 1].tiles(), shape=pixel_shape(*shapes[level]), dtype=dtype,
                         tile=(tile_size, tile_size), subfiletype=1, **extra(level, float(2 ** level)))
        os.replace(out_tmp, path)
    except BaseException:
        out_tmp.unlink(missing_ok=True)
        raise
    finally:
        for spool in spools:
            spool.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _own_encoding(compression: str, samples: int, level_extras: list[dict]) -> bool:
    """Whether the tiles are encoded here (zlib label tiles, `_encoded_tiles`, so that the encoded empty tile is
    reused and the reduced levels are encoded while level 0 streams) rather than by tifffile."""
    return compression == "zlib" and samples == 1 and not any(
        key in extra for extra in level_extras for key in ("compressionargs", "predictor"))


def ome_uuid(shape: tuple[int, int], mpp: float | None, name: str) -> str:
    """A UUID derived from the image's shape, pixel size and file name (OME wants one; a random one would
    make the bytes differ between identical runs)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'nuclei-labels/{name}/{shape[0]}x{shape[1]}/{mpp}')}"


def write_label_pyramid(path: str | os.PathLike, shape: tuple[int, int], read_tile: ReadTile, *,
                        mpp: float | None = None, tile_size: int = 512, compression: str = "zlib",
                        min_size: int = 2048, show_progress: bool = True) -> Path:
    """Write a uint32 instance-label image of `shape` (H, W) as a tiled, compressed, pyramidal OME-TIFF.

    `read_tile(y, x, h, w) -> uint32 (h, w)` is called for the level-0 tiles in row-major order. Levels
    halve by subsampling (every second pixel: ids are kept, never averaged) until the longest side is at
    most `min_size`; they are SubIFDs of the first page (OME-TIFF pyramid: QuPath, napari, Bio-Formats).
    With `mpp` the OME metadata carries PhysicalSizeX/Y in micrometres and every level has TIFF
    resolution tags. Written to a temporary file and renamed; byte-deterministic. Returns the path.
    """
    path = Path(path)
    shape = (int(shape[0]), int(shape[1]))

    def level_kwargs(level: int, downsample: float) -> dict:
        kwargs: dict = {}
        if mpp:
            per_cm = 1e4 / (float(mpp) * downsample)
            kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if level == 0:
            metadata = {"axes": "YX", "Name": path.name, "UUID": ome_uuid(shape, mpp, path.name)}
            if mpp:
                metadata.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm",
                                PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
            kwargs["metadata"] = metadata
        return kwargs

    return write_tiled_pyramid(path, shape, read_tile, dtype=np.uint32, samples=1, reduce="nearest",
                               tile_size=tile_size, min_size=min_size, compression=compression, subifds=True,
                               photometric="minisblack", level_kwargs=level_kwargs, ome=True, desc="label tiles",
                               show_progress=show_progress)
