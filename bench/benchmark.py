"""Speed and memory figures of the toolkit: encoder, training step, end-to-end prediction, metrics.

    python bench/benchmark.py [--device cpu|cuda] [--threads 2] [--sizes 512,1024] [--repeats 3]
                              [--out docs/benchmarks.json] [--markdown docs/benchmarks.md] [--quick] [--compile]

What is measured (random weights throughout: weights do not change speed):

1. Encoder forward time per image at each size, batch 1 and the best batch (1, 2 on CPU; 1, 2, 4, 8 on CUDA):
   - plain: the reference formulation (BatchNorm unfused, explicit softmax attention, NCHW; what the official
     MobileSAM encoder computes), from `bench_encoder.build_pair`;
   - plain+LoRA: the same with unmerged rank-4 LoRA adapters on qkv/proj (the encoder as trained);
   - optimised: `nuclei_model.prepare_for_inference` of plain+LoRA (LoRA merged, BatchNorm folded),
     scaled_dot_product_attention, channels-last; bf16 autocast on CUDA; `--compile` adds a torch.compile row.
   The variants run interleaved (background load hits all alike); min and median of `--repeats` runs after a
   warm-up. Outputs are checked in float32: optimised vs plain+LoRA must agree to a relative L2 below 1e-4.
2. Training step (forward, `nuclei_model.compute_loss`, backward, AdamW step) of `nuclei_model.build_model`
   with LoRA-only versus full fine-tuning at the same batch, each case in a fresh subprocess. Peak memory:
   on CUDA `torch.cuda.max_memory_allocated` minus the allocation after the model was built; on CPU the
   growth of the process's peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) over its value
   after the model and batch were built (tracemalloc cannot see torch's allocations). It covers activations
   kept for backward, gradients, AdamW state and allocator caching.
3. End-to-end prediction throughput (`predict.segment_images`: read PNG, network, stitching, post-processing,
   TIFF/GeoJSON/CSV/overlay writing) on 512 x 512 synthetic H&E tiles (`sample_data.render_tile`), with
   post-processing in spawned worker processes overlapping the network versus all in one process. The random
   network's maps are replaced, after it has run, by maps made from the tile's ground truth, so post-processing
   does the work of a tile with real nuclei (a random network finds almost none, which would make
   post-processing look free). Both runs must write identical label maps.
4. `metrics.instance_metrics` and `postprocess.postprocess` time per 512 x 512 tile with about 150 nuclei
   (`bench_metrics.synthetic_tile`).
5. Network: encoder versus decoder head versus the whole network, at each size, batch 1, in the same run
   (interleaved): `nuclei_model.prepare_for_inference` of `build_model` (rank-4 LoRA, `hv` head), under
   inference_mode, float32 on CPU (bf16 autocast on CUDA, as `predict` runs it), with `--network-threads`
   torch threads on CPU (default 1). Encoder = `encoder.forward_features` of the normalised image, head =
   `head(image, features)` on those features, whole = `net(uint8 image)`; median and min of `--repeats`
   runs after a warm-up, and head / encoder from the medians.

Timings on a shared machine are noisy: the load average is recorded before each section.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# predict.py's spawned post-processing workers re-run this file's top level as `__mp_main__`; they need none
# of the modules below, and importing torch there would charge its start-up to the overlapped measurement.
if __name__ != "__mp_main__":
    import tifffile
    import torch

    import bench_encoder  # noqa: E402
    import bench_metrics  # noqa: E402
    import dataset  # noqa: E402
    import lora  # noqa: E402
    import metrics  # noqa: E402
    import model  # noqa: E402
    import nuclei_model  # noqa: E402
    import postprocess  # noqa: E402
    import inference  # noqa: E402
    import predict  # noqa: E402
    import sample_data  # noqa: E402
    import utils  # noqa: E402

OFFICIAL_CPU_S_1024 = 1.4  # official MobileSAM encoder on this project's CPU machine, 1024, float32, 2 threads
LORA_RANK = 4
MARK = "<!-- benchmark:{device}:{edge} -->"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """The machine in words (CPU model or GPU name), threads, versions and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": device.type, "cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def summary(times: Sequence[float], per: int = 1) -> dict[str, float]:
    return {"min": min(times) / per, "median": statistics.median(times) / per}


# ----------------------------------------------------------------------------------------------
# 1. Encoder
# ----------------------------------------------------------------------------------------------
def encoder_variants(device: torch.device, compile_model: bool = False
                     ) -> tuple[dict[str, torch.nn.Module], str]:
    """{"plain", "plain+LoRA", "optimised"[, "compiled"]} encoders on `device`, and the weights' source."""
    plain, _, source = bench_encoder.build_pair(bench_encoder.REFERENCE_DIR)
    with_lora = copy.deepcopy(plain)
    lora.apply_lora(with_lora, LORA_RANK, float(LORA_RANK), targets=("qkv", "proj"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking, non-zero update so that merging has something to merge
        for name, p in with_lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    optimised = nuclei_model.prepare_for_inference(with_lora)
    optimised.attention_impl = "sdpa"
    optimised.channels_last = True
    nets = {"plain": plain, "plain+LoRA": with_lora, "optimised": optimised}
    if compile_model:
        nets["compiled"] = torch.compile(copy.deepcopy(optimised))
    return {k: v.to(device).eval() for k, v in nets.items()}, source


def random_images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(size + batch))
    return model.normalize_image(image).to(device)


def time_encoders(nets: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int, device: torch.device,
                  amp_dtype: torch.dtype | None) -> dict[str, list[float]]:
    """Seconds per call of each net on `x`, interleaved, after one warm-up call each. Only the optimised
    variants run under autocast (`amp_dtype`); plain ones stay float32."""
    times: dict[str, list[float]] = {name: [] for name in nets}

    def call(name: str) -> None:
        amp = amp_dtype if name in ("optimised", "compiled") else None
        with nuclei_model.autocast(device, amp):
            nets[name](x)

    with torch.inference_mode():
        for name in nets:
            call(name)
        sync(device)
        for _ in range(repeats):
            for name in nets:
                start = time.perf_counter()
                call(name)
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def check_agreement(nets: dict[str, torch.nn.Module], size: int, device: torch.device) -> dict[str, float]:
    """Relative L2 of the optimised (and compiled) outputs against plain+LoRA, all in float32."""
    x = random_images(1, size, device)
    with torch.inference_mode():
        reference = nets["plain+LoRA"](x).float().cpu()
        return {f"rel_l2_{name}_vs_plain_lora": bench_encoder.rel_l2(nets[name](x).float().cpu(), reference)
                for name in ("optimised", "compiled") if name in nets}


def bench_encoder_sizes(sizes: Sequence[int], batches: Sequence[int], repeats: int, device: torch.device,
                        compile_model: bool = False) -> dict[str, Any]:
    """Per-image encoder times for every size and batch; best batch and speed-ups per size."""
    if device.type == "cuda":  # plain float32 must be true float32 (no TF32) for the 1e-4 check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    nets, source = encoder_variants(device, compile_model)
    amp_dtype = nuclei_model.autocast_dtype(device)
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size, "load_average": load_average(), **check_agreement(nets, size, device)}
        per_batch = {}
        for batch in batches:
            timed = nets if batch == 1 else {k: v for k, v in nets.items() if k != "plain+LoRA"}
            times = time_encoders(timed, random_images(batch, size, device), repeats, device, amp_dtype)
            per_batch[batch] = {name: summary(t, batch) for name, t in times.items()}
        row["per_batch"] = per_batch
        row["batch1"] = per_batch[1]
        for name in ("plain", "optimised"):
            best = min(per_batch, key=lambda b: per_batch[b][name]["median"])
            row[f"best_batch_{name}"] = {"batch": best, **per_batch[best][name]}
        row["speedup_batch1"] = row["batch1"]["plain"]["median"] / row["batch1"]["optimised"]["median"]
        row["speedup_batch1_min"] = row["batch1"]["plain"]["min"] / row["batch1"]["optimised"]["min"]
        row["speedup_best_batch"] = (row["best_batch_plain"]["median"] / row["best_batch_optimised"]["median"])
        row["speedup_best_batch_min"] = (row["best_batch_plain"]["min"] / row["best_batch_optimised"]["min"])
        row["lora_overhead_unmerged"] = row["batch1"]["plain+LoRA"]["median"] / row["batch1"]["plain"]["median"]
        if device.type == "cpu" and size == 1024:
            row["speedup_vs_official_1.4s"] = OFFICIAL_CPU_S_1024 / row["batch1"]["optimised"]["median"]
            row["speedup_vs_official_1.4s_min"] = OFFICIAL_CPU_S_1024 / row["batch1"]["optimised"]["min"]
        rows.append(row)
        print(f"encoder {size}: plain {row['batch1']['plain']['median']:.3f} s, optimised "
              f"{row['batch1']['optimised']['median']:.3f} s per image (batch 1, median)", file=sys.stderr)
    ok = all(v < 1e-4 for r in rows for k, v in r.items() if k.startswith("rel_l2"))
    return {"weights": source, "amp": str(amp_dtype) if amp_dtype else "float32", "batches": list(batches),
            "repeats": repeats, "rows": rows, "outputs_agree": ok}


# ----------------------------------------------------------------------------------------------
# 2. Training step (each case in its own process)
# ----------------------------------------------------------------------------------------------
def synthetic_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Synthetic H&E tiles with their foreground and HV targets at `size`."""
    rng = np.random.default_rng(0)
    images, fgs, hvs = [], [], []
    for i in range(batch):
        image, labels, _ = sample_data.render_tile(rng, min(size, 512), sample_data.ORGANS[i % len(sample_data.ORGANS)])
        labels = dataset.resize_labels(labels.astype(np.int32), size)
        images.append(dataset.resize_image(image, size).transpose(2, 0, 1))
        fgs.append(dataset.foreground_target(labels)[None])
        hvs.append(dataset.hv_targets(labels))
    return {"image": torch.from_numpy(np.stack(images)).to(device),
            "foreground": torch.from_numpy(np.stack(fgs).astype(np.float32)).to(device),
            "hv": torch.from_numpy(np.stack(hvs)).to(device)}


def train_step_case(case: str, size: int, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Time `steps` training steps (after one warm-up step) of LoRA-only (`case="lora"`) or full
    fine-tuning (`"full"`) and measure the peak memory they add (see the module docstring)."""
    utils.set_seed(0)
    config = {"input_size": size, "pretrained": None, "head": "hv", "lora_rank": LORA_RANK,
              "lora_alpha": float(LORA_RANK), "train_only_lora": case == "lora"}
    net = nuclei_model.build_model(config, pretrained=None).to(device).train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    data = synthetic_batch(batch, size, device)
    amp_dtype = nuclei_model.autocast_dtype(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with nuclei_model.autocast(device, amp_dtype):
            outputs = net(data["image"])
        loss, _ = nuclei_model.compute_loss(outputs, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    report = nuclei_model.parameter_report(net)
    return {"case": case, "size": size, "batch": batch, "steps": steps, "step_s": summary(times), "times_s": times,
            "peak_memory_mib": peak / 2**20, "trainable_parameters": report["trainable"],
            "total_parameters": report["total"], "amp": str(amp_dtype) if amp_dtype else "float32"}


def train_step_subprocess(case: str, size: int, batch: int, steps: int, device: torch.device,
                          threads: int) -> dict[str, Any]:
    """`train_step_case` in a fresh Python process (so peak-memory figures do not mix)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--train-case", case, "--device", str(device),
               "--threads", str(threads), "--train-size", str(size), "--train-batch", str(batch),
               "--repeats", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"training-step case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_training(size: int, batch: int, steps: int, device: torch.device, threads: int,
                   rounds: int = 2) -> dict[str, Any]:
    """Both cases, alternating for `rounds` rounds (so background load hits both alike); step times are
    pooled over the rounds, the peak memory is the largest of the rounds."""
    cases: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for case in ("lora", "full"):
            load = load_average()
            run = train_step_subprocess(case, size, batch, steps, device, threads)
            if case in cases:
                run["times_s"] = cases[case]["times_s"] + run["times_s"]
                run["peak_memory_mib"] = max(run["peak_memory_mib"], cases[case]["peak_memory_mib"])
                load = max(load or 0.0, cases[case]["load_average"] or 0.0)
            cases[case] = {**run, "step_s": summary(run["times_s"]), "steps": len(run["times_s"]),
                           "load_average": load}
            print(f"training step {case}: {cases[case]['step_s']['median']:.3f} s, peak "
                  f"{cases[case]['peak_memory_mib']:.0f} MiB", file=sys.stderr)
    memory = ("torch.cuda.max_memory_allocated minus the allocation after model build" if device.type == "cuda"
              else "growth of ru_maxrss (peak resident set) over its value after model and batch build, "
                   "fresh process per case")
    return {"size": size, "batch": batch, "steps": cases["lora"]["steps"], "memory_method": memory, "cases": cases,
            "full_over_lora_time": cases["full"]["step_s"]["median"] / cases["lora"]["step_s"]["median"],
            "full_over_lora_memory": cases["full"]["peak_memory_mib"] / max(cases["lora"]["peak_memory_mib"], 1e-9)}


# ----------------------------------------------------------------------------------------------
# 3. End-to-end prediction
# ----------------------------------------------------------------------------------------------
def oracle_maps(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect network would output for a tile: foreground and HV maps of its ground truth."""
    return dataset.foreground_target(labels).astype(np.float32), dataset.hv_targets(labels)


def make_tiles(folder: Path, count: int, tile: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write `count` synthetic H&E PNG tiles; returns {sha1 of the tile's pixels: oracle maps}."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    maps = {}
    for i in range(count):
        image, labels, _ = sample_data.render_tile(rng, tile, sample_data.ORGANS[i % len(sample_data.ORGANS)])
        Image.fromarray(image).save(folder / f"tile_{i:03d}.png")
        maps[hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()] = oracle_maps(labels.astype(np.int32))
    return maps


def bench_prediction(input_size: int, num_tiles: int, batch_size: int, num_workers: int,
                     device: torch.device, tile: int = 512) -> dict[str, Any]:
    """Tiles per second of `predict.segment_images`, sequential versus post-processing in worker processes."""
    config = {"input_size": input_size, "pretrained": None, "head": "hv", "lora_rank": LORA_RANK,
              "lora_alpha": float(LORA_RANK)}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None).to(device)
    pp = postprocess.PostprocessConfig().to_dict()
    model_set = nuclei_model.ModelSet([nuclei_model.Member(None, net, Path("random"))], config, pp, False, ROOT)
    network = inference.model_maps_fn(model_set, device=device)
    network_seconds: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        truth = make_tiles(tmp / "in", num_tiles, tile)

        def maps_fn(tiles: list) -> list:
            start = time.perf_counter()
            network(tiles)
            sync(device)
            network_seconds.append(time.perf_counter() - start)
            return [truth[hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest()] for t in tiles]

        inputs = sorted((tmp / "in").glob("*.png"))
        names = predict.output_stems(inputs)
        maps_fn([predict.read_image(inputs[0])])  # warm-up
        results = {}
        for mode, workers in (("sequential", 0), ("overlapped", num_workers)):
            network_seconds.clear()
            load = load_average()
            start = time.perf_counter()
            options = predict.PredictOptions(model_path=str(ROOT), tile_size=tile, overlap=0, batch_size=batch_size,
                                             num_workers=workers, device=str(device))
            predictor = inference.load_predictor(options, maps_fn=maps_fn, model_set=model_set)
            outcomes = predict.segment_images(predictor, inputs, names, tmp / mode, options)
            wall = time.perf_counter() - start
            failed = [o.error for o in outcomes if o.status != "ok"]
            if failed:
                raise RuntimeError(f"prediction failed: {failed[0]}")
            results[mode] = {"num_workers": workers, "seconds": wall, "tiles_per_s": num_tiles / wall,
                             "network_s_per_tile": sum(network_seconds) / num_tiles,
                             "nuclei_per_tile": statistics.mean(o.nuclei for o in outcomes), "load_average": load}
            print(f"prediction {mode}: {num_tiles / wall:.2f} tiles/s", file=sys.stderr)
        identical = all(np.array_equal(tifffile.imread(tmp / "sequential" / f"{n}_labels.tif"),
                                       tifffile.imread(tmp / "overlapped" / f"{n}_labels.tif")) for n in names)
    seq = results["sequential"]
    seq["post_and_write_s_per_tile"] = seq["seconds"] / num_tiles - seq["network_s_per_tile"]
    return {"input_size": input_size, "tile": tile, "tiles": num_tiles, "batch_size": batch_size, **results,
            "speedup": results["overlapped"]["tiles_per_s"] / seq["tiles_per_s"], "identical_labels": identical}


# ----------------------------------------------------------------------------------------------
# 4. Metrics and post-processing per tile
# ----------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[int], Any], repeats: int) -> float:
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_per_tile(repeats: int, size: int = 512, nuclei: int = 150) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tiles = [bench_metrics.synthetic_tile(rng, size, nuclei) for _ in range(3)]
    maps = [oracle_maps(true) for true, _ in tiles]
    config = postprocess.PostprocessConfig()
    load = load_average()
    metrics_ms = median_ms(lambda r: metrics.instance_metrics(*tiles[r % 3]), repeats)
    post_ms = median_ms(lambda r: postprocess.postprocess(*maps[r % 3], config), repeats)
    found = postprocess.postprocess(*maps[0], config)
    return {"size": size, "nuclei": int(len(np.unique(tiles[0][0])) - 1), "found_by_postprocess": int(found.max()),
            "repeats": repeats, "metrics_ms": metrics_ms, "postprocess_ms": post_ms, "load_average": load}


# ----------------------------------------------------------------------------------------------
# 5. Network: encoder vs head vs whole
# ----------------------------------------------------------------------------------------------
def bench_network(sizes: Sequence[int], repeats: int, device: torch.device, threads: int,
                  head: str = "hv") -> dict[str, Any]:
    """Seconds of encoder features, head and whole network per image (batch 1) at each size, interleaved."""
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = nuclei_model.prepare_for_inference(nuclei_model.build_model({"pretrained": None, "head": head}))
        net = net.to(device)
        amp_dtype = nuclei_model.autocast_dtype(device)
        rows = []
        for size in sizes:
            raw = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(size)).to(device)
            load = load_average()
            with torch.inference_mode(), nuclei_model.autocast(device, amp_dtype):
                image = model.normalize_image(raw)
                feats = net.encoder.forward_features(image)
                calls = {"encoder": lambda: net.encoder.forward_features(image),
                         "head": lambda: net.head(image, feats), "whole": lambda: net(raw)}
                times: dict[str, list[float]] = {name: [] for name in calls}
                for fn in calls.values():  # warm-up
                    fn()
                sync(device)
                for _ in range(repeats):
                    for name, fn in calls.items():
                        start = time.perf_counter()
                        fn()
                        sync(device)
                        times[name].append(time.perf_counter() - start)
            row = {"size": size, "load_average": load, **{name: summary(t) for name, t in times.items()}}
            row["head_over_encoder"] = row["head"]["median"] / row["encoder"]["median"]
            rows.append(row)
            print(f"network {size}: encoder {row['encoder']['median']:.3f} s, head {row['head']['median']:.3f} s "
                  f"({row['head_over_encoder']:.2f}x), whole {row['whole']['median']:.3f} s", file=sys.stderr)
    finally:
        torch.set_num_threads(previous_threads)
    return {"head": head, "head_parameters": nuclei_model.head_parameter_count(net),
            "threads": threads if device.type == "cpu" else None,
            "amp": str(amp_dtype) if amp_dtype else "float32", "repeats": repeats, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def measured(section: dict[str, Any]) -> str:
    return f", {section['measured']}" if "measured" in section else ""


def markdown_section(results: dict[str, Any]) -> str:
    m = results["machine"]
    name = m.get("gpu") or m["cpu"]
    lines = [f"Machine: **{name}** ({m['device']}, {m['threads']} torch threads, {m['cpu_count']} CPUs), "
             f"torch {m['torch']}, Python {m['python']}. Last command: `{results['command']}` ({m['date']}); "
             f"each section gives the date it was measured.", ""]
    enc = results.get("encoder")
    if enc:
        lines += [f"**Encoder**{measured(enc)} (seconds per image and speed-ups, median / min of {enc['repeats']} "
                  f"runs; weights: "
                  f"{enc['weights']}; optimised path in {enc['amp']}; outputs agree: "
                  f"{'yes' if enc['outputs_agree'] else 'NO'})", "",
                  "| size | batch | plain | plain + LoRA (unmerged) | optimised | speed-up | "
                  "rel. L2 optimised vs plain+LoRA | load |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in enc["rows"]:
            b1 = r["batch1"]
            fmt = lambda t: f"{t['median']:.3f} / {t['min']:.3f}"  # noqa: E731
            lines.append(f"| {r['size']} | 1 | {fmt(b1['plain'])} | {fmt(b1['plain+LoRA'])} | "
                         f"{fmt(b1['optimised'])} | {r['speedup_batch1']:.2f}x / {r['speedup_batch1_min']:.2f}x | "
                         f"{r['rel_l2_optimised_vs_plain_lora']:.1e} | {r['load_average']} |")
            bp, bo = r["best_batch_plain"], r["best_batch_optimised"]
            lines.append(f"| {r['size']} | best ({bp['batch']} / {bo['batch']}) | {fmt(bp)} | - | {fmt(bo)} | "
                         f"{r['speedup_best_batch']:.2f}x / {r['speedup_best_batch_min']:.2f}x | | |")
            if "compiled" in b1:
                lines.append(f"| {r['size']} | 1 | torch.compile: {fmt(b1['compiled'])} | | | | "
                             f"{r.get('rel_l2_compiled_vs_plain_lora', float('nan')):.1e} | |")
        for r in enc["rows"]:
            if "speedup_vs_official_1.4s" in r:
                lines += ["", f"At 1024, batch 1: optimised {r['batch1']['optimised']['median']:.3f} s (median) / "
                          f"{r['batch1']['optimised']['min']:.3f} s (min) per image versus {OFFICIAL_CPU_S_1024} s "
                          f"for the official MobileSAM encoder on this CPU (float32, 2 threads): "
                          f"**{r['speedup_vs_official_1.4s']:.2f}x / {r['speedup_vs_official_1.4s_min']:.2f}x**. "
                          f"Unmerged LoRA costs {100 * (r['lora_overhead_unmerged'] - 1):+.0f}% over plain "
                          f"(medians)."]
        lines.append("")
    tr = results.get("training")
    if tr:
        lines += [f"**Training step**{measured(tr)} (input {tr['size']}, batch {tr['batch']}, median / min of "
                  f"{tr['steps']} steps pooled over alternating runs, each after a warm-up; "
                  f"peak memory: {tr['memory_method']})", "",
                  "| fine-tuning | trainable parameters | step s | peak memory MiB | load |",
                  "| --- | --- | --- | --- | --- |"]
        for case, label in (("lora", "LoRA (rank 4, qkv+proj) + head"), ("full", "full (all parameters)")):
            c = tr["cases"][case]
            lines.append(f"| {label} | {c['trainable_parameters']:,} of {c['total_parameters']:,} | "
                         f"{c['step_s']['median']:.3f} / {c['step_s']['min']:.3f} | {c['peak_memory_mib']:.0f} | "
                         f"{c['load_average']} |")
        lines += ["", f"Full fine-tuning / LoRA: {tr['full_over_lora_time']:.2f}x the time, "
                  f"{tr['full_over_lora_memory']:.2f}x the memory.", ""]
    pr = results.get("prediction")
    if pr:
        seq, ovl = pr["sequential"], pr["overlapped"]
        lines += [f"**End-to-end prediction**{measured(pr)} ({pr['tiles']} synthetic {pr['tile']}x{pr['tile']} "
                  f"tiles at model "
                  f"input size {pr['input_size']}, batch {pr['batch_size']}, about {seq['nuclei_per_tile']:.0f} "
                  f"nuclei per tile; read + network + post-processing + TIFF/GeoJSON/CSV/overlay)", "",
                  "| mode | tiles/s | load |", "| --- | --- | --- |",
                  f"| sequential (`--num_workers 0`) | {seq['tiles_per_s']:.2f} | {seq['load_average']} |",
                  f"| overlapped (`--num_workers {ovl['num_workers']}`) | {ovl['tiles_per_s']:.2f} | "
                  f"{ovl['load_average']} |", "",
                  f"Sequential, per tile: network {seq['network_s_per_tile']:.3f} s, everything else (reading, "
                  f"post-processing, writing) {seq['post_and_write_s_per_tile']:.3f} s. Overlapped / sequential: "
                  f"{pr['speedup']:.2f}x; identical label maps: {'yes' if pr['identical_labels'] else 'NO'}.", ""]
    pt = results.get("per_tile")
    if pt:
        lines += [f"**Per tile**{measured(pt)} ({pt['size']}x{pt['size']}, {pt['nuclei']} nuclei, median of "
                  f"{pt['repeats']}): "
                  f"`metrics.instance_metrics` {pt['metrics_ms']:.1f} ms, `postprocess.postprocess` "
                  f"{pt['postprocess_ms']:.1f} ms ({pt['found_by_postprocess']} instances found). "
                  f"Load average {pt['load_average']}.", ""]
    nw = results.get("network")
    if nw:
        threads = f"{nw['threads']} torch thread{'s' if nw['threads'] != 1 else ''}, " if nw["threads"] else ""
        lines += [f"**Network: encoder vs head**{measured(nw)} (seconds per image, batch 1, median / min of "
                  f"{nw['repeats']} interleaved runs; `prepare_for_inference`, {threads}{nw['amp']}; "
                  f"`{nw['head']}` head, {nw['head_parameters']:,} parameters)", "",
                  "| size | encoder features | head | whole network | head / encoder | load |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in nw["rows"]:
            fmt = lambda t: f"{t['median']:.3f} / {t['min']:.3f}"  # noqa: E731
            lines.append(f"| {r['size']} | {fmt(r['encoder'])} | {fmt(r['head'])} | {fmt(r['whole'])} | "
                         f"{r['head_over_encoder']:.2f}x | {r['load_average']} |")
        lines.append("")
    return "\n".join(lines)


def update_json(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Store `results` under its device type ("cpu" / "cuda"), keeping the other device's figures and, for a
    run with `--skip`, the skipped sections of the previous run on the same machine. Returns the entry."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    device = results["machine"]["device"]
    previous = data.get(device, {})
    same_machine = previous.get("machine", {}).get("cpu") == results["machine"]["cpu"] and \
        previous.get("machine", {}).get("gpu") == results["machine"].get("gpu")
    data[device] = {**(previous if same_machine else {}), **results}
    utils.write_json(path, data)
    return data[device]


def update_markdown(path: Path, device: str, section: str) -> None:
    """Replace the text between this device's markers (added at the end when missing)."""
    begin, end = MARK.format(device=device, edge="begin"), MARK.format(device=device, edge="end")
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    utils.atomic_write_text(path, f"{head}{begin}\n{section.strip()}\n{end}{tail}")


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--sizes", default=None, help="encoder input sizes (default 512,1024; --quick: 512)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; --quick: 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json",
                        help="JSON results (the entry of this device type is replaced)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="Markdown report (the section of this device type is replaced)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the optimised encoder")
    parser.add_argument("--tiles", type=int, default=None, help="tiles for the end-to-end run (default 12; --quick: 4)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="post-processing workers in the overlapped run (default: predict's default)")
    parser.add_argument("--skip", default="",
                        help="sections to leave out: encoder,training,prediction,per_tile,network")
    parser.add_argument("--network-threads", type=int, default=1,
                        help="torch threads of the encoder-vs-head section on CPU (default 1)")
    parser.add_argument("--train-case", choices=("lora", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, default=None, help="training-step input size "
                        "(default 1024 on CUDA, 512 on CPU; --quick: 256)")
    parser.add_argument("--train-batch", type=int, default=None, help="training-step batch (default 8 on CUDA, "
                        "2 on CPU; --quick: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = utils.select_device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (1 if args.quick else 3)
    train_size = args.train_size or (256 if args.quick else 1024 if cuda else 512)
    train_batch = args.train_batch or (1 if args.quick else 8 if cuda else 2)
    if args.train_case:  # a child process of bench_training
        print(json.dumps(train_step_case(args.train_case, train_size, train_batch, repeats, device)))
        return 0

    sizes = utils.parse_list(args.sizes or ("512" if args.quick else "512,1024"), int, "--sizes")
    if any(s % 64 for s in sizes):
        parser.error("--sizes: every size must be a multiple of 64")
    batches = [1] if args.quick else ([1, 2, 4, 8] if cuda else [1, 2])
    skip = set(utils.parse_list(args.skip, str, "--skip"))
    input_size = 1024 if cuda and not args.quick else 512
    num_workers = args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1)

    results: dict[str, Any] = {"command": " ".join(["python", "bench/benchmark.py", *sys.argv[1:]]),
                               "machine": machine_info(device, args.threads)}
    if "encoder" not in skip:
        results["encoder"] = bench_encoder_sizes(sizes, batches, repeats, device, args.compile)
    if "training" not in skip:
        results["training"] = bench_training(train_size, train_batch, repeats, device, args.threads,
                                             rounds=1 if args.quick else 2)
    if "prediction" not in skip:
        results["prediction"] = bench_prediction(input_size, args.tiles or (4 if args.quick else 12),
                                                 8 if cuda else 1, num_workers, device)
    if "per_tile" not in skip:
        results["per_tile"] = bench_per_tile(5 if args.quick else 30)
    if "network" not in skip:
        results["network"] = bench_network(sizes, repeats, device, args.network_threads)
    for name in ("encoder", "training", "prediction", "per_tile", "network"):
        if name in results:
            results[name]["measured"] = results["machine"]["date"]

    section = markdown_section(update_json(args.out, results))
    update_markdown(args.markdown, device.type, section)
    print(section)
    ok = results.get("encoder", {}).get("outputs_agree", True) and \
        results.get("prediction", {}).get("identical_labels", True)
    if not ok:
        print("error: optimised and plain encoder outputs disagree, or the overlapped prediction differs",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
