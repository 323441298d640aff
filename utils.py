"""Small shared helpers: the user-facing error type, atomic file writes, seeding, devices, versions.

Every module that writes a result file goes through the atomic writers here, so an interrupted run
or a failure half-way never leaves a truncated file at the destination: data goes to a temporary file
in the same folder, is flushed to disk, then renamed over the destination in one step.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad option).

    `main.py` prints it as one line, `error: <message>`, and exits with status 2. The message must
    name the file or option concerned and say what is wrong.
    """


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def temp_file_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty temporary file beside `path` (same folder, so a rename onto `path` is atomic), with the
    permissions a normally created file gets (mkstemp makes it owner-only, which would leave results
    unreadable to colleagues). The caller renames it onto `path` or deletes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """Create the output folder `path` (and its parents); a file in the way is a UserError, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{option} {path}: exists and is not a folder") from None
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (numpy scalars/arrays and Paths are converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON file ({e})") from None


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Atomically write a list of dicts as CSV. Columns default to the keys in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temporary file and a rename (checkpoints are never half-written)."""
    import torch

    path = Path(path)
    tmp = temp_file_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Reproducibility and environment
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def select_device(name: str | None = None):
    """`name` ('cpu', 'cuda', 'cuda:1', 'mps') or None for the best available device."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded in every output folder."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    for name in ("scipy", "skimage", "tifffile", "PIL", "optuna"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def parse_list(text: str | Iterable, cast=str, option: str = "value") -> list:
    """'2,4,8' -> [2, 4, 8]; raises UserError naming the option on a bad item."""
    if not isinstance(text, str):
        return [cast(t) for t in text]
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected a comma-separated list of {cast.__name__}") from None


# ----------------------------------------------------------------------------------------------
# CPU threads
# ----------------------------------------------------------------------------------------------
# OMP_NUM_THREADS as the user set it before this program changed it (spawned children re-import this
# module with their parent's share in the environment; they never call the setup functions below).
USER_OMP_NUM_THREADS: str | None = os.environ.get("OMP_NUM_THREADS")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_USER_THREAD_ENV = {name: os.environ.get(name) for name in THREAD_ENV_VARS}


def _cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """controller ('' for cgroup v2) -> the process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        text = Path(proc_cgroup).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",") if parts[1] else [""]
        for c in controllers:
            out[c] = parts[2]
    return out


def _walk_up(root: Path, rel: str) -> list[Path]:
    """The folders from root/rel up to root (a quota set on any ancestor limits this process too);
    in a container the host's path does not exist under root, then only root itself is read."""
    rel_parts = [p for p in rel.strip("/").split("/") if p]
    folders = [root.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPU quota of this process's cgroup in cores (e.g. 1.5), or None when there is none.

    cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>"); cgroup v1: `cpu.cfs_quota_us` /
    `cpu.cfs_period_us` in the `cpu` controller's hierarchy (-1 = no quota). The smallest quota of the
    cgroup and its ancestors wins."""
    root_path = Path(root)
    paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if "" in paths:  # cgroup v2 (unified)
        for folder in _walk_up(root_path, paths[""]):
            try:
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            if quota != "max" and float(period) > 0:
                limits.append(float(quota) / float(period))
    if "cpu" in paths:  # cgroup v1
        for mount in (root_path / "cpu", root_path / "cpu,cpuacct", root_path / "cpuacct,cpu"):
            if not mount.is_dir():
                continue
            for folder in _walk_up(mount, paths["cpu"]):
                try:
                    quota = float((folder / "cpu.cfs_quota_us").read_text())
                    period = float((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
            break
    return min(limits) if limits else None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, Slurm, cpusets) capped by the cgroup
    CPU quota (Docker `--cpus`, Kubernetes limits), rounded up; not the machine's core count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def resolve_threads(threads: int | None = None, processes: int = 1, *, env_value: str | None = None,
                    cores: int | None = None) -> int:
    """Threads for each process of a command: `--threads` if given, else the user's OMP_NUM_THREADS
    (`env_value`), else the usable cores divided among the `processes` the command runs (at least 1)."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: must be at least 1")
        return int(threads)
    if env_value not in (None, ""):
        try:
            value = int(str(env_value).split(",")[0])
        except ValueError:
            raise UserError(f"OMP_NUM_THREADS={env_value}: not a number of threads") from None
        if value >= 1:
            return value
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, int(processes)))


def set_openmp_wait_policy() -> None:
    """Idle OpenMP threads sleep instead of spin-waiting (unless the user chose otherwise): on a machine
    shared with other jobs, spinning threads steal the cores the working threads need (an epoch took 18x
    longer). GNU OpenMP (torch's Linux wheels) reads OMP_WAIT_POLICY, Intel's reads KMP_BLOCKTIME; both are
    read once, when the runtime loads, so this must run before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")


def add_threads_argument(parser) -> None:
    """`--threads N` (every command gets it through main.py)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process of this command (default: OMP_NUM_THREADS if set, else the "
                             "cores this process may use (CPU affinity and cgroup quota) divided among the "
                             "processes the command starts)")


def preset_threads(threads: int | None) -> int:
    """Before torch is loaded: the wait policy and a first thread count in the environment, so the OpenMP
    runtime starts with it. `configure_threads` refines it once the command knows its worker processes."""
    set_openmp_wait_policy()
    return configure_threads(threads)


def configure_threads(threads: int | None = None, workers: int = 0) -> int:
    """Share the CPU among this process and the `workers` processes a command starts (DataLoader workers,
    post-processing pools, ...): sets torch's thread count here (if torch is loaded) and the OMP/MKL thread
    variables that spawned children inherit. Returns the threads per process."""
    n = resolve_threads(threads, 1 + max(0, int(workers)), env_value=USER_OMP_NUM_THREADS)
    for name in THREAD_ENV_VARS:
        if threads is not None or name == "OMP_NUM_THREADS" or _USER_THREAD_ENV[name] in (None, ""):
            # without --threads the user's own MKL/BLAS setting stays
            os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    log.debug("%d CPU thread(s) per process (%d worker process(es))", n, workers)
    return n
