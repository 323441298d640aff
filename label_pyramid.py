"""Writing a big image tile by tile as a tiled, compressed, pyramidal TIFF, in bounded memory.

`write_label_pyramid` writes a uint32 instance-label image (whole-slide predictions) as an OME-TIFF whose
sub-resolutions are SubIFDs (the layout QuPath, napari/tifffile and Bio-Formats read as one pyramidal image).
`write_tiled_pyramid` is the general streaming writer underneath, also used for synthetic RGB slides
(`sample_data.write_pyramidal_tiff_from_tiles`, levels as consecutive IFDs: the layout OpenSlide reads).

Memory: level 0 comes from `read_tile(y, x, h, w)` one tile at a time, in row-major order, and goes straight
to the output file. Each level-0 tile is also reduced 2x into a temporary tiled TIFF of level 1 (tiles of
half the size, so one level-0 tile makes exactly one temporary tile). Every further level is made from the
previous temporary file, reading 2x2 output tiles' worth at a time (only the tiles they touch); the output
file gets each level by reading its temporary file back block by block. So at most a few tiles are held at
once (two per compressing thread of the output: one per usable core), whatever the image size, and the temporary files (1/3 of the level-0 pixels, compressed) are removed.

Reduction: labels are subsampled (every second pixel, no averaging that would invent ids); RGB is the mean
of each 2x2 block (edges replicated on odd sizes). Level k has size ceil(H / 2^k) x ceil(W / 2^k).
The bytes depend only on the input (no timestamps, a UUID derived from the image's shape and pixel size).
zlib tiles of one sample are encoded here and given to tifffile as bytes, the encoded empty tile made once per
level (`_encoded_tiles`, a whole slide being mostly empty tiles): by zlib-ng where imagecodecs has it
(`utils.deflate`: standard zlib streams, on label tiles 1.2-1.3x faster and 13 % smaller than tifffile's libdeflate at
the same level 6, 5x faster at the temporary levels' level 1), else by tifffile's own encoder (then the same file as
tifffile's encoding); other compressions are tifffile's.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
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


class _TileReader:
    """One of our temporary tiled TIFFs read block by block: `reader[y0:y1, x0:x1]` reads and decodes only the
    tiles the block touches (tifffile's `TiffPage.decode`), clipped to the image as numpy slicing is. (The
    former zarr store did the same through zarr, whose import alone costs about 0.3 s of CPU per process.)"""

    def __init__(self, path: Path):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        page = self._tif.pages.first
        if not page.is_tiled:
            self._tif.close()
            raise ValueError(f"{path}: not a tiled TIFF")
        self._page = page
        self.shape = tuple(page.shape)
        self.dtype = page.dtype
        self._tile = (int(page.tilelength), int(page.tilewidth))
        self._across = -(-int(page.imagewidth) // self._tile[1])
        self._samples = int(page.samplesperpixel)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        height, width = self.shape[:2]
        (y0, y1, _), (x0, x1, _) = key[0].indices(height), key[1].indices(width)
        out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)) + self.shape[2:], self.dtype)
        th, tw = self._tile
        page, fh = self._page, self._tif.filehandle
        for ty in range(y0 // th, -(-y1 // th)):
            for tx in range(x0 // tw, -(-x1 // tw)):
                index = ty * self._across + tx
                if not page.databytecounts[index]:
                    continue   # an empty tile reads as zeros
                fh.seek(page.dataoffsets[index])
                tile = page.decode(fh.read(page.databytecounts[index]), index)[0]
                tile = tile.reshape((th, tw) + self.shape[2:])
                ya, yb = max(y0, ty * th), min(y1, (ty + 1) * th)
                xa, xb = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = tile[ya - ty * th:yb - ty * th, xa - tx * tw:xb - tx * tw]
        return out

    def close(self) -> None:
        self._tif.close()


def _encoded_tiles(tiles: Iterator[np.ndarray], tile_shape: tuple, dtype, level: int | None,
                   workers: int) -> Iterator[bytes]:
    """The zlib-encoded bytes of each tile (tiles padded with zeros to `tile_shape`), in order, `workers` threads
    encoding ahead (two tiles each at most): `utils.deflate` at `level` (6, tifffile's default, when None) where
    zlib-ng is installed, else `tifffile.TIFF.COMPRESSORS` of the deflate tag called as tifffile calls it (with
    `level=` only when one is given: the bytes tifffile writes). A tile of zeros is encoded once per writer and its
    bytes reused: a whole slide is mostly background, and an empty 512² tile costs about as much to encode as a
    tile of labels."""
    import tifffile
    from concurrent.futures import Future, ThreadPoolExecutor
    from collections import deque

    dtype = np.dtype(dtype)
    if utils.zlib_ng_encoder() is not None:
        def encode(tile: np.ndarray) -> bytes:
            return utils.deflate(tile, 6 if level is None else level)
    else:
        compressor = tifffile.TIFF.COMPRESSORS[8]            # COMPRESSION.ADOBE_DEFLATE, tifffile's "zlib"

        def encode(tile: np.ndarray) -> bytes:
            return compressor(tile) if level is None else compressor(tile, level=level)

    def padded(tile: np.ndarray) -> np.ndarray:
        tile = np.ascontiguousarray(tile, dtype)
        if tile.shape[:2] != tuple(tile_shape[:2]):
            tile = np.pad(tile, [(0, t - s) for t, s in zip(tile_shape, tile.shape)])
        return tile

    empty: Future | None = None
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    pending: deque = deque()
    try:
        for tile in tiles:
            tile = padded(tile)
            if not tile.any():
                if empty is None:
                    empty = Future()
                    empty.set_result(encode(tile))
                future = empty
            elif pool is None:
                future = Future()
                future.set_result(encode(tile))
            else:
                future = pool.submit(encode, tile)
            pending.append(future)
            while len(pending) > 2 * max(workers, 1):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


# one compressing thread for the temporary levels (they are written beside the output, in a thread of their own):
# with more, tifffile takes tiles from the generator ahead of compression, up to 512 MiB by default
_TEMP_LEVEL = 1
_TEMP_OPTIONS = dict(compression="zlib", compressionargs={"level": _TEMP_LEVEL}, metadata=None, maxworkers=1)


class _ThreadedTileWriter:
    """Writes tiles `put` from the calling thread to a tiled TIFF through tifffile in a background thread
    (tifffile's writer pulls tiles from an iterator; this lets a second file be written while the first
    writer pulls from the main stream). The queue holds at most a few tiles."""

    _END = object()

    def __init__(self, path: Path, shape, dtype, tile: int, photometric: str, bigtiff: bool,
                 encode: bool = False):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._ended = False

        def tiles():
            while True:
                item = self._queue.get()
                if item is self._END:
                    self._ended = True
                    return
                yield item

        def work():
            import tifffile

            try:
                data = _encoded_tiles(tiles(), (tile, tile) + tuple(shape[2:]), dtype, _TEMP_LEVEL, 1) if encode \
                    else tiles()
                with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
                    tw.write(data, shape=shape, dtype=dtype, tile=(tile, tile), photometric=photometric,
                             **_TEMP_OPTIONS)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                self._error = e
                while not self._ended:  # drain so the producer never blocks on a dead consumer
                    self._ended = self._queue.get() is self._END

        self._thread = threading.Thread(target=work, name="pyramid-level1", daemon=True)
        self._thread.start()

    def put(self, tile: np.ndarray) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing the temporary level failed: {self._error}") from self._error
        self._queue.put(tile)

    def __enter__(self) -> "_ThreadedTileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(self._END)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise RuntimeError(f"writing the temporary level failed: {self._error}") from self._error


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
    # the output's tiles are compressed in parallel threads (zlib releases the GIL), one per core this process
    # may use, the same bytes whatever the count (tifffile writes them in order); tifffile takes tiles from the
    # generator ahead of its threads up to `buffersize` bytes (512 MiB by default, which would undo the bounded
    # memory): two tiles per thread
    workers = utils.usable_cores()
    tile_bytes = tile_size * tile_size * samples * dtype.itemsize
    common = dict(compression=compression, photometric=photometric, metadata=None, maxworkers=workers,
                  buffersize=2 * workers * tile_bytes)

    def extra(level: int, downsample: float) -> dict:
        kwargs = dict(common)
        kwargs.update(level_extra(level, downsample))
        return kwargs

    # zlib label tiles are encoded here (`_encoded_tiles`: by zlib-ng, or to the bytes tifffile's own encoding gives)
    # so that the encoded empty tile is reused; anything else tifffile encodes
    own_encoding = compression == "zlib" and samples == 1 and not any(
        key in level_extra(level, 1.0) for level in range(len(shapes)) for key in ("compressionargs", "predictor"))

    def encoded(tiles: Iterator[np.ndarray], tile: int, level: int | None, threads: int):
        return _encoded_tiles(tiles, (tile, tile), dtype, level, threads) if own_encoding else tiles

    tmp_dir = Path(tempfile.mkdtemp(prefix=".pyramid_", dir=path.parent if path.parent.exists() else None))
    out_tmp = utils.temp_file_beside(path)
    try:
        # temporary level 1 with half-size tiles, filled while level 0 streams to the output
        half = tile_size // 2

        def level0_tiles(progress, level1_sink) -> Iterator[np.ndarray]:
            for y, x, h, w in _tile_grid((height, width), tile_size):
                tile = np.asarray(read_tile(y, x, h, w))
                if tile.shape != pixel_shape(h, w):
                    raise ValueError(f"read_tile({y}, {x}, {h}, {w}) returned shape {tile.shape}, "
                                     f"expected {pixel_shape(h, w)}")
                tile = tile.astype(dtype, copy=False)
                if level1_sink is not None:
                    level1_sink.put(reduce2(tile, reduce))
                progress.update(1)
                yield tile

        def level_tiles_from(source, level_shape) -> Iterator[np.ndarray]:
            for y, x, h, w in _tile_grid(level_shape, tile_size):
                yield np.asarray(source[y:y + h, x:x + w])

        def reduced_tiles(source, level_shape) -> Iterator[np.ndarray]:
            for y, x, h, w in _tile_grid(level_shape, tile_size):
                yield reduce2(np.asarray(source[2 * y:2 * (y + h), 2 * x:2 * (x + w)]), reduce)

        def write_temp(level_path: Path, level_shape, tiles, tile) -> None:
            with tifffile.TiffWriter(level_path, bigtiff=bigtiff) as tw:
                tw.write(encoded(tiles, tile, _TEMP_LEVEL, 1), shape=pixel_shape(*level_shape), dtype=dtype,
                         tile=(tile, tile), **_TEMP_OPTIONS, photometric=photometric)

        n_tiles = sum(1 for _ in _tile_grid((height, width), tile_size))
        temp1 = tmp_dir / "level1.tif"
        with tifffile.TiffWriter(out_tmp, bigtiff=bigtiff, ome=ome) as tw:
            with tqdm(total=n_tiles, desc=desc, unit="tile", disable=n_tiles < 64 or not show_progress,
                      leave=False) as progress:
                if len(shapes) > 1:
                    # level 1 goes to its temporary file through a second writer in a thread, fed by a
                    # small bounded queue: one half-size tile per level-0 tile, same row-major grid
                    with _ThreadedTileWriter(temp1, pixel_shape(*shapes[1]), dtype, half, photometric,
                                             bigtiff, encode=own_encoding) as level1:
                        tw.write(encoded(level0_tiles(progress, level1), tile_size, None, workers),
                                 shape=pixel_shape(height, width),
                                 dtype=dtype, tile=(tile_size, tile_size),
                                 subifds=(len(shapes) - 1) if subifds else None, subfiletype=0,
                                 **extra(0, 1.0))
                else:
                    tw.write(encoded(level0_tiles(progress, None), tile_size, None, workers),
                             shape=pixel_shape(height, width), dtype=dtype,
                             tile=(tile_size, tile_size), subfiletype=0, **extra(0, 1.0))
            previous = temp1
            for level in range(1, len(shapes)):
                source = store = _TileReader(previous)
                try:
                    downsample = float(2 ** level)
                    tw.write(encoded(level_tiles_from(source, shapes[level]), tile_size, None, workers),
                             shape=pixel_shape(*shapes[level]),
                             dtype=dtype, tile=(tile_size, tile_size), subfiletype=1,
                             **extra(level, downsample))
                    if level + 1 < len(shapes):
                        following = tmp_dir / f"level{level + 1}.tif"
                        write_temp(following, shapes[level + 1], reduced_tiles(source, shapes[level + 1]),
                                   tile_size)
                finally:
                    store.close()
                previous.unlink()
                if level + 1 < len(shapes):
                    previous = following
        os.replace(out_tmp, path)
    except BaseException:
        out_tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


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
