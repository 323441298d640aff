"""Many inputs on many processes, GPUs and machines: the Dask engine behind `predict --workers/--scheduler`.

Every input (a whole slide or a plain image) is one Dask task that calls the command's per-input function
(`segment`: `predict.predict_one`, handed down by `predict.run`, so this module never imports the command) on a
worker process; the task writes the input's result files itself (atomically, into the shared output folder)
and returns its small `inference.Outcome`, so nothing big travels through Dask. The model is loaded once per worker
process (a per-process cache keyed by the options, filled by the first task) and reused by every later task,
and so are the process's post-processing workers (`cached_workers`: started by its first slide).

Local cluster (`--workers N`): a Dask scheduler on 127.0.0.1 and N worker processes, each started by its own
Nanny with its own environment:
- GPU machine: by default one worker per visible GPU, each pinned to its GPU by `CUDA_VISIBLE_DEVICES` (more
  workers than GPUs share them round-robin). `dask_cuda` does the same with extra memory tooling; it is not
  needed.
- CPU: N workers, each with one Dask task thread (one input at a time) and `usable cores // N` torch threads
  (set by a WorkerPlugin when the worker starts, and through OMP_NUM_THREADS/MKL_NUM_THREADS in its
  environment), so the workers together never use more threads than the cores this process may use.
Existing cluster (`--scheduler ADDRESS` or a scheduler JSON file): the work goes to its workers; each worker
process gives every input it runs `usable cores // Dask threads` torch threads. The workers must be able to
import this project (start them in its folder or with it on PYTHONPATH) and see the input and output paths.

Faults: a worker process that dies while it holds an input (killed, out of memory, node lost) is restarted by
its Nanny and the scheduler hands the input to a live worker, up to `ALLOWED_FAILURES` deaths per input
(Dask's `distributed.scheduler.allowed-failures`); an exception raised by the task itself is re-run
`retries` times (Dask's `retries`). A failure of the input itself (corrupt file, no pixel size) is not an
exception: `predict_one` returns it as a failed Outcome, reported in one line while the others go on.
Because every result file is written atomically and `predict_one` skips finished slides and continues
unfinished ones (plain images, seconds each, are segmented again), rerunning the same command after any crash
(of a worker, a node, the scheduler or this process) continues where it stopped.

Granularity: one task per input, never region tasks. Each slide is already parallel inside its task
(read-ahead threads, post-processing processes, batched network calls), a study has many more slides than
workers, and the largest inputs are started first (task priority by file size), which bounds the idle tail
at the end of a run by the time of about one slide. Region tasks would need the seam rule and the per-slide
files (label pyramid, GeoJSON) to be assembled across processes, with the maps moved between workers; worth
it only for fewer slides than GPUs, which this engine does not speed up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Sequence

from distributed import WorkerPlugin
from tqdm import tqdm

import inference
import utils
from utils import UserError

log = logging.getLogger(__name__)

PLUGIN_NAME = "nuclei-predict-worker-setup"
DEFAULT_RETRIES = 1          # re-runs of a task that raised (an input's own failure is an Outcome, not a raise)
ALLOWED_FAILURES = 3         # worker deaths while holding one input before that input is given up
DEFAULT_DASHBOARD = ":8787"  # local cluster's dashboard (another free port if taken; shown only with bokeh)

# segment(predictor, path, name, output_dir, options, workers=) -> inference.Outcome: one input
# (`predict.predict_one`; `workers`: this process's post-processing processes, `cached_workers`)
Segment = Callable[..., object]
# task(path, name, output_dir, options, segment) -> inference.Outcome, run on a worker; must be importable there
Task = Callable[[str, str, str, object, Segment], object]


# ----------------------------------------------------------------------------------------------
# On the worker
# ----------------------------------------------------------------------------------------------
_predictor_lock = threading.Lock()
_predictor_cache: dict[str, object] = {}
_workers_cache: dict[str, object] = {}   # "workers": this process's `wsi.Workers` (`cached_workers`)
_daemon_warned = False


def options_key(options) -> str:
    """A stable text key of a PredictOptions (the per-process predictor cache's key)."""
    values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(vars(options))
    return json.dumps(values, sort_keys=True, default=str)


def cached_predictor(options):
    """The predictor of `options` in this process: loaded by the first task, reused by every later one. Holds
    one predictor (a worker of a long-lived cluster that gets other options frees the previous model)."""
    key = options_key(options)
    with _predictor_lock:
        if key not in _predictor_cache:
            _predictor_cache.clear()
            log.info("loading the model in worker process %d", os.getpid())
            _predictor_cache[key] = inference.load_predictor(options)
        return _predictor_cache[key]


def cached_workers(count: int):
    """This process's post-processing worker processes (`wsi.Workers` of `count`), kept from task to task like the
    predictor, so that a Dask worker's later slides do not wait for new processes (`predict` does the same for the
    slides of one run); they start with the first slide that needs them. Another count replaces them."""
    import wsi

    with _predictor_lock:
        held = _workers_cache.get("workers")
        if held is None or held.count != max(0, int(count)):
            if held is not None:
                held.close()
            held = _workers_cache["workers"] = wsi.Workers(count)
        return held


def forget_predictor() -> None:
    """Drop this process's cached predictor and shut its post-processing workers down (a worker that closes;
    tests)."""
    with _predictor_lock:
        _predictor_cache.clear()
        held = _workers_cache.pop("workers", None)
    if held is not None:
        held.close()


def predict_input(path: str, name: str, output_dir: str, options, segment: Segment):
    """The Dask task of one input: segment it with this process's predictor and post-processing workers
    (`segment(predictor, path, name, output_dir, options, workers=...)`) and write its result files.

    In a daemonic worker process (Dask's default for workers it did not start with our settings), which may
    not start child processes, the input's post-processing runs in the worker itself (`num_workers=0`)."""
    global _daemon_warned
    if getattr(options, "num_workers", 0) != 0 and multiprocessing.current_process().daemon:
        if options.num_workers and not _daemon_warned:  # None (the default) quietly means none here
            log.warning("daemonic Dask worker: post-processing in the worker process itself; start the workers "
                        "with DASK_DISTRIBUTED__WORKER__DAEMON=False to let each one use --num_workers processes")
            _daemon_warned = True
        options = dataclasses.replace(options, num_workers=0)
    predictor = cached_predictor(options)
    return segment(predictor, Path(path), name, Path(output_dir), options,
                   workers=cached_workers(int(getattr(predictor, "num_workers", 0) or 0)))


class WorkerSetup(WorkerPlugin):
    """Worker plugin: the torch thread count of each worker process, set once when the worker starts (also
    after a restart, and on workers that join later). `torch_threads=None`: the worker's usable cores divided
    by its Dask task threads (an existing cluster, whose workers we did not start)."""

    idempotent = False

    def __init__(self, torch_threads: int | None = None):
        self.torch_threads = torch_threads

    def setup(self, worker) -> None:
        import torch

        threads = self.torch_threads
        if threads is None:
            threads = max(1, utils.usable_cores() // max(1, int(getattr(worker.state, "nthreads", 1) or 1)))
        torch.set_num_threads(int(threads))
        log.info("worker %s: %d torch thread(s), CUDA_VISIBLE_DEVICES=%s", worker.address, threads,
                 os.environ.get("CUDA_VISIBLE_DEVICES", "(all)"))

    def teardown(self, worker) -> None:
        forget_predictor()


# ----------------------------------------------------------------------------------------------
# Planning the local cluster
# ----------------------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (index or UUID); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@dataclasses.dataclass
class ClusterPlan:
    """What `--workers` starts: one environment per worker process and the torch threads of each."""
    envs: list[dict[str, str]]
    torch_threads: int
    device: str | None       # the device each worker uses ("cuda" = its pinned GPU), None = unchanged

    @property
    def workers(self) -> int:
        return len(self.envs)


def plan_local_cluster(workers: int, device: str | None, gpus: Sequence[str], cores: int,
                       threads: int | None = None) -> ClusterPlan:
    """`workers` worker processes on this machine (0: one per GPU; on a CPU machine one per 4 cores).

    With CUDA GPUs (`gpus` not empty and `device` None or "cuda") worker i sees only `gpus[i % len(gpus)]`
    and uses device "cuda"; otherwise (no GPU, `device` "cpu" or "mps") the workers keep `device` and share
    the machine. Each worker gets `threads`, by default `cores // workers` (at least 1), threads for torch and
    OpenMP/MKL/BLAS.
    """
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 1 or more (or no number: one per GPU)")
    device = None if device in ("", "auto") else device
    if device is not None and device.startswith("cuda") and device != "cuda":
        raise UserError(f"--device {device}: with --workers each worker gets its own GPU; choose the GPUs with "
                        f"CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1,2) and --device cuda")
    on_gpus = bool(gpus) and device in (None, "cuda")
    n = workers or (len(gpus) if on_gpus else max(1, cores // 4))
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    threads = int(threads) if threads is not None else max(1, cores // n)
    envs = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if on_gpus else {} for i in range(n)]
    for env in envs:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return ClusterPlan(envs, threads, "cuda" if on_gpus else device)


def start_local_cluster(plan: ClusterPlan, dashboard_address: str | None, stack: contextlib.ExitStack):
    """A Dask scheduler and `plan.workers` Nanny-managed worker processes on 127.0.0.1 (closed by `stack`)."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    # Read by each Nanny whenever it (re)starts its worker process, so it stays set while the cluster lives:
    # non-daemonic workers may start their own post-processing processes; a worker may die this many times
    # while holding one input.
    stack.enter_context(dask.config.set({"distributed.worker.daemon": False,
                                         "distributed.scheduler.allowed-failures": ALLOWED_FAILURES}))
    memory = max(1, int(MEMORY_LIMIT // plan.workers))  # the machine's memory (cgroup-aware) shared out
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address,
                                               "dashboard": dashboard_address is not None}}
    workers = {f"worker-{i}": {"cls": Nanny, "options": {
        "host": "127.0.0.1", "nthreads": 1, "env": env, "memory_limit": memory,
        "silence_logs": logging.WARNING}} for i, env in enumerate(plan.envs)}
    cluster = SpecCluster(scheduler=scheduler, workers=workers, name="nuclei-predict", silence_logs=logging.WARNING)
    stack.callback(cluster.close)
    return cluster


def connect(scheduler: str, stack: contextlib.ExitStack):
    """A Client of an existing cluster: `scheduler` is an address (tcp://host:8786) or a scheduler JSON file
    (`dask scheduler --scheduler-file`)."""
    from distributed import Client

    try:
        if Path(scheduler).is_file():
            client = Client(scheduler_file=scheduler, timeout="30s", set_as_default=False)
        else:
            client = Client(scheduler, timeout="30s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise UserError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler ({e})") from None
    stack.callback(client.close)
    return client


def dashboard_line(client) -> str | None:
    """`Dask dashboard: <url>` when the scheduler serves one."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # an old or unusual scheduler: no dashboard line, not a failure
        return None
    return f"Dask dashboard: {client.dashboard_link}" if "dashboard" in services else None


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def failed_outcome(path: Path, name: str, error: str):
    return inference.Outcome(input=str(path), name=name, status="failed", error=error)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_inputs(inputs: Sequence[Path], names: Sequence[str], output_dir: Path, options, segment: Segment, *,
               workers: int | None = None, scheduler: str | None = None, retries: int = DEFAULT_RETRIES,
               dashboard_address: str | None = DEFAULT_DASHBOARD, task: Task | None = None,
               torch_threads: int | None = None, progress: bool = True) -> list:
    """Segment every input on a Dask cluster with `segment` (`predict.predict_one`; it must be importable on the
    workers); one `inference.Outcome` per input, in input order.

    `scheduler` (an address or a scheduler JSON file) uses an existing cluster; otherwise a local one with
    `workers` worker processes is started (0 or None: one per GPU, see `plan_local_cluster`) and closed at
    the end. A failed input is reported on stderr in one line (`error: ... (skipped)`) and recorded as failed;
    the others go on. `torch_threads` fixes the torch threads of every worker process (default: the cores
    shared out, see `plan_local_cluster` and `WorkerSetup`). `task` replaces `predict_input` (it must be
    importable on the workers).
    """
    from distributed import Client, as_completed
    from distributed.client import FutureCancelledError

    task = task or predict_input
    inputs = [Path(p) for p in inputs]
    outcomes: list = [None] * len(inputs)
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            client = connect(scheduler, stack)
            plugin = WorkerSetup(torch_threads)
            connected = len(client.scheduler_info().get("workers", {}))
            print(f"Dask scheduler {client.scheduler.address}: {connected} worker(s) connected now"
                  + ("" if connected else " (the inputs wait for workers to join)"))
        else:
            plan = plan_local_cluster(int(workers or 0), getattr(options, "device", None), visible_gpus(),
                                      utils.usable_cores(), threads=torch_threads)
            if plan.device is not None and getattr(options, "device", None) != plan.device:
                options = dataclasses.replace(options, device=plan.device)
            if plan.device == "cuda" and getattr(options, "num_workers", 0) is None:
                # post-processing processes per GPU worker: their share of the cores, at most 4
                options = dataclasses.replace(options, num_workers=min(4, plan.torch_threads))
            if dashboard_address is not None and not _has_bokeh():
                dashboard_address = None  # the dashboard needs bokeh; without it the page would be empty
            cluster = start_local_cluster(plan, dashboard_address, stack)
            client = Client(cluster, set_as_default=False)
            stack.callback(client.close)
            plugin = WorkerSetup(plan.torch_threads)
            gpus = sorted({env.get("CUDA_VISIBLE_DEVICES") for env in plan.envs} - {None})
            print(f"local Dask cluster: {plan.workers} worker process(es), "
                  + (f"GPU(s) {','.join(gpus)}" if gpus else "CPU") + f", {plan.torch_threads} torch thread(s) each")
        client.register_plugin(plugin, name=PLUGIN_NAME)
        line = dashboard_line(client)
        if line:
            print(line)

        # the largest inputs first: the last tasks to start are the short ones, so workers finish together
        order = sorted(range(len(inputs)), key=lambda i: (-_size(inputs[i]), i))
        priority = {i: len(inputs) - rank for rank, i in enumerate(order)}
        run_id = uuid.uuid4().hex[:8]
        futures = {}
        for i, (path, name) in enumerate(zip(inputs, names)):
            future = client.submit(task, str(path), name, str(output_dir), options, segment,
                                   key=f"predict-{name}-{run_id}", priority=priority[i], retries=retries, pure=False)
            futures[future.key] = (i, future)
        try:
            bar = tqdm(as_completed([f for _, f in futures.values()], loop=client.loop), total=len(futures),
                       desc="inputs", unit="input", disable=not progress)
            for future in bar:
                i, _ = futures[future.key]
                outcomes[i] = _collect(future, inputs[i], names[i], FutureCancelledError)
                if outcomes[i].status == "failed":
                    tqdm.write(f"error: {outcomes[i].error} (skipped)", file=sys.stderr)
                future.release()
        except BaseException:  # interrupted: the workers stop these inputs (their finished files stay)
            with contextlib.suppress(Exception):
                client.cancel([f for _, f in futures.values()])
            raise
    for i, outcome in enumerate(outcomes):
        if outcome is None:  # as_completed ended early (the scheduler went away)
            outcomes[i] = failed_outcome(inputs[i], names[i], f"{inputs[i]}: no result (the Dask cluster went "
                                                              f"away); rerun the same command: finished inputs "
                                                              f"are skipped")
            print(f"error: {outcomes[i].error} (skipped)", file=sys.stderr)
    return outcomes


def _collect(future, path: Path, name: str, cancelled_error):
    """The Outcome of a finished future; a task that raised, or whose workers kept dying, becomes a failed one."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return failed_outcome(path, name, f"{path}: the worker processes holding it died too often (Dask's "
                                          f"allowed-failures; out of memory?); rerun to retry")
    except cancelled_error:
        return failed_outcome(path, name, f"{path}: no result (the Dask scheduler or the connection to it was "
                                          f"lost); rerun the same command: finished inputs are skipped")
    except Exception as e:  # the task raised (not an input failure, which predict_one returns)
        return failed_outcome(path, name, inference.error_message(path, e))
