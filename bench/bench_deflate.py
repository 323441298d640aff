"""Deflating the label files: zlib / tifffile's libdeflate against zlib-ng (`utils.deflate`), time and size.

    python bench/bench_deflate.py [--work /tmp/cpu/bs4096] [--repeats 5]

Input: the real NuInsSeg label map under the maps of `bench/bench_cpu_side.py` (`labels.npy`, 4096², about 4,500
nuclei per mm²; written there first if `--work` has none). Three things are deflated, one thread, CPU seconds,
best of `--repeats` (the encoders alternate), and every stream is inflated back by zlib and compared:
- a region file's label crop (`wsi.finish_region`): 2048² cores renumbered 1..n as uint16, at level 1;
- the label pyramid's level-0 tiles (`label_pyramid`): the 64 uint32 tiles of 512², at tifffile's default level 6
  (tifffile's "zlib" encoder, which is imagecodecs' libdeflate) and zlib-ng's 6;
- its temporary levels' tiles: the 2x-subsampled image's 256² tiles at level 1.
"""
from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_cpu_side  # noqa: E402  (the input shared by the benches of single steps)


def timed(encode, items, repeats: int, clock=time.process_time) -> tuple[float, int, list]:
    best, out = 1e9, []
    for _ in range(repeats):
        t = clock()
        out = [encode(item) for item in items]
        best = min(best, clock() - t)
    return best, sum(len(b) for b in out), out


def main() -> None:
    args = bench_cpu_side.single_step_arguments(__doc__.splitlines()[0], repeats=5)
    import tifffile

    import utils

    if utils.zlib_ng_encoder() is None:
        raise SystemExit("imagecodecs without zlib-ng here: utils.deflate is zlib itself")
    labels = np.load(bench_cpu_side.bench_input(args.work) / "labels.npy")
    crops = []
    for y0, x0 in ((0, 0), (0, 2048), (2048, 0), (2048, 2048)):
        crop = labels[y0:y0 + 2048, x0:x0 + 2048]
        ids, inverse = np.unique(crop, return_inverse=True)
        crops.append(np.ascontiguousarray(inverse.reshape(crop.shape).astype(np.uint16) if ids[0] == 0
                                          else (inverse.reshape(crop.shape) + 1).astype(np.uint16)))
    tiles = [np.ascontiguousarray(labels[y:y + 512, x:x + 512].astype(np.uint32))
             for y in range(0, labels.shape[0], 512) for x in range(0, labels.shape[1], 512)]
    half = labels[::2, ::2]
    small = [np.ascontiguousarray(half[y:y + 256, x:x + 256].astype(np.uint32))
             for y in range(0, half.shape[0], 256) for x in range(0, half.shape[1], 256)]
    libdeflate = tifffile.TIFF.COMPRESSORS[8]
    cases = [
        ("region label crops (4 x 2048², uint16), level 1", crops,
         ("zlib", lambda a: zlib.compress(a.tobytes(), 1)), ("zlib-ng", lambda a: utils.deflate(a, 1))),
        ("label pyramid level 0 (64 x 512², uint32), level 6", tiles,
         ("libdeflate (tifffile)", lambda a: libdeflate(a)), ("zlib-ng", lambda a: utils.deflate(a, 6))),
        ("temporary level 1 (64 x 256², uint32), level 1", small,
         ("libdeflate (tifffile)", lambda a: libdeflate(a, level=1)), ("zlib-ng", lambda a: utils.deflate(a, 1))),
    ]
    print("| data | encoder | ms | MB | encoder | ms | MB | time ratio | inflated equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, items, (old_name, old), (new_name, new) in cases:
        results = {}
        for _ in range(2):   # alternate: each best of `repeats` twice over
            for key, encode in (("old", old), ("new", new)):
                t, size, out = timed(encode, items, args.repeats)
                prev = results.get(key)
                results[key] = (min(t, prev[0]) if prev else t, size, out)
        equal = all(zlib.decompress(a) == item.tobytes() == zlib.decompress(b)
                    for a, b, item in zip(results["old"][2], results["new"][2], items))
        (t0, s0, _), (t1, s1, _) = results["old"], results["new"]
        print(f"| {name} | {old_name} | {t0 * 1e3:.1f} | {s0 / 1e6:.3f} | {new_name} | {t1 * 1e3:.1f} | {s1 / 1e6:.3f} "
              f"| {t0 / max(t1, 1e-9):.2f}x | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
