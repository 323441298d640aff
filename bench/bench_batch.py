"""Seconds per window of the bare network by batch size: the measurement behind `--batch_size`'s CPU default
(issue 17, point 2; docs/benchmarks.md "Issue 17: one engine").

    python bench/bench_batch.py [--input_sizes 256,512,1024] [--batches 1,2,4,8] [--rounds 3] [--threads 2]
                                [--device cpu]

The model is the project's network with random weights (input size on 512-pixel training tiles, LoRA rank 4),
through the engine's maps function (`inference.NetworkMaps`, the path `predict` runs), on random 512 x 512
tiles. OpenMP waits are set as `main.py` sets them. Each round times every batch size once (at least 4 windows
per size), in alternating order from round to round, so a change of machine load hits all sizes alike; the
median over rounds is printed per size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_sizes", default="256,512,1024")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import main as cli

    cli.preset_environment(["--threads", str(args.threads)])
    import numpy as np
    import torch

    import inference
    import nuclei_model
    import utils

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(max(batches))]
    for input_size in [int(s) for s in args.input_sizes.split(",")]:
        config = {"input_size": input_size, "pretrained": None, "head": "hv", "lora_rank": 4, "lora_alpha": 4.0,
                  "train_only_lora": False, "mpp": 0.25, "tile_size": 512}
        utils.set_seed(0)
        net = nuclei_model.prepare_for_inference(nuclei_model.build_model(config, pretrained=None))
        maps_fn = inference.NetworkMaps([net], input_size / 512, args.device)
        maps_fn(tiles[:2])  # warm-up
        seconds: dict[int, list[float]] = {b: [] for b in batches}
        for r in range(args.rounds):
            for b in (batches if r % 2 == 0 else batches[::-1]):
                calls = max(1, 4 // b)
                t0 = time.perf_counter()
                for _ in range(calls):
                    maps_fn(tiles[:b])
                seconds[b].append((time.perf_counter() - t0) / (calls * b))
        medians = {b: round(statistics.median(v), 3) for b, v in seconds.items()}
        print(json.dumps({"input": input_size, "threads": args.threads, "median_s_per_window": medians,
                          "best_batch": min(medians, key=medians.get),
                          "all": {b: [round(x, 3) for x in v] for b, v in seconds.items()}}), flush=True)


if __name__ == "__main__":
    main()
