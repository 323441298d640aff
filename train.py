"""`train` command: fine-tune MobileSAM (LoRA) + a nuclei decoder head on NuInsSeg.

One split (fold 0 of the K-fold split, or `--fold k`) or, with `--cross_validation`, all K folds of the
NuInsSeg paper's protocol (scikit-learn KFold, shuffle, seed 19, over the sorted image list). Each fold's
training part gives up a tissue-stratified validation subset (`--val_fraction`) used for model selection and
early stopping; the test fold is only scored, once, with the selected model.

Optimiser AdamW over the trainable parameters, linear warm-up then cosine decay per step, gradient clipping,
mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported). Under
`torchrun --nproc_per_node N main.py train ...` it trains with DistributedDataParallel; `--batch_size` is
the global batch (each process takes batch_size / N). See docs/training.md.
"""
from __future__ import annotations

import argparse
from collections import Counter
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import dataset
import metrics
import nuclei_model
import postprocess
import utils
from utils import UserError

log = logging.getLogger(__name__)

BEST = "best_model.pth"
LAST = "last_model.pth"
RESULT = "result.json"
HISTORY = "history.csv"
MONITOR_CHOICES = ("pq", "aji", "aji_plus", "dice", "iou", "sq", "rq", "f1", "loss")
# keys of a config that may change when a run is resumed (they do not change what is trained)
RUNTIME_KEYS = ("resume", "output_dir", "data_dir", "device", "num_workers", "compile")
# --tune_postprocess grid, relative to the model's default thresholds: fg_threshold + offset, marker_threshold x factor
TUNE_FG_OFFSETS = (-0.1, 0.0, 0.1)
TUNE_MARKER_FACTORS = (0.5, 1.0, 2.0)
LORA_RANK_RULE = "must be 0 (no LoRA) or a positive integer"  # parameter_search's --lora_ranks says the same
MAX_INPUT_SIZE = 4096


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and output")
    g.add_argument("--data_dir", required=True, help="dataset folder: NuInsSeg layout (<organ>/tissue images, label masks modify) or the "
                        "folders layout (images/, labels/; see --data_format)")
    dataset.add_data_format_argument(g)
    g.add_argument("--output_dir", default="output", help="folder for checkpoints, history and summaries")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir (files replaced)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output_dir with the configuration saved there")
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained", default="weights/mobile_sam.pt",
                   help="official MobileSAM checkpoint; 'none' = random encoder (for tests only)")
    g.add_argument("--input_size", type=int, default=1024, help="network input size (multiple of 64)")
    g.add_argument("--head", choices=nuclei_model.HEADS, default="hv",
                   help="hv: foreground + HoVer-Net maps (instances); binary: foreground only (baseline); "
                        "sam: MobileSAM's own mask decoder, promptless, instances by distance-transform watershed")
    g.add_argument("--lora_rank", type=int, default=4, help="LoRA rank (0 = no LoRA)")
    g.add_argument("--lora_alpha", type=float, default=4.0, help="LoRA scaling numerator (scale = alpha/rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora_targets", default="qkv,proj",
                   help="comma-separated Linear layers to adapt: qkv, proj, fc1, fc2")
    g.add_argument("--train_only_lora", action="store_true",
                   help="train only LoRA adapters and the head (encoder frozen); otherwise fine-tune everything")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=4, help="global batch size (split over DDP processes)")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak AdamW learning rate")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--epochs", type=int, default=50, help="maximum number of epochs per fold")
    g.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warm-up length (epochs, fractional ok)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA, PyTorch 2)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes (augmentation and targets at 1024 px take ~90 ms per image; "
                        "default: min(8, usable cores) on a GPU, 0 on the CPU, where workers would take cores "
                        "from the network)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    g = parser.add_argument_group("model selection and folds")
    g.add_argument("--early_stopping", action="store_true", help="stop a fold when --monitor stops improving")
    g.add_argument("--patience", type=int, default=15, help="epochs without improvement before stopping")
    g.add_argument("--monitor", choices=MONITOR_CHOICES, default="pq",
                   help="validation metric for model selection (loss: lower is better, others higher)")
    g.add_argument("--cross_validation", action="store_true", help="train and test every fold")
    g.add_argument("--num_folds", type=int, default=5, help="number of folds (paper: 5)")
    g.add_argument("--fold", type=int, default=None, help="without --cross_validation: the fold to run (default 0)")
    g.add_argument("--fold_seed", type=int, default=19, help="seed of the K-fold split (paper: 19)")
    g.add_argument("--val_fraction", type=float, default=0.1,
                   help="fraction of each fold's training images used for validation (stratified by tissue)")
    g.add_argument("--mpp", type=float, default=None,
                   help="the model's pixel size in microns, recorded with the model; images whose dataset.json "
                        "gives another mpp are rescaled to it (default: the data's: the folders layout's dataset.json "
                        "mpp, the value make_sample_data recorded for its data, else NuInsSeg's 0.25)")
    g.add_argument("--tile_size", type=int, default=None,
                   help="source pixels (at the model's pixel size) the network sees per input; images of another "
                        "size are trained on random windows of this size (default: the image side when all images "
                        "are the same square, NuInsSeg 512, else the smallest image side)")
    g.add_argument("--tune_postprocess", action="store_true",
                   help="after training, pick fg_threshold/marker_threshold on the validation set (small grid)")
    add_fine_tuning_arguments(parser)
    dataset.add_augmentation_arguments(parser)


def add_fine_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """`--init_model` and `--all_data` (the correction loop: docs/correction_loop.md)."""
    g = parser.add_argument_group("fine-tuning a trained model")
    g.add_argument("--init_model", default=None, metavar="MODEL.pth",
                   help="start from this trained model (one checkpoint, e.g. best_model.pth of a single-split run or "
                        "fold_<k>/best_model.pth): its LoRA, head, post-processing, input size, pixel size and tile "
                        "size are kept (a conflicting flag is an error); its base weights are checked by SHA-1")
    g.add_argument("--all_data", action="store_true",
                   help="no test fold: train on every image except the validation subset (--val_fraction; 0 = none, "
                        "then the last of --epochs is kept); the summary says that no held-out score exists")
    # which of the kept options the command line gives (a flag given at its default value counts as given)
    parser.set_defaults(given_options=())
    for action in parser._actions:
        if action.dest in INIT_KEPT + INIT_INHERITED + ("pretrained",):
            action.__class__ = _given_tracking(type(action))


def _given_tracking(action_class: type) -> type:
    """A subclass of an argparse action class that also records its `dest` in `namespace.given_options`."""
    def __call__(self, parser, namespace, values, option_string=None):
        action_class.__call__(self, parser, namespace, values, option_string)
        namespace.given_options = tuple(getattr(namespace, "given_options", ())) + (self.dest,)

    return type(f"Given{action_class.__name__}", (action_class,), {"__call__": __call__})


def default_postprocess(head: str) -> dict[str, Any]:
    """The post-processing defaults stored with a model of this head."""
    mode = "hv" if head == "hv" else "binary"
    # sam: the published MobileSAM + LoRA design separates touching nuclei by a distance-transform watershed
    return postprocess.PostprocessConfig(mode=mode, watershed=head == "sam").to_dict()


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """JSON-able training configuration (keys = option names)."""
    pretrained = None if nuclei_model.is_no_weights(args.pretrained) else args.pretrained
    return {
        "data_dir": absolute_path(args.data_dir),  # evaluate/demo find the data from any folder
        "output_dir": str(args.output_dir),
        "pretrained": None if pretrained is None else str(pretrained),
        "input_size": int(args.input_size),
        "head": args.head,
        "lora_rank": int(args.lora_rank),
        "lora_alpha": float(args.lora_alpha),
        "lora_dropout": float(args.lora_dropout),
        "lora_targets": utils.parse_list(args.lora_targets, str, "--lora_targets"),
        "train_only_lora": bool(args.train_only_lora),
        "batch_size": int(args.batch_size),
        "learning_rate": float(args.learning_rate),
        "weight_decay": float(args.weight_decay),
        "epochs": int(args.epochs),
        "warmup_epochs": float(args.warmup_epochs),
        "early_stopping": bool(args.early_stopping),
        "patience": int(args.patience),
        "monitor": args.monitor,
        "cross_validation": bool(args.cross_validation),
        "num_folds": int(args.num_folds),
        "fold": None if args.fold is None else int(args.fold),
        "fold_seed": int(args.fold_seed),
        "val_fraction": float(args.val_fraction),
        "seed": int(args.seed),
        "num_workers": default_num_workers(args.device) if args.num_workers is None else int(args.num_workers),
        "device": args.device,
        "amp": bool(args.amp),
        "grad_clip": float(args.grad_clip),
        "compile": bool(args.compile),
        "mpp": data_mpp(args.data_dir, getattr(args, "data_format", "auto")) if args.mpp is None else float(args.mpp),
        "data_format": getattr(args, "data_format", "auto"),
        "tile_size": getattr(args, "tile_size", None),
        "augmentation": dataset.augment_config_from_args(args).to_dict(),
        "postprocess": default_postprocess(args.head),
        "tune_postprocess": bool(getattr(args, "tune_postprocess", False)),
        "resume": bool(args.resume),
        "init_model": None if getattr(args, "init_model", None) is None else str(args.init_model),
        "all_data": bool(getattr(args, "all_data", False)),
    }


def absolute_path(path: str | os.PathLike | None) -> str:
    """The absolute form of `path` (symbolic links kept), '' for none."""
    return os.path.abspath(os.path.expanduser(str(path))) if path not in (None, "") else ""


def default_num_workers(device_name: str | None) -> int:
    """DataLoader workers when --num_workers is not given: none on the CPU (the images are decoded once and
    kept in memory; workers would compete with the network for the same cores: an epoch beside another job
    took about twice as long with them, docs/benchmarks.md), min(8, usable cores) on a GPU."""
    if str(os.environ.get("WORLD_SIZE", "1")) != "1" and device_name in (None, "", "auto"):
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    return 0 if utils.select_device(device_name).type == "cpu" else min(8, utils.usable_cores())


def data_mpp(data_dir: str | os.PathLike, data_format: str = "auto") -> float:
    """Pixel size of the training data when --mpp is not given: the folders layout's dataset.json mpp, what
    make_sample_data recorded for its synthetic tiles (0.5 um/px at 256 px), else NuInsSeg's."""
    import sample_data

    recorded = dataset.dataset_mpp(data_dir, data_format) if data_dir else None
    if recorded is None and data_dir:
        recorded = sample_data.recorded_mpp(data_dir)
    return float(dataset.NUINSSEG_MPP) if recorded is None else recorded


def validate_config(config: Mapping[str, Any]) -> None:
    dataset.check_input_size(config["input_size"])
    checks = [
        (config["lora_rank"] >= 0, "--lora_rank", LORA_RANK_RULE),
        (config["lora_alpha"] > 0, "--lora_alpha", "must be positive"),
        (0.0 <= config["lora_dropout"] < 1.0, "--lora_dropout", "must be in [0, 1)"),
        (config["batch_size"] >= 1, "--batch_size", "must be at least 1"),
        (config["learning_rate"] > 0, "--learning_rate", "must be positive"),
        (config["weight_decay"] >= 0, "--weight_decay", "must be 0 or more"),
        (config["epochs"] >= 1, "--epochs", "must be at least 1"),
        (config["warmup_epochs"] >= 0, "--warmup_epochs", "must be 0 or more"),
        (config["patience"] >= 1, "--patience", "must be at least 1"),
        (config["num_folds"] >= 2, "--num_folds", "must be at least 2"),
        (config["grad_clip"] >= 0, "--grad_clip", "must be 0 (off) or positive"),
        (config["num_workers"] >= 0, "--num_workers", "must be 0 or more"),
        (config["seed"] >= 0, "--seed", "must be 0 or more"),
        (config["mpp"] > 0, "--mpp", "must be a positive number of micrometres per pixel"),
        (utils.MIN_MPP <= config["mpp"] <= utils.MAX_MPP, "--mpp",
         f"must be between {utils.MIN_MPP:g} and {utils.MAX_MPP:g} micrometres per pixel (brightfield scans: "
         f"about 0.1-2)"),
        (config["input_size"] <= MAX_INPUT_SIZE, "--input_size",
         f"must be at most {MAX_INPUT_SIZE} (MobileSAM works at 1024; memory grows with the square of the size)"),
        (config["batch_size"] <= utils.MAX_BATCH_SIZE, "--batch_size", f"must be at most {utils.MAX_BATCH_SIZE}"),
        (config["num_workers"] <= utils.MAX_WORKERS, "--num_workers", f"must be at most {utils.MAX_WORKERS}"),
        (config["fold_seed"] >= 0, "--fold_seed", "must be 0 or more"),
        (config["monitor"] in MONITOR_CHOICES, "--monitor", f"must be one of {', '.join(MONITOR_CHOICES)}"),
    ]
    for ok, option, problem in checks:
        if not ok:
            raise UserError(f"{option} {config[option[2:]]}: {problem}")
    if config.get("tile_size") is not None and int(config["tile_size"]) < 16:
        raise UserError(f"--tile_size {config['tile_size']}: must be at least 16 pixels")
    if config.get("tile_size") is not None:
        utils.check_at_most("--tile_size", int(config["tile_size"]), utils.MAX_TILE_SIZE,
                            "pixels of one window, which is resized to --input_size for the network")
    if config["fold"] is not None and not 0 <= config["fold"] < config["num_folds"]:
        raise UserError(f"--fold {config['fold']}: must be between 0 and {config['num_folds'] - 1}")
    unknown = [t for t in config["lora_targets"] if t not in ("qkv", "proj", "fc1", "fc2")]
    if unknown or not config["lora_targets"]:
        raise UserError(f"--lora_targets {','.join(config['lora_targets'])}: choose from qkv, proj, fc1, fc2")
    postprocess.PostprocessConfig.from_dict(config["postprocess"]).validate()


def _is_empty_dir(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def default_config(data_dir: str) -> dict[str, Any]:
    """The configuration `train` builds when only --data_dir is given (every other option at its default)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--data_dir", str(data_dir)]))


def resume_config(output_dir: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration saved in `output_dir/config.json`, with the runtime keys taken from `given`.

    An option given on the command line (i.e. not at its default) that differs from the saved run is an
    error: a resumed run always continues with its saved settings, and silently ignoring e.g. a new
    --epochs would mislead."""
    path = output_dir / "config.json"
    if not path.is_file():
        raise UserError(f"--resume: {path} not found (nothing to resume in {output_dir})")
    saved = utils.read_json(path)
    if not isinstance(saved, dict) or "data_dir" not in saved:
        raise UserError(f"{path}: not a training configuration")
    defaults = default_config(given["data_dir"])
    changed = [f"--{k} {given[k]} (saved: {saved[k]})" for k in sorted(given)
               if k not in RUNTIME_KEYS and k in saved and k in defaults
               and given[k] != defaults[k] and given[k] != saved[k]]
    if changed:
        raise UserError(f"--resume: {', '.join(changed)} differ from the run saved in {path}; a resumed run "
                        f"keeps its saved settings: drop these options, or start a new run in another folder")
    config = {k: v for k, v in saved.items() if k not in ("environment", "world_size", "parameters")}
    for key in RUNTIME_KEYS:
        config[key] = given[key]
    config["resume"] = True
    return config


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: choose one (--resume continues the run in --output_dir, "
                        "--overwrite starts a new run over it)")
    config = config_from_args(args)
    if config.get("init_model") and not config["resume"]:
        config = apply_init_model(config, args)
    output_dir = Path(config["output_dir"])
    info = setup_distributed(config["device"])
    try:
        configure_threads(args, config)
        if not info.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if config["resume"]:
            config = resume_config(output_dir, config)
            log.info("resuming the run in %s (configuration from its config.json)", output_dir)
        elif output_dir.exists() and not output_dir.is_dir():
            raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
        elif not _is_empty_dir(output_dir) and not args.overwrite:
            raise UserError(f"--output_dir {output_dir}: folder exists and is not empty; use --resume to "
                            f"continue that run, --overwrite to write over it, or choose another folder")
        barrier(info)  # every process checked the folder before the first one writes into it
        run_training(config, output_dir)
    finally:
        info.shutdown()
    return 0


def configure_threads(args: argparse.Namespace, config: Mapping[str, Any]) -> int:
    """CPU threads of this process: the usable cores shared among the training processes of this machine
    (torchrun's LOCAL_WORLD_SIZE) and their DataLoader workers, unless --threads / OMP_NUM_THREADS say."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    workers = local_processes * (1 + max(0, int(config["num_workers"]))) - 1
    return utils.configure_threads(getattr(args, "threads", None), workers=workers)


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_name: str | None) -> DistInfo:
    """Single process, or one process of a `torchrun` job (WORLD_SIZE/RANK/LOCAL_RANK in the environment):
    joins the process group (NCCL on CUDA, gloo on CPU) and picks this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(1, 0, 0, utils.select_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = process_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_world_size(), dist.get_rank(), local_rank, device, owns)


def process_device(device_name: str | None, local_rank: int) -> torch.device:
    """The device of the process with this LOCAL_RANK in a torchrun job: `cuda:LOCAL_RANK` for CUDA (also when
    `--device cuda:N` names one GPU: NCCL refuses two processes on one GPU), else the named device (gloo)."""
    if device_name in (None, "", "auto"):
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = utils.select_device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != local_rank:
        log.warning("--device %s ignored under torchrun: process %d uses cuda:%d (one GPU per process)",
                    device_name, local_rank, local_rank)
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"torchrun: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                        f"are visible; use --nproc_per_node {torch.cuda.device_count()} or fewer")
    return torch.device(f"cuda:{local_rank}")


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_version": int(py[0]),
        "python_gauss": py[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def better(monitor: str, value: float, best: float | None) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best


def _fmt(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _mean_sd(rows: Sequence[Mapping[str, Any]] | None, names: Sequence[str]
             ) -> tuple[dict[str, float], dict[str, float]]:
    means, sds = {}, {}
    for name in names:
        values = [r[name] for r in rows or [] if r is not None and r.get(name) is not None]
        if values:
            means[name], sds[name] = metrics.mean_sd(values)
    return means, sds


def copy_file_atomic(src: Path, dst: Path) -> None:
    utils.atomic_write_bytes(dst, src.read_bytes())


# ----------------------------------------------------------------------------------------------
# Evaluation of a set of images (validation or test), split across processes
# ----------------------------------------------------------------------------------------------
class ImageSet:
    """Images of one split at network size (inputs/targets) and at original size (labels, ambiguous masks)."""

    def __init__(self, samples: Sequence[dataset.Sample], input_size: int,
                 config: Mapping[str, Any] | None = None) -> None:
        self.samples = list(samples)
        # images of another size than the model's tile: scored whole through predict's tiled engine
        self.whole = bool(config and config.get("windows"))
        self.config = dict(config or {})
        if self.whole:  # the loss is taken on one centred window per image
            self.data = dataset.WindowDataset(self.samples, input_size, self.config["tile_size"],
                                              data_scale(self.config), random_windows=False, blank_image=False)
        else:  # scored on the image as it is (as evaluate does); the loss leaves ignored pixels out
            self.data = dataset.NucleiDataset(self.samples, input_size, augment=None, blank_image=False)
        self.truth: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.images: list[np.ndarray] = []
        for s in self.samples:
            image, labels, vague = dataset.load_sample(s)
            self.truth.append((labels, vague))
            if self.whole:
                self.images.append(image)

    def whole_maps(self, net: nn.Module, index: int, device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
        """Network maps of a whole image through `inference.image_maps` (tiles of the model's tile size at the
        model's pixel size; maps at that pixel size)."""
        import inference

        model_set = nuclei_model.ModelSet([], self.config, {}, False, Path("."))

        def maps_fn(tiles: list) -> list:
            return nuclei_model.predict_maps_batch([net], tiles, self.config["input_size"], device,
                                                   amp=self.config.get("amp", True))

        fg, hv, _ = inference.image_maps(model_set, self.images[index], mpp=self.config.get("data_mpp"),
                                         maps_fn=maps_fn, batch_size=max(1, int(self.config.get("batch_size", 1))))
        return fg, hv

    def __len__(self) -> int:
        return len(self.samples)


@torch.no_grad()
def score_images(net: nn.Module, images: ImageSet, config: Mapping[str, Any], info: DistInfo,
                 pp_configs: Sequence[postprocess.PostprocessConfig], desc: str
                 ) -> tuple[list[list[dict[str, Any]]], float]:
    """Per-image instance metrics (one row list per post-processing config) and the mean loss, over all
    images; each process scores every world_size-th image, results are gathered on every process."""
    indices = list(range(info.rank, len(images), info.world_size))
    device = info.device
    dtype = nuclei_model.autocast_dtype(device, config["amp"])
    batch_size = max(1, config["batch_size"] // info.world_size)
    was_training = net.training
    net.eval()
    local_rows: list[list[dict[str, Any]]] = [[] for _ in pp_configs]
    loss_sum = 0.0
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False, unit="batch",
                          disable=not info.is_main):
            items = [images.data[i] for i in indices[start:start + batch_size]]
            batch = {k: torch.stack([it[k] for it in items]).to(device) for k in ("image", "foreground", "hv", "valid")}
            with nuclei_model.autocast(device, dtype):
                out = net(batch["image"])
            loss, _ = nuclei_model.compute_loss(out, batch)
            loss_sum += float(loss) * len(items)
            if images.whole:
                maps = [images.whole_maps(net, it["index"], device) for it in items]
            else:
                sizes = [images.truth[it["index"]][0].shape for it in items]
                maps = nuclei_model.maps_to_images(out, sizes)
            for it, (fg, hv) in zip(items, maps):
                labels, vague = images.truth[it["index"]]
                for c, cfg in enumerate(pp_configs):
                    pred = postprocess.postprocess(fg, hv, cfg)
                    if pred.shape != labels.shape:  # whole image segmented at the model's pixel size
                        pred = dataset.resize_labels(pred, labels.shape)
                    row = metrics.instance_metrics(labels, pred, ignore=vague)
                    row["image"] = images.samples[it["index"]].rel_path
                    row["tissue"] = images.samples[it["index"]].tissue
                    local_rows[c].append(row)
    finally:
        net.train(was_training)
    gathered = gather_objects(info, (local_rows, loss_sum))
    rows = [[r for part, _ in gathered for r in part[c]] for c in range(len(pp_configs))]
    order = {s.rel_path: i for i, s in enumerate(images.samples)}
    rows = [sorted(rs, key=lambda r: order[r["image"]]) for rs in rows]
    total_loss = sum(ls for _, ls in gathered)
    return rows, total_loss / max(1, len(images))


def summarise(rows: Sequence[Mapping[str, Any]], loss: float) -> dict[str, float]:
    out = {k: float(v) for k, v in metrics.mean_over_images(rows).items()} if rows else {}
    out["loss"] = float(loss)
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _fold_dir(output_dir: Path, k: int) -> Path:
    return output_dir / f"fold_{k}"


def typical_tile_size(samples: Sequence[dataset.Sample]) -> int:
    """The most common side length (max of height and width) of the training images: how many source pixels
    one network input covers (NuInsSeg: 512). Recorded as config["tile_size"] for `predict`."""
    from PIL import Image

    sides: Counter[int] = Counter()
    for sample in samples:
        with Image.open(sample.image_path) as im:
            sides[max(im.size)] += 1
    return sides.most_common(1)[0][0]


def data_scale(config: Mapping[str, Any]) -> float:
    """Resize factor from the training images' pixel size to the model's (1 when the data's is unknown)."""
    data_mpp, mpp = config.get("data_mpp"), config.get("mpp")
    return 1.0 if not data_mpp or not mpp else float(data_mpp) / float(mpp)


def discover_training_data(config: dict[str, Any]) -> list[dataset.Sample]:
    """The training images (`--data_format`), and in `config`: `data_mpp` (the data's pixel size, None when
    unknown), `mpp` (the model's: --mpp, else the data's, else NuInsSeg's), `tile_size` (--tile_size, else
    the image side / smallest side, see `dataset.default_tile_size`) and `windows` (True when the images are
    not all tile x tile at the model's pixel size: training takes random windows, scoring tiles whole images)."""
    data_format = config.get("data_format") or "auto"
    samples = dataset.discover(config["data_dir"], data_format)
    # bad data (unreadable, truncated, 16-bit, wrong mask type or size) fails here, before the tile size is
    # measured from the files and before the output folder is touched
    dataset.validate_dataset(samples)
    data_mpp = dataset.dataset_mpp(config["data_dir"], data_format)
    config["data_mpp"] = data_mpp
    if config.get("mpp") is None:
        config["mpp"] = data_mpp if data_mpp is not None else dataset.NUINSSEG_MPP
    scale = data_scale(config)
    if not config.get("tile_size"):  # predict tiles new images at this size
        if dataset.detect_format(config["data_dir"], data_format) == "nuinsseg" and scale == 1.0:
            config["tile_size"] = typical_tile_size(samples)
        else:
            config["tile_size"] = dataset.default_tile_size(samples, scale)
    check_windows(config, samples, scale)
    config["windows"] = dataset.needs_windows(samples, config["tile_size"], scale)
    if config["windows"]:
        log.info("images of other sizes than %d x %d px at %.3g µm/px: training on random windows of that size, "
                 "validation and test images segmented whole (tiled)", config["tile_size"], config["tile_size"],
                 config["mpp"])
    return samples


def check_windows(config: Mapping[str, Any], samples: Sequence[dataset.Sample], scale: float) -> None:
    """Before anything is written: the window (`tile_size`) and the images rescaled to the model's pixel size
    must make sense together and fit in memory. UserError naming --tile_size or --mpp otherwise."""
    shapes = [dataset.scaled_shape(dataset.image_shape(s.image_path), scale) for s in samples]
    tile = int(config["tile_size"])
    rescaled = scale != 1.0
    where = (f" at the model's {config['mpp']:g} µm/px (the data's is {config.get('data_mpp'):g})"
             if rescaled else "")
    smallest, largest = min(min(hw) for hw in shapes), max(max(hw) for hw in shapes)
    if rescaled and largest < 16:
        raise UserError(f"--mpp {config['mpp']:g}: the images would be at most {largest} px{where}; "
                        f"give the model's pixel size in µm/px (e.g. {config.get('data_mpp'):g})")
    if tile < 16:  # the default window, the smallest image side
        raise UserError(f"--tile_size: the smallest image is {smallest} px{where}; give --tile_size of at "
                        f"least 16 (smaller images are mirror-padded)")
    if tile > largest:
        raise UserError(f"--tile_size {tile}: larger than every image{where} (the largest side is {largest} "
                        f"px); use at most {largest}")
    # the decoded images and labels (uint8 RGB + up to 32-bit ids) are kept in memory, plus one padded window
    # (RGB, int64 labels twice, mask) and the resizing
    cached = sum(h * w for h, w in shapes) * (3 + 4)
    window = tile * tile * (3 + 8 + 8 + 1) + 2 * int(config["input_size"]) ** 2 * (3 + 4 + 8)
    option = f"--mpp {config['mpp']:g}" if rescaled else f"--tile_size {tile}"
    utils.check_memory(cached + window, f"{option} (the {len(shapes)} images{where} and one training window)")


def training_dataset(config: Mapping[str, Any], samples: Sequence[dataset.Sample],
                     augment: dataset.AugmentConfig, seed: int) -> "dataset.NucleiDataset":
    """Whole images resized to the input size (all images the model's tile), else random windows."""
    if config.get("windows"):
        return dataset.WindowDataset(samples, config["input_size"], config["tile_size"], data_scale(config),
                                     augment=augment, seed=seed)
    return dataset.NucleiDataset(samples, config["input_size"], augment=augment, seed=seed)


def run_training(config: dict[str, Any], output_dir: Path,
                 epoch_callback: Callable[[int, int, dict[str, float]], None] | None = None,
                 evaluate_test: bool = True) -> dict[str, Any]:
    """Train the folds of `config` into `output_dir` (see module docstring); returns the summary dict
    {"folds": [{"fold", "best_epoch", "val", "test"}], "val_mean", "val_sd", "test_mean", "test_sd",
    "params": {"total", "trainable", "percent", "head"}, "seconds"}."""
    start = time.time()
    config = dict(config)
    if not config.get("postprocess"):
        config["postprocess"] = default_postprocess(config.get("head", "hv"))
    config.setdefault("tune_postprocess", False)
    if config.get("init_model") and not config.get("init_from"):
        config = apply_init_model(config)
    validate_config(config)
    check_all_data(config)
    output_dir = Path(output_dir)
    info = setup_distributed(config.get("device"))
    try:
        return _run_training(config, output_dir, info, epoch_callback, evaluate_test, start)
    finally:
        info.shutdown()


def _run_training(config: dict[str, Any], output_dir: Path, info: DistInfo, epoch_callback, evaluate_test: bool,
                  start: float) -> dict[str, Any]:
    if config["batch_size"] % info.world_size:
        raise UserError(f"--batch_size {config['batch_size']}: the global batch must be divisible by the "
                        f"number of processes ({info.world_size})")
    samples = discover_training_data(config)
    if config.get("all_data"):
        folds = all_data_folds(samples, config)
    else:
        folds = dataset.make_folds(samples, config["num_folds"], config["fold_seed"], config["val_fraction"])
    folds_path = output_dir / "folds.json"
    if config.get("resume") and folds_path.is_file():
        saved = dataset.read_folds_json(folds_path)
        dataset.check_folds_match(saved, samples, folds_path)
        if [{k: f[k] for k in ("fold", "train", "val", "test")} for f in saved["folds"]] != folds:
            raise UserError(f"{folds_path}: the saved folds differ from the folds of this configuration")
    fold_ids = list(range(config["num_folds"])) if config["cross_validation"] else [config["fold"] or 0]
    if info.device.type == "cuda":  # fixed input sizes: let cuDNN pick its fastest kernels; TF32 for fp32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # a wrong --pretrained or --init_model (missing, corrupt, not MobileSAM) fails here, before the output folder
    # is touched (the data were checked by discover_training_data)
    build_initial_model(config)
    if info.is_main:
        utils.make_output_dir(output_dir)
        dataset.write_folds_json(folds_path, samples, folds, seed=config["fold_seed"],
                                 num_folds=1 if config.get("all_data") else config["num_folds"])
        if not (config.get("resume") and (output_dir / "config.json").is_file()):
            utils.write_json(output_dir / "config.json",
                             {**config, "world_size": info.world_size, "environment": utils.environment_info()})
    barrier(info)
    log.info("%d images in %s; %s, folds %s; %d process(es) on %s", len(samples), config["data_dir"],
             f"{config['num_folds']}-fold cross-validation" if config["cross_validation"] else "single split",
             ",".join(map(str, fold_ids)), info.world_size, info.device)

    results: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    for k in fold_ids:
        fold_dir = _fold_dir(output_dir, k)
        result_path = fold_dir / RESULT
        if config.get("resume") and result_path.is_file():
            result = utils.read_json(result_path)
            log.info("fold %d: already finished (best epoch %s), skipped", k, result.get("best_epoch"))
        else:
            result = train_fold(config, samples, folds[k], fold_dir, info, epoch_callback, evaluate_test)
        params = result.get("params", params)
        results.append(result)

    names = list(metrics.METRICS) + ["loss"]
    val_mean, val_sd = _mean_sd([r["val"] for r in results], names)
    tests = [r["test"] for r in results if r.get("test")]
    test_mean, test_sd = _mean_sd(tests, names) if tests else (None, None)
    summary = {
        "folds": [{"fold": r["fold"], "best_epoch": r["best_epoch"], "val": r["val"], "test": r.get("test")}
                  for r in results],
        "val_mean": val_mean, "val_sd": val_sd, "test_mean": test_mean, "test_sd": test_sd,
        "params": params, "seconds": time.time() - start,
    }
    if info.is_main:
        if config["cross_validation"]:
            tuned = [r.get("postprocess") for r in results]
            shared_pp = tuned[0] if tuned[0] and all(t == tuned[0] for t in tuned) else config["postprocess"]
            nuclei_model.save_model_set_index(
                output_dir / BEST, config, shared_pp,
                {r["fold"]: f"fold_{r['fold']}/{BEST}" for r in results}, "folds.json", parameters=params)
            write_cv_summary(output_dir, summary, config)
        else:
            copy_file_atomic(_fold_dir(output_dir, fold_ids[0]) / BEST, output_dir / BEST)
        utils.write_json(output_dir / "summary.json", {**summary, **summary_protocol(config),
                                                        "out_of_fold": out_of_fold_means(output_dir, summary)})
        if config.get("all_data"):
            log.info("%s", NO_HELD_OUT)
        if test_mean:
            log.info("test (mean over %d fold(s)): pq %s, aji %s, dice %s", len(tests), _fmt(test_mean.get("pq")),
                     _fmt(test_mean.get("aji")), _fmt(test_mean.get("dice")))
        log.info("done in %.0f s; models in %s", summary["seconds"], output_dir)
    barrier(info)
    return summary


# ----------------------------------------------------------------------------------------------
# Fine-tuning a trained model (--init_model) and training on all data (--all_data)
# ----------------------------------------------------------------------------------------------
# kept from the init model: a flag given with another value is an error
INIT_KEPT = ("head", "input_size", "lora_rank", "lora_alpha", "lora_targets", "mpp", "tile_size")
# taken from the init model when not given
INIT_INHERITED = ("lora_dropout", "train_only_lora")
NO_HELD_OUT = ("no held-out score exists: --all_data trained on every image (the validation subset only chose "
               "the epoch); score the model on images it never saw, e.g. areas imported into another folder")


def _init_value(key: str, model_config: Mapping[str, Any]) -> Any:
    if key in nuclei_model.MODEL_DEFAULTS:
        value = nuclei_model.model_config(model_config)[key]
        return list(value.split(",")) if key == "lora_targets" and isinstance(value, str) else value
    if key == "mpp":
        return float(model_config.get("mpp") or dataset.NUINSSEG_MPP)
    return model_config.get(key)


def apply_init_model(config: Mapping[str, Any], args: argparse.Namespace | None = None) -> dict[str, Any]:
    """`config` for fine-tuning the model `config["init_model"]`: the `INIT_KEPT` keys (and `INIT_INHERITED`
    ones not given) and its post-processing settings from the model; `pretrained` its base weights (trainable-only
    checkpoints: the recorded file, or --pretrained, checked by size and SHA-1) or None (full checkpoints hold
    every weight); `init_from` what it starts from: {"path", "size", "sha1", "epoch", "fold", "data_dir",
    "base_weights", "init_from" (the model's own lineage)}. A flag counts as given when it differs from its
    default, unless `args` (parsed by `add_arguments`) says which flags the command line gave; given with
    another value than the model's it is a UserError, before anything is written."""
    config = dict(config)
    path = Path(config["init_model"]).expanduser()
    ckpt = nuclei_model.read_checkpoint(path)
    if ckpt["format"] != nuclei_model.CHECKPOINT_FORMAT:
        folds = sorted((ckpt.get("folds") or {}).values())
        raise UserError(f"--init_model {path}: a cross-validation index of {len(folds)} fold models; pass one of "
                        f"them, e.g. {path.parent / folds[0] if folds else 'fold_0/best_model.pth'}")
    model_cfg = dict(ckpt["config"])
    defaults = default_config(config["data_dir"])

    def given(key: str) -> bool:
        if args is not None and hasattr(args, "given_options"):
            return key in args.given_options
        return config.get(key) != defaults.get(key)

    for key in INIT_KEPT:
        value = _init_value(key, model_cfg)
        if value is None:  # an old model without a recorded tile size: the data decide, as for a new model
            continue
        mine = config.get(key)
        same = (math.isclose(float(mine), float(value), rel_tol=1e-6) if key == "mpp" and mine is not None
                else mine == value)
        if given(key) and not same:
            shown = ",".join(mine) if isinstance(mine, list) else mine
            theirs = ",".join(value) if isinstance(value, list) else value
            raise UserError(f"--{key} {shown}: the --init_model {path} has {key} {theirs}, which fine-tuning keeps; "
                            f"drop --{key} (the model's value is used) or train a new model without --init_model")
        config[key] = value
    for key in INIT_INHERITED:
        if not given(key):
            config[key] = _init_value(key, model_cfg)
    config["postprocess"] = dict(ckpt.get("postprocess") or default_postprocess(config["head"]))
    if ckpt["state_kind"] == "trainable":
        recorded = ckpt.get("base_weights") or {}
        base = Path(config["pretrained"] if given("pretrained") and config["pretrained"] else recorded.get("path", ""))
        if not base.is_file():
            raise UserError(f"--init_model {path}: its base weights {base} were not found (the model holds only its "
                            f"LoRA and head); pass --pretrained <the mobile_sam.pt it was trained on>")
        now = nuclei_model.file_fingerprint(base)
        if recorded and (now["sha1"] != recorded.get("sha1") or now["size"] != recorded.get("size")):
            raise UserError(f"--pretrained {base}: SHA-1 {now['sha1'][:12]}, but --init_model {path} was trained on "
                            f"base weights with SHA-1 {str(recorded.get('sha1'))[:12]}; pass the file it was trained on")
        config["pretrained"] = str(base)
    else:  # every weight is in the checkpoint
        config["pretrained"] = None
    fingerprint = nuclei_model.file_fingerprint(path)
    config["init_from"] = {**fingerprint, "epoch": ckpt.get("epoch"), "fold": ckpt.get("fold"),
                           "data_dir": model_cfg.get("data_dir"), "pretrained": model_cfg.get("pretrained"),
                           "base_weights": ckpt.get("base_weights"), "init_from": model_cfg.get("init_from")}
    log.info("fine-tuning %s (head %s, input size %d, LoRA rank %d on %s, %.3g µm/px, tile %s px)", path,
             config["head"], config["input_size"], config["lora_rank"], ",".join(config["lora_targets"]),
             config["mpp"], config.get("tile_size"))
    return config


def build_initial_model(config: Mapping[str, Any]) -> nn.Module:
    """The network training starts from: `config["init_model"]`'s weights, or a new model (`build_model`)."""
    if config.get("init_model"):
        path = (config.get("init_from") or {}).get("path") or config["init_model"]
        return nuclei_model.init_from_checkpoint(path, config)
    return nuclei_model.build_model(config)


def check_all_data(config: Mapping[str, Any]) -> None:
    if not config.get("all_data"):
        return
    if config.get("cross_validation"):
        raise UserError("--all_data: trains one model on every image; drop --cross_validation")
    if config.get("fold") is not None:
        raise UserError(f"--fold {config['fold']}: --all_data has no folds; drop --fold")
    if config.get("early_stopping") and not config.get("val_fraction"):
        raise UserError("--early_stopping: needs a validation subset; with --all_data --val_fraction 0 give a fixed "
                        "--epochs instead")


def all_data_folds(samples: Sequence[dataset.Sample], config: Mapping[str, Any]) -> list[dict[str, list[int]]]:
    """One "fold" without test images: every image trains, except the validation subset carved out like
    each fold's (tissue/group-stratified, `--val_fraction`, seeded by `--fold_seed`)."""
    train_idx, val_idx = dataset.validation_split(np.arange(len(samples)), [s.tissue for s in samples],
                                                  config["val_fraction"], config["fold_seed"])
    return [{"fold": 0, "train": train_idx.tolist(), "val": val_idx.tolist(), "test": []}]


def summary_protocol(config: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's `protocol` (and with --all_data `held_out_score: null` and the plain statement)."""
    if config.get("all_data"):
        return {"protocol": "all data: no test fold", "held_out_score": None, "note": NO_HELD_OUT}
    return {"protocol": score_protocol()}


def score_protocol() -> str:
    """How the test folds are scored, named in cv_summary.md and summary.json with evaluate's wording."""
    import evaluate

    return f"out-of-fold test images, ambiguous regions {evaluate.vague_protocol(True)}"


def out_of_fold_means(output_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mean over all test images of all folds (each scored by the fold model that did not train on it) from
    the folds' test_per_image.csv: the headline 'overall' number of `evaluate` on this model set."""
    rows = []
    for f in summary["folds"]:
        path = _fold_dir(output_dir, f["fold"]) / "test_per_image.csv"
        if not f.get("test") or not path.is_file():
            return None
        rows += utils.read_csv(path)
    if not rows:
        return None
    means: dict[str, Any] = {"num_images": len(rows)}
    for name in metrics.METRICS:
        values = [float(r[name]) for r in rows if r.get(name) not in (None, "", "nan")]
        means[name] = float(np.mean(values)) if values else None
    return means


def write_cv_summary(output_dir: Path, summary: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """cv_summary.csv (per fold + mean + sd rows) and cv_summary.md (table, mean ± sd, parameter counts)."""
    names = list(metrics.METRICS)
    use_test = summary["test_mean"] is not None
    split = "test" if use_test else "val"
    rows = []
    for f in summary["folds"]:
        values = f[split] or {}
        rows.append({"fold": f["fold"], "best_epoch": f["best_epoch"], **{n: values.get(n) for n in names}})
    mean, sd = summary[f"{split}_mean"], summary[f"{split}_sd"]
    rows.append({"fold": "mean", "best_epoch": "", **{n: mean.get(n) for n in names}})
    rows.append({"fold": "sd", "best_epoch": "", **{n: sd.get(n) for n in names}})
    utils.write_csv(output_dir / "cv_summary.csv", rows, ["fold", "best_epoch"] + names)
    p = summary["params"] or {}
    lines = [f"# {len(summary['folds'])}-fold cross-validation: {split} metrics", "",
             f"Data: `{config['data_dir']}`; head `{config['head']}`, LoRA rank {config['lora_rank']} "
             f"(alpha {config['lora_alpha']}, targets {','.join(config['lora_targets'])}), "
             f"{'LoRA + head only' if config['train_only_lora'] else 'full fine-tuning'}; input size "
             f"{config['input_size']}; model selection on validation {config['monitor']}.", "",
             f"Parameters: {p.get('total', 0):,} total, {p.get('trainable', 0):,} trainable "
             f"({p.get('percent', 0.0):.2f} %), decoder head {p.get('head', 0):,}.", "",
             "| fold | best epoch | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for r in rows[:-2]:
        lines.append(f"| {r['fold']} | {r['best_epoch']} | " + " | ".join(_fmt(r[n]) for n in names) + " |")
    lines.append("| **mean ± sd** | | " + " | ".join(f"{_fmt(mean.get(n))} ± {_fmt(sd.get(n))}" for n in names)
                 + " |")
    lines += ["", f"Protocol: {score_protocol()}. Per-image metrics are averaged over each fold's images; "
              "mean ± sd are over folds (sample standard deviation): the 'across folds' line of "
              "`python main.py evaluate` on this model."]
    oof = out_of_fold_means(output_dir, summary) if use_test else None
    if oof:
        lines += ["", f"Out-of-fold over all {oof['num_images']} images (mean over images, the headline of "
                  f"`python main.py evaluate` on this model): PQ {_fmt(oof.get('pq'))}, AJI {_fmt(oof.get('aji'))}, "
                  f"Dice {_fmt(oof.get('dice'))}."]
    utils.atomic_write_text(output_dir / "cv_summary.md", "\n".join(lines) + "\n")


def _read_history(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for row in utils.read_csv(path):
        try:
            epoch = int(row["epoch"])
        except (KeyError, ValueError):
            continue
        if epoch <= up_to_epoch:
            rows.append(row)
    return rows


def train_fold(config: Mapping[str, Any], samples: Sequence[dataset.Sample], fold: Mapping[str, Any],
               fold_dir: Path, info: DistInfo, epoch_callback=None, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one fold; returns {"fold", "best_epoch", "val", "test", "postprocess", "params"}."""
    k = int(fold["fold"])
    device = info.device
    seed = int(config["seed"]) + k
    utils.set_seed(seed)
    net = build_initial_model(config).to(device)
    params = nuclei_model.parameter_report(net)
    if info.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        log.info("fold %d: %d train / %d validation / %d test images; parameters %s total, %s trainable "
                 "(%.2f %%), head %s", k, len(fold["train"]), len(fold["val"]), len(fold["test"]),
                 f"{params['total']:,}", f"{params['trainable']:,}", params["percent"], f"{params['head']:,}")

    augment = dataset.AugmentConfig.from_dict(config["augmentation"])
    train_data = training_dataset(config, [samples[i] for i in fold["train"]], augment, seed)
    sampler = DistributedSampler(train_data, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    per_rank = config["batch_size"] // info.world_size
    loader = dataset.make_loader(train_data, per_rank, shuffle=False, num_workers=config["num_workers"],
                                 seed=seed, device=device, sampler=sampler)
    val_set = ImageSet([samples[i] for i in fold["val"]], config["input_size"], config)
    if not len(val_set):
        log.warning("fold %d: no validation images (--val_fraction %s); the last epoch is kept", k,
                    config["val_fraction"])
    pp_config = postprocess.PostprocessConfig.from_dict(config["postprocess"])

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    # bf16 on GPUs with native bf16; float16 + loss scaling on older CUDA GPUs; full precision elsewhere
    dtype = nuclei_model.autocast_dtype(device, config["amp"], fp16_fallback=True)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config["epochs"]
    warmup_steps = int(round(config["warmup_epochs"] * steps_per_epoch))

    step, first_epoch, best_score, best_loss, best_epoch, bad_epochs = 0, 1, None, None, 0, 0
    last_path, best_path, history_path = fold_dir / LAST, fold_dir / BEST, fold_dir / HISTORY
    history: list[dict[str, Any]] = []
    if config.get("resume") and last_path.is_file():
        last = nuclei_model.read_checkpoint(last_path)
        nuclei_model.load_weights(net, last, source=str(last_path))
        optimizer.load_state_dict(last["optimizer"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        step, first_epoch = int(last["step"]), int(last["epoch"]) + 1
        best_score, best_epoch, bad_epochs = last["best_score"], int(last["best_epoch"]), int(last["bad_epochs"])
        best_loss = last.get("best_loss")
        set_rng_state(last["rng"])
        history = _read_history(history_path, int(last["epoch"]))
        log.info("fold %d: resumed after epoch %d (best %s %s at epoch %d)", k, last["epoch"], config["monitor"],
                 _fmt(best_score), best_epoch)
    stopped = config["early_stopping"] and bad_epochs >= config["patience"]

    model: nn.Module = net
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    if config["compile"]:
        model = torch.compile(model)

    for epoch in range(first_epoch, config["epochs"] + 1):
        if stopped:
            break
        t0 = time.time()
        model.train()
        sampler.set_epoch(epoch)
        train_data.set_epoch(epoch)
        sums = torch.zeros(6, dtype=torch.float64)  # images, loss, bce, dice, mse, msge
        bar = tqdm(loader, desc=f"fold {k} epoch {epoch}/{config['epochs']}", unit="batch", leave=False,
                   disable=not info.is_main)
        lr = config["learning_rate"]
        for batch in bar:
            lr = config["learning_rate"] * lr_factor(step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {key: batch[key].to(device, non_blocking=True) for key in ("image", "foreground", "hv", "valid")}
            with nuclei_model.autocast(device, dtype):
                outputs = model(batch["image"])
            loss, parts = nuclei_model.compute_loss(outputs, batch)
            if not torch.isfinite(loss):
                raise RuntimeError(f"fold {k} epoch {epoch}: the loss is {float(loss)} (try a lower "
                                   f"--learning_rate or --no-amp)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config["grad_clip"])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            n = batch["image"].shape[0]
            loss_value = float(loss.detach())
            sums += torch.tensor([n, loss_value * n, parts["bce"] * n, parts["dice"] * n,
                                  parts.get("mse", 0.0) * n, parts.get("msge", 0.0) * n], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if info.distributed:
            reduced = sums.to(device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        train = (sums[1:] / sums[0].clamp_min(1)).tolist()

        if len(val_set):
            (rows,), val_loss = score_images(nuclei_model.unwrap(net), val_set, config, info, [pp_config],
                                             f"fold {k} validation")
            val = summarise(rows, val_loss)
            score = val[config["monitor"]]
        else:
            val, score = {"loss": train[0]}, None
        # ties on the monitored metric (e.g. PQ 0 early on) go to the lower validation loss
        improved = (score is None or better(config["monitor"], score, best_score)
                    or (score == best_score and best_loss is not None and val["loss"] < best_loss))
        if improved:
            best_score, best_loss, best_epoch, bad_epochs = score, val["loss"], epoch, 0
        else:
            bad_epochs += 1
        seconds = time.time() - t0
        row = {"epoch": epoch, "lr": lr, "train_loss": train[0], "train_bce": train[1], "train_dice": train[2]}
        if config["head"] == "hv":
            row.update(train_mse=train[3], train_msge=train[4])
        row.update({f"val_{name}": val.get(name) for name in ["loss"] + list(metrics.METRICS) if name in val})
        row.update(seconds=seconds, best=int(improved))
        history.append(row)
        if info.is_main:
            utils.write_csv(history_path, history)
            extra = {"fold": k, "epoch": epoch, "val": val, "monitor": config["monitor"]}
            if improved:
                nuclei_model.save_checkpoint(best_path, net, config, pp_config.to_dict(), **extra)
            nuclei_model.save_checkpoint(
                last_path, net, config, pp_config.to_dict(), **extra, optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None, step=step, best_score=best_score,
                best_loss=best_loss, best_epoch=best_epoch, bad_epochs=bad_epochs, rng=rng_state())
        log.info("fold %d epoch %d/%d  loss %.4f (%s)  val loss %s pq %s aji %s dice %s  lr %.2e  %.1fs%s",
                 k, epoch, config["epochs"], train[0],
                 " ".join(f"{n} {v:.4f}" for n, v in zip(("bce", "dice", "mse", "msge"), train[1:])
                          if config["head"] == "hv" or n in ("bce", "dice")),
                 _fmt(val.get("loss")), _fmt(val.get("pq")), _fmt(val.get("aji")), _fmt(val.get("dice")),
                 lr, seconds, " *" if improved else "")
        if epoch_callback is not None:
            epoch_callback(k, epoch, dict(val))
        if config["early_stopping"] and bad_epochs >= config["patience"]:
            log.info("fold %d: early stopping after epoch %d (no %s improvement for %d epochs; best epoch %d)",
                     k, epoch, config["monitor"], bad_epochs, best_epoch)
            stopped = True
    barrier(info)

    # the selected model: best validation epoch
    best_ckpt = nuclei_model.read_checkpoint(best_path)
    nuclei_model.load_weights(net, best_ckpt, source=str(best_path))
    val_best = dict(best_ckpt.get("val") or {})
    pp_best = pp_config
    if config.get("tune_postprocess") and len(val_set) and config["head"] == "hv":
        pp_best = tune_postprocess(net, val_set, config, info, pp_config, k)
        if info.is_main:
            nuclei_model.save_checkpoint(best_path, net, config, pp_best.to_dict(), fold=k,
                                         epoch=int(best_ckpt["epoch"]), val=val_best, monitor=config["monitor"])
    test = None
    if evaluate_test and fold["test"]:
        test_set = ImageSet([samples[i] for i in fold["test"]], config["input_size"], config)
        (rows,), test_loss = score_images(net, test_set, config, info, [pp_best], f"fold {k} test")
        test = summarise(rows, test_loss)
        if info.is_main:
            utils.write_csv(fold_dir / "test_per_image.csv", rows,
                            ["image", "tissue"] + list(metrics.METRICS) + ["tp", "fp", "fn", "num_true", "num_pred"])
        log.info("fold %d test (%d images, best epoch %d): pq %s aji %s aji+ %s dice %s", k, len(test_set),
                 best_epoch, _fmt(test.get("pq")), _fmt(test.get("aji")), _fmt(test.get("aji_plus")),
                 _fmt(test.get("dice")))
    result = {"fold": k, "best_epoch": int(best_ckpt["epoch"]), "val": val_best, "test": test,
              "postprocess": pp_best.to_dict(), "params": params}
    if info.is_main:
        utils.write_json(fold_dir / RESULT, result)
    barrier(info)
    return result


def tune_postprocess(net: nn.Module, val_set: ImageSet, config: Mapping[str, Any], info: DistInfo,
                     base: postprocess.PostprocessConfig, fold: int) -> postprocess.PostprocessConfig:
    """Pick fg_threshold x marker_threshold from a 3 x 3 grid around the defaults (`base`, which is in the
    grid) with the best mean validation `--monitor` metric (PQ when monitoring the loss)."""
    grid = []
    for offset in TUNE_FG_OFFSETS:
        for factor in TUNE_MARKER_FACTORS:
            values = base.to_dict()
            values.update(fg_threshold=round(min(max(base.fg_threshold + offset, 0.05), 0.95), 4),
                          marker_threshold=base.marker_threshold * factor)
            grid.append(postprocess.PostprocessConfig.from_dict(values))
    rows_per_cfg, _ = score_images(net, val_set, config, info, grid, f"fold {fold} tuning post-processing")
    key = "pq" if config["monitor"] == "loss" else config["monitor"]
    scores = [metrics.mean_over_images(rows).get(key, float("nan")) for rows in rows_per_cfg]
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    log.info("fold %d: post-processing tuned on validation: fg_threshold %.2f, marker_threshold %.2f "
             "(%s %.4f; defaults %.4f)", fold, grid[best].fg_threshold, grid[best].marker_threshold, key,
             scores[best], scores[grid.index(min(grid, key=lambda c: abs(c.fg_threshold - base.fg_threshold)
                                                 + abs(c.marker_threshold - base.marker_threshold)))])
    return grid[best]


__all__ = ["add_arguments", "run", "config_from_args", "run_training", "train_fold", "lr_factor",
           "setup_distributed", "process_device", "DistInfo", "default_postprocess", "write_cv_summary",
           "resume_config", "apply_init_model", "build_initial_model", "all_data_folds"]
