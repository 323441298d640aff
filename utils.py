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


def zlib_ng_encoder():
    """imagecodecs' zlib-ng encoder (`encoder(data, level=...)`), or None where imagecodecs is missing or built
    without zlib-ng; looked up once."""
    global _ZLIB_NG
    if _ZLIB_NG is None:
        try:
            import imagecodecs

            _ZLIB_NG = imagecodecs.zlibng_encode if imagecodecs.ZLIBNG.available else False
        except Exception:  # noqa: BLE001 - imagecodecs missing, or built without zlib-ng
            _ZLIB_NG = False
    return _ZLIB_NG or None


_ZLIB_NG = None   # the encoder once looked up (False: none)


def deflate(data, level: int) -> bytes:
    """`zlib.compress(data, level)`: a zlib stream of `data` (bytes or a contiguous array) that any inflater reads,
    made by zlib-ng (`zlib_ng_encoder`) where it is installed, zlib's own otherwise. zlib-ng's bytes are not zlib's;
    on the label images here it is about 3x faster at level 1 (a region file's label crop: 6 instead of 20 ms) and
    1.2-1.3x faster and 13 % smaller at level 6 (the label pyramid's tiles, against libdeflate's level 6)."""
    encoder = zlib_ng_encoder()
    if encoder is not None:
        return encoder(data, level=int(level))
    import zlib

    return zlib.compress(data, int(level))


def make_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """Create the output folder `path` (and its parents): the one way every command creates its output folder.
    A problem is a UserError naming the option and the real cause (`output_dir_problem`), not a traceback or
    "No such file or directory" for a parent that exists."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {path}: {output_dir_problem(path, e)}") from None
    return path


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, file-system type) of the mount holding `path`, from /proc/mounts (None elsewhere)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    target = str(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, parts[2])
    return best


# kernel file systems that hold no user files (mkdir there fails with ENOENT or EPERM)
VIRTUAL_FILE_SYSTEMS = ("proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs", "tracefs",
                        "configfs", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl", "efivarfs", "binfmt_misc")


def output_dir_problem(path: Path, error: OSError) -> str:
    """Why the folder `path` could not be created, in words: a file in the way, no permission, a read-only or
    virtual file system (e.g. /proc), a full disk; the nearest existing folder is named."""
    import errno

    path = Path(os.path.abspath(path))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        return "exists and is not a folder"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    mount = _mount_of(existing)
    if mount is not None and mount[1] in VIRTUAL_FILE_SYSTEMS:
        return (f"{existing} is on the kernel's virtual '{mount[1]}' file system ({mount[0]}), where no folder "
                f"can be created; choose a folder on a disk")
    code = error.errno
    if code == errno.EROFS:
        return f"{existing} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {existing}"
    if code == errno.ENOSPC:
        return f"no space left on the device of {existing}"
    if code == errno.ENAMETOOLONG:
        return "the path is too long"
    return f"cannot write in {existing} ({error.strerror or error})"


def check_input_file(path: str | os.PathLike, option: str, hint: str = "") -> Path:
    """`path` must be an existing file: a folder or a missing path is a UserError naming `option` (plus an
    optional `hint`, e.g. how to get the file)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder, expected a file" + (f" ({hint})" if hint else ""))
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found" + (f"; {hint}" if hint else ""))
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


def load_torch_file(path: str | os.PathLike, name: str | None = None) -> Any:
    """torch.load(path, weights_only=True) on the CPU; a file that cannot be read is a UserError
    `<name>: <what is wrong with the file>` on one line (`torch_file_problem`), never PyTorch's multi-line
    advice about weights_only."""
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": a multi-line warning about a foreign file
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise UserError(f"{name or path}: {torch_file_problem(path, e)}") from None


def torch_file_problem(path: Path, error: BaseException) -> str:
    """What is wrong with a file torch.load(weights_only=True) refused, in one line, from the file's first
    bytes and the error: empty, a web page or other text, truncated, or holding Python objects other than
    tensors and plain values (which a safe load refuses)."""
    import re
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    text = str(error)
    if size == 0:
        return "empty file (0 bytes); a download or copy did not finish"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return (f"truncated or damaged PyTorch checkpoint (its zip archive is incomplete, {size:,} bytes); "
                    f"copy or download it again")
        kind = "a PyTorch checkpoint"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle (or PyTorch's legacy format)"
    else:
        sample = head.lstrip()
        if sample[:1] == b"<":
            return "a web page or XML file, not a checkpoint (a download that returned an error page?)"
        printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
        if printable >= 0.95 * len(head):
            first = head.decode("ascii", "replace").strip().splitlines()[0][:40] if head.strip() else ""
            return f"a text file, not a checkpoint (starts with {first!r})"
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle; wrong file or damaged)"
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"{kind} holding Python objects ({found.group(1)}) that a safe load refuses; checkpoints must "
                f"hold only tensors and plain values (not written by this toolkit?)")
    if "weights only load failed" in text.lower():
        return f"{kind} that a safe load cannot read (damaged, or holding Python objects other than tensors)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0][:120]
    return f"{kind} that cannot be read (damaged or truncated: {type(error).__name__}{': ' + first if first else ''})"


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
    # the slide readers and their codecs (which library decodes a slide's tiles: slides.open_slide; imagecodecs'
    # zlib-ng also deflates the label files: `deflate`) and the post-processing's labelling (connected-components-3d)
    # and compiled kernels (numba, `jit_kernels`), from the installed distributions' metadata: nothing is imported
    from importlib import metadata

    for dist in ("openslide-python", "openslide-bin", "tiffslide", "imagecodecs", "zarr", "connected-components-3d",
                 "numba"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
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
# Upper bounds of options whose value sets how much memory a command takes
# ----------------------------------------------------------------------------------------------
MAX_TILE_SIZE = 8192      # a window (--tile_size) is resized to the network input; NuInsSeg's are 512, MoNuSeg's 1000
MAX_REGION_SIZE = 16384   # a slide region (--region_size) holds RGB, maps and labels: ~25 B/px, 6.7 GB at this size
MAX_BATCH_SIZE = 1024     # images or tiles in one network call
MAX_WORKERS = 256         # worker processes or threads of one command
MAX_THREADS = 1024        # CPU threads per process
MIN_MPP, MAX_MPP = 0.01, 100.0  # a pixel size in µm/px outside this is no microscope's (brightfield: ~0.1-2)


def check_mpp_range(option: str, value: float | None) -> None:
    """UserError when a pixel size (µm/px) is outside MIN_MPP..MAX_MPP (a typo, or another unit)."""
    if value is not None and not MIN_MPP <= value <= MAX_MPP:
        raise UserError(f"{option} {value:g}: must be between {MIN_MPP:g} and {MAX_MPP:g} micrometres per pixel "
                        f"(brightfield scans: about 0.1-2)")


def check_at_most(option: str, value: float | int | None, limit: float | int, why: str = "") -> None:
    """UserError `<option> <value>: must be at most <limit> (<why>)` when `value` exceeds `limit`."""
    if value is not None and value > limit:
        raise UserError(f"{option} {value}: must be at most {limit}" + (f" ({why})" if why else ""))


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's MemAvailable, capped by the cgroup's memory
    limit minus its use (cgroup v2 memory.max, v1 memory.limit_in_bytes); None where neither can be read."""
    values: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 number: no limit
            values.append(max(0, int(limit) - usage))
        break
    return min(values) if values else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} PB"


def check_memory(needed: float, problem: str, fraction: float = 0.8) -> None:
    """UserError `<problem>: needs about X of memory, more than the Y available` when `needed` bytes exceed
    `fraction` of `available_memory()` (no check where the available memory is unknown). `problem` names the
    option and value, e.g. "--tile_size 100000"."""
    free = available_memory()
    if free is not None and needed > fraction * free:
        raise UserError(f"{problem}: needs about {format_bytes(needed)} of memory, more than the "
                        f"{format_bytes(free)} available")


# ----------------------------------------------------------------------------------------------
# Progress bars
# ----------------------------------------------------------------------------------------------
# How tqdm progress shows, for this process and the processes it starts (they inherit the variable and apply
# it when they import this module): "bars" (tqdm's own, on a terminal), "lines" (stderr is a log file or a
# pipe: a plain line per bar at most every PROGRESS_LINE_SECONDS and its final state, no carriage returns or
# cursor codes),
# "off" (-q: no progress at all). Set by main.py (`configure_progress`); call sites keep plain tqdm calls.
PROGRESS_ENV = "NUCLEI_PROGRESS"
PROGRESS_MODES = ("bars", "lines", "off")
PROGRESS_LINE_SECONDS = 30.0
PROGRESS_LINE_FORMAT = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} "
                        "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
_ANSI_ESCAPE = None  # compiled on first use


class ProgressLineWriter:
    """A text stream for one tqdm bar that turns its in-place redraws (carriage return + status + padding,
    cursor moves) into plain newline-terminated lines on `stream`, at most one every `interval` seconds
    (counted from the bar's start; tqdm redraws on every `set_postfix`, i.e. every batch), plus the final
    state when a bar that stays on screen (`leave`) closes. A bar that is cleared on close and lasts less
    than `interval` writes nothing; an unchanged status is not repeated."""

    def __init__(self, stream, interval: float = PROGRESS_LINE_SECONDS) -> None:
        import time

        self.stream = stream
        self.interval = float(interval)
        self._clock = time.monotonic
        self.last_time = self._clock()
        self.last = ""
        self.pending = ""

    def _emit(self, line: str) -> None:
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line
        self.pending = ""
        self.last_time = self._clock()

    def write(self, text: str) -> int:
        global _ANSI_ESCAPE
        import re

        if _ANSI_ESCAPE is None:
            _ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
        text = str(text)
        clean = _ANSI_ESCAPE.sub("", text)
        if clean.strip() == "":
            if "\n" in clean:  # a kept bar closes (its final state was drawn just before): print it
                self._emit(self.pending)
            elif "\r" in clean:  # a cleared bar closes, or a blank redraw: nothing to print
                self.pending = ""
            return len(text)
        for part in re.split(r"[\r\n]", clean):
            line = part.strip()
            if line:
                self.pending = line
        if self._clock() - self.last_time >= self.interval:
            self._emit(self.pending)
        return len(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()

    def isatty(self) -> bool:
        return False


def _progress_mode() -> str:
    mode = os.environ.get(PROGRESS_ENV, "bars")
    return mode if mode in PROGRESS_MODES else "bars"


def _progress_kwargs(kwargs: dict) -> dict:
    mode = _progress_mode()
    if mode == "off":
        kwargs["disable"] = True
    elif mode == "lines" and not kwargs.get("disable"):
        target = kwargs.get("file") or sys.stderr
        if not isinstance(target, ProgressLineWriter):
            kwargs["file"] = ProgressLineWriter(target)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), 1.0)  # the writer spaces the lines
        kwargs["ascii"] = True
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("bar_format", PROGRESS_LINE_FORMAT)  # no bar drawing in a log
    return kwargs


def _install_progress_hook() -> None:
    """Route every tqdm bar of this process through `_progress_kwargs` (once; bars made by `from tqdm import
    tqdm` anywhere, whatever `disable=` a call site passes). tqdm's own TQDM_* variables cannot do this: it
    reads them once, as defaults, and an explicit `disable=False` at a call site overrides them."""
    import tqdm.std

    cls = tqdm.std.tqdm
    if getattr(cls, "_nuclei_progress_hook", False):
        return
    original = cls.__dict__["__init__"]

    def __init__(self, *args, **kwargs):
        original.__get__(self, type(self))(*args, **_progress_kwargs(kwargs))

    cls.__init__ = __init__
    cls._nuclei_progress_hook = True


def configure_progress(quiet: bool, stream=None) -> str:
    """Pick the progress mode for this run (`quiet` -> off; `stream`, default stderr, not a terminal -> lines;
    else bars), for this process and its children (PROGRESS_ENV). Returns the mode."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    mode = "off" if quiet else ("bars" if tty else "lines")
    os.environ[PROGRESS_ENV] = mode
    _install_progress_hook()
    return mode


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


def freeze_startup_objects() -> None:
    """Move every object alive now (what the imports and the model made: about 300,000 with torch and numba) to the
    garbage collector's permanent generation (`gc.freeze`), once a process has set up. The collector's full passes,
    which a process doing a slide's work triggers every so often, then traverse only what was made since, instead
    of all of those objects each time (about 0.1-0.2 s per pass, measured in the middle of a slide's reads). Objects
    frozen are still freed when nothing refers to them; only cycles among them would stay, and the set-up's objects
    live as long as the process anyway."""
    import gc

    gc.collect()   # what the set-up left as garbage goes first, so nothing unreachable is frozen
    gc.freeze()


def _leave_interrupt_to_the_main_process() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(workers: int):
    """A `ProcessPoolExecutor` of `workers` spawned processes (a fresh interpreter: safe with CUDA and threads)
    that ignore Ctrl-C: the terminal sends SIGINT to every process of the command, and an idle worker would
    print its own KeyboardInterrupt traceback; the main process reports the interruption once (exit 130) and
    shuts the pool down, letting a running task finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_leave_interrupt_to_the_main_process)


SHARED_MEMORY_DIR = "/dev/shm"   # a RAM file system on Linux; elsewhere (or when full) arrays go by pickle


class ArrayHandoff:
    """Large numpy arrays handed to worker processes through a file in shared memory (`SHARED_MEMORY_DIR`) instead
    of the pool's pickle: a process pool pickles a task's arrays at protocol 4 in the main process (about 0.14 s of
    its CPU for a slide region's 75 MB of maps and RGB), sends them through a pipe and unpickles them in the worker
    (about 0.08 s more); a file in RAM costs one copy in (`pack`) and the worker maps it (`unpack_arrays`).

    `pack(arrays)` -> a small picklable description, or None when shared memory is not there, not writable or
    has too little room (the caller then sends the arrays themselves); `release(packed)` once the worker is done with
    it: its file is kept and rewritten by a later `pack` (its pages are allocated already: a new file costs the
    kernel's allocation and zeroing of every page on the write and their freeing on deletion, 69 and 13 ms of the
    main process per slide region on the build machine, against about 20 ms for rewriting a kept one); `close()`
    deletes the folder (every file, also after an error or Ctrl-C). A file is rewritten only after `release`, and a
    worker's mapping of it is not used after its task (`wsi.finish_region` keeps no array of it)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(SHARED_MEMORY_DIR if root is None else root)
        self.dir: Path | None = None
        self.enabled = self.root.is_dir() and os.access(self.root, os.W_OK)
        self._free: list[str] = []   # released files, rewritten by the next `pack`s

    def pack(self, arrays: Mapping[str, np.ndarray | None]) -> dict | None:
        if not self.enabled:
            return None
        layout, offset = {}, 0
        for key, a in arrays.items():
            if a is not None:
                a = np.asarray(a)
                layout[key] = (a.dtype.str, tuple(int(v) for v in a.shape), offset)
                offset += -(-a.nbytes // 64) * 64   # each array at a 64-byte boundary
        kept = self._free.pop() if self._free else None
        try:
            grow = offset - (os.path.getsize(kept) if kept is not None else 0)
            if grow > 0:
                stat = os.statvfs(self.root)
                if stat.f_bavail * stat.f_frsize < 2 * grow + (64 << 20):   # leave room for others
                    if kept is not None:
                        self._free.append(kept)
                    return None
            if kept is not None:
                name, f = kept, open(kept, "r+b")
            else:
                if self.dir is None:
                    self.dir = Path(tempfile.mkdtemp(prefix=f"nuclei-{os.getpid()}-", dir=self.root))
                fd, name = tempfile.mkstemp(suffix=".arrays", dir=self.dir)
                f = os.fdopen(fd, "wb")
            try:
                with f:
                    for key, a in arrays.items():
                        if a is not None and a.size:
                            f.seek(layout[key][2])
                            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
        except OSError:   # no room after all (a RAM file system reports ENOSPC on write): pickle from now on
            self.enabled = False
            return None
        return {"file": name, "layout": layout, "none": [k for k, a in arrays.items() if a is None]}

    def release(self, packed: dict | None) -> None:
        """The worker is done with `packed`: its file is kept for a later `pack`."""
        if packed is not None and os.path.exists(packed["file"]):
            self._free.append(packed["file"])

    def close(self) -> None:
        self._free = []
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def unpack_arrays(packed: dict) -> dict[str, np.ndarray | None]:
    """The arrays of an `ArrayHandoff.pack` description, mapped copy-on-write (writing to one changes only this
    process's copy); the data stay valid after the file is deleted."""
    import mmap

    out: dict[str, np.ndarray | None] = dict.fromkeys(packed.get("none", ()))
    mapped = None
    for key, (dtype, shape, offset) in packed["layout"].items():
        count = int(np.prod(shape))
        if count == 0:
            out[key] = np.zeros(shape, np.dtype(dtype))
            continue
        if mapped is None:
            with open(packed["file"], "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        # plain ndarrays over the mapping (which lives as long as they do)
        out[key] = np.frombuffer(mapped, np.dtype(dtype), count, offset).reshape(shape)
    return out


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
        check_at_most("--threads", threads, MAX_THREADS, "CPU threads per process")
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


if os.environ.get(PROGRESS_ENV) in ("lines", "off"):  # a process started by a command: its parent's mode
    try:
        _install_progress_hook()
    except ImportError:  # pragma: no cover - tqdm is a requirement
        pass
