"""A slide region's maps and RGB handed to a post-processing worker: the pool's pickle vs `utils.ArrayHandoff`.

    python bench/bench_handoff.py [--side 2304] [--jobs 8] [--rounds 2]

One spawned worker (`utils.process_pool`), jobs of a `--side`² crop as `wsi.run_regions` sends them: foreground
(float32), HV (2 x float32) and RGB (uint8), 75 MB at 2304² (a 2048 region and its margin). Per job: this
process's CPU seconds (user + system, its pickling and feeder threads included) and the elapsed time until the
worker has the arrays and has read a sample of them; pickle and shared memory alternate, `--rounds` times each.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def use(job: dict) -> float:
    if job.get("arrays") is not None:
        job = dict(job, **utils.unpack_arrays(job["arrays"]))
    return float(job["fg"][::97, ::97].sum() + job["hv"][:, ::97, ::97].sum() + job["rgb"][::97, ::97].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2304)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side = args.side
    fg = rng.random((side, side), dtype=np.float32)
    hv = rng.random((2, side, side), dtype=np.float32)
    rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    reference = use({"fg": fg, "hv": hv, "rgb": rgb})
    pool = utils.process_pool(1)
    pool.submit(use, {"fg": fg[:2, :2], "hv": hv[:, :2, :2], "rgb": rgb[:2, :2]}).result()   # worker started

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    mb = (fg.nbytes + hv.nbytes + rgb.nbytes) / 2 ** 20
    print(f"{args.jobs} jobs of {mb:.0f} MB ({side}² crop), one worker, shared memory in {utils.SHARED_MEMORY_DIR}")
    print("| way | this process's CPU s per job | elapsed s per job |\n| --- | --- | --- |")
    for _ in range(args.rounds):
        for way in ("pickle", "shared memory"):
            handoff = utils.ArrayHandoff()
            c, t = cpu(), time.time()
            for _ in range(args.jobs):
                job = {"fg": fg, "hv": hv, "rgb": rgb}
                packed = handoff.pack(job) if way == "shared memory" else None
                if way == "shared memory" and packed is None:
                    raise SystemExit(f"no usable shared memory in {utils.SHARED_MEMORY_DIR}")
                if packed is not None:
                    job = {"arrays": packed}
                if pool.submit(use, job).result() != reference:
                    raise SystemExit("the worker got other values")
                handoff.release(packed)
            handoff.close()
            print(f"| {way} | {(cpu() - c) / args.jobs:.3f} | {(time.time() - t) / args.jobs:.3f} |")
    pool.shutdown()


if __name__ == "__main__":
    main()
