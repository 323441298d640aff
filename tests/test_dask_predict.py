"""Tests of dask_predict.py (`predict --workers / --scheduler`).

Independent reference: the same command without Dask (inputs one after the other in the test process). Every
result file of a Dask run must be byte-identical to it, and summary.csv must agree except for timings. Every
process runs the network with one torch thread, as the reference does: on a CPU the last bits of the float
maps depend on how the work is split among threads (1 vs 2 threads moved one boundary pixel of one nucleus
in these slides), whatever the engine. The
inputs are 3 small synthetic pyramidal slides and 1 corrupt file; the network is a tiny random model (input
64) whose foreground threshold is set so that it finds nuclei, so the files are not trivially empty. Worker
processes are real processes (Nanny-managed), and the scheduler test starts `dask scheduler` / `dask worker`
itself on 127.0.0.1.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dask_predict
import dataset
import inference
import main
import predict
import sample_data
import utils

PROJECT_DIR = Path(__file__).resolve().parents[1]
SLIDES = ("slide0", "slide1", "slide2")
TIMING_COLUMNS = {"seconds", "read_seconds", "network_seconds", "postprocess_seconds", "write_seconds"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_torch_thread):
    """(tiny model path, input folder, output folder of the sequential run)."""
    import nuclei_model
    import postprocess

    root = tmp_path_factory.mktemp("dask_study")
    config = {"input_size": 64, "pretrained": None, "head": "hv", "lora_rank": 2, "lora_alpha": 2.0,
              "train_only_lora": False, "mpp": dataset.NUINSSEG_MPP, "tile_size": 128}
    utils.set_seed(0)
    net = nuclei_model.build_model(config, pretrained=None)
    settings = dict(postprocess.PostprocessConfig().to_dict(), fg_threshold=0.18)  # the tiny model's fg: 0.06-0.22
    nuclei_model.save_checkpoint(root / "tiny.pth", net, config, settings, fold=0, epoch=1, val={"pq": 0.1},
                                 monitor="pq")
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i, name in enumerate(SLIDES):
        tile = sample_data.render_tile(rng, 256, sample_data.ORGANS[i])[0]
        image = np.ascontiguousarray(np.tile(tile, (2, 2, 1))[:300 + 40 * i, :400])
        sample_data.write_pyramidal_tiff(root / "in" / f"{name}.tif", image, mpp=0.25, tile_size=128, min_size=128)
    (root / "in" / "corrupt.tif").write_bytes(b"II*\x00" + bytes(60))  # a TIFF header and nothing else
    out = root / "sequential"
    assert main.main(predict_args(root, out)) == 1
    rows = {r["name"]: r for r in utils.read_csv(out / "summary.csv")}
    assert [rows[n]["status"] for n in SLIDES] == ["ok"] * 3 and rows["corrupt"]["status"] == "failed"
    assert all(int(rows[n]["nuclei"]) > 0 for n in SLIDES), "the tiny model finds no nuclei: a weak reference"
    return root, out


@functools.lru_cache(maxsize=None)
def predict_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "predict", "--model_path", str(root / "tiny.pth"), "--input", str(root / "in" / "*.tif"),
            "--output_dir", str(out), "--device", "cpu", "--batch_size", "4", "--label_image",
            "--tissue_mask", "none", "--threads", "1", *extra]


@pytest.fixture
def two_cores(monkeypatch):
    """The local cluster plans as on a 2-core machine: 2 workers, 1 torch thread each (as the reference)."""
    monkeypatch.setattr(dask_predict.utils, "usable_cores", lambda: 2)


def result_files(out: Path) -> dict[str, bytes]:
    """Every result file but the run's own records (summary.csv, predict_config.json, the resume state)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("summary.csv", "predict_config.json")}


def assert_same_results(out: Path, reference: Path) -> None:
    got, expected = result_files(out), result_files(reference)
    assert sorted(got) == sorted(expected)
    assert any(name.endswith(".geojson") for name in got) and any(name.endswith("_labels.tif") for name in got)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the sequential run"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    assert strip(utils.read_csv(out / "summary.csv")) == strip(utils.read_csv(reference / "summary.csv"))


def error_lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip().startswith("error:")]


def test_plan_local_cluster():
    """GPUs: one worker per GPU by default, pinned; more workers share them round-robin; CPU: cores shared."""
    plan = dask_predict.plan_local_cluster(0, None, ["0", "3"], cores=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in plan.envs] == ["0", "3"] and plan.device == "cuda"
    assert plan.torch_threads == 8 and all(e["OMP_NUM_THREADS"] == "8" for e in plan.envs)
    plan = dask_predict.plan_local_cluster(3, "cuda", ["GPU-a", "GPU-b"], cores=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in plan.envs] == ["GPU-a", "GPU-b", "GPU-a"]
    plan = dask_predict.plan_local_cluster(3, "cpu", ["0"], cores=8)  # --device cpu on a GPU machine
    assert plan.workers == 3 and plan.torch_threads == 2 and plan.device == "cpu"
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in plan.envs)
    assert dask_predict.plan_local_cluster(0, None, [], cores=8).workers == 2   # CPU default: one per 4 cores
    assert dask_predict.plan_local_cluster(4, None, [], cores=2).torch_threads == 1  # never 0 threads
    with pytest.raises(utils.UserError, match="CUDA_VISIBLE_DEVICES"):
        dask_predict.plan_local_cluster(2, "cuda:1", ["0", "1"], cores=8)


def test_model_loaded_once_per_process(monkeypatch):
    """The task reuses its process's predictor: one load for any number of inputs with the same options; other
    options replace it (one model held at a time)."""
    loads = []
    dask_predict.forget_predictor()
    monkeypatch.setattr(inference, "load_predictor", lambda options: loads.append(options) or f"model {len(loads)}")

    def segment(predictor, path, name, out, options, workers=None):
        assert workers is dask_predict.cached_workers(0)   # this process's (none here: num_workers 0)
        return predictor, name

    options = predict.PredictOptions(model_path="m.pth", device="cpu", num_workers=0)
    got = [dask_predict.predict_input(f"/in/{n}.svs", n, "/out", options, segment) for n in ("a", "b", "c")]
    assert got == [("model 1", "a"), ("model 1", "b"), ("model 1", "c")] and len(loads) == 1
    other = predict.PredictOptions(model_path="m.pth", device="cpu", num_workers=0, ensemble=True)
    assert dask_predict.predict_input("/in/d.svs", "d", "/out", other, segment) == ("model 2", "d")
    assert dask_predict.predict_input("/in/e.svs", "e", "/out", other, segment) == ("model 2", "e") and len(loads) == 2
    dask_predict.forget_predictor()


def test_a_dask_workers_slides_share_its_post_processing_processes(study, tmp_path, monkeypatch):
    """A Dask worker process keeps its post-processing processes from slide to slide, as it keeps its predictor
    (`cached_workers`): three slides with `--num_workers 1` start one pool, the files are the sequential run's, a
    change of count replaces the processes and `forget_predictor` (the worker's teardown) ends them."""
    import wsi

    root, reference = study
    dask_predict.forget_predictor()
    started = []
    start = wsi.start_workers
    monkeypatch.setattr(wsi, "start_workers", lambda n: started.append(n) or start(n))
    out = tmp_path / "out"
    out.mkdir()
    args = main.build_parser().parse_args(predict_args(root, out, "--num_workers", "1"))
    options = predict.options_from_args(args)
    try:
        for name in SLIDES:
            outcome = dask_predict.predict_input(str(root / "in" / f"{name}.tif"), name, str(out), options,
                                                 predict.predict_one)
            assert outcome.status == "ok", outcome.error
        assert started == [1]
        held = dask_predict.cached_workers(1)
        pids = [p.pid for p in held.pool()._processes.values()]
        assert len(pids) == 1
        expected = result_files(reference)
        got = result_files(out)
        assert sorted(got) == sorted(expected)
        for name in expected:
            assert got[name] == expected[name], f"{name} differs from the sequential run"
        assert dask_predict.cached_workers(2) is not held and held._pool is None
        assert not any(Path(f"/proc/{p}").exists() for p in pids)   # the 1-process pool was shut down
        assert dask_predict.cached_workers(2) is dask_predict.cached_workers(2)
    finally:
        last = dask_predict.cached_workers(2)
        dask_predict.forget_predictor()
    assert last._pool is None


def test_two_workers_same_outputs_as_sequential(study, two_cores, tmp_path, capsys):
    """`--workers 2`: the 3 slides' files byte-identical to the sequential run, one line for the corrupt file,
    exit status 1; summary.csv in input order whatever worker did each slide."""
    root, reference = study
    capsys.readouterr()
    status = main.main(predict_args(root, tmp_path / "out", "--workers", "2"))
    captured = capsys.readouterr()
    assert status == 1
    skipped = [line for line in error_lines(captured.err) if line.endswith("(skipped)")]
    assert len(skipped) == 1 and "corrupt.tif" in skipped[0], captured.err
    assert "local Dask cluster: 2 worker process(es), CPU" in captured.out
    assert_same_results(tmp_path / "out", reference)
    config = utils.read_json(tmp_path / "out" / "predict_config.json")
    assert config["dask"] == {"workers": 2, "scheduler": None}


def kill_once_task(path: str, name: str, output_dir: str, options, segment):
    """A task that kills its own worker process (SIGKILL, as the OOM killer would) the first time it holds
    slide1, then works normally; importable on the workers (this module is on their sys.path)."""
    marker = Path(output_dir).parent / f"killed-{name}"
    if name == "slide1" and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return dask_predict.predict_input(path, name, output_dir, options, segment)


def test_killed_worker_redone(study, two_cores, tmp_path):
    """A worker process killed while it holds a slide: the slide is given to a live worker and the outputs are
    complete and identical to the sequential run."""
    root, reference = study
    args = main.build_parser().parse_args(predict_args(root, tmp_path / "out", "--workers", "2"))
    options = predict.options_from_args(args)
    inputs = predict.expand_inputs(args.input)
    names = predict.output_stems(inputs)
    (tmp_path / "out").mkdir()
    outcomes = dask_predict.run_inputs(inputs, names, tmp_path / "out", options, predict.predict_one, workers=2,
                                       task=kill_once_task,
                                       dashboard_address=None, progress=False)
    assert (tmp_path / "killed-slide1").is_file(), "the worker was not killed"
    assert {o.name: o.status for o in outcomes} == {"corrupt": "failed", **{n: "ok" for n in SLIDES}}
    assert [o.input for o in outcomes] == [str(p) for p in inputs]
    utils.write_csv(tmp_path / "out" / "summary.csv", [o.summary_row() for o in outcomes],
                    columns=predict.SUMMARY_COLUMNS)
    assert_same_results(tmp_path / "out", reference)


@pytest.fixture
def loopback_cluster(tmp_path):
    """A `dask scheduler` and one `dask worker` process on 127.0.0.1, started like a user would; yields the
    scheduler's address."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", DASK_DISTRIBUTED__WORKER__DAEMON="False")
    scheduler_file = tmp_path / "scheduler.json"
    logs = [open(tmp_path / "scheduler.log", "wb"), open(tmp_path / "worker.log", "wb")]
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", "0", "--dashboard-address", "127.0.0.1:0",
                                   "--scheduler-file", str(scheduler_file)], env=env, cwd=tmp_path,
                                  stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        # the scheduler writes its file in place: it may be there and still empty (or half written) for a moment
        deadline, address = time.time() + 60, None
        while address is None and time.time() < deadline:
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        assert address is not None, f"{scheduler_file}: no scheduler address after 60 s (see scheduler.log)"
        assert address.startswith("tcp://127.0.0.1:")
        # one CPU for the worker (as a Slurm job step would get): one torch thread, as the reference
        one_cpu = min(os.sched_getaffinity(0))
        processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                                           "--dashboard-address", "127.0.0.1:0"], env=env, cwd=PROJECT_DIR,
                                          stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu})))
        yield address
    finally:
        # each started in its own session: the group is the process and its children. Stopped as a user's Ctrl-C
        # or a job's end would (SIGTERM), so that they remove their named semaphores from /dev/shm (a SIGKILL of the
        # group, the resource tracker included, left 7 behind per run); SIGKILL only if one does not stop
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
        for log in logs:
            log.close()


def test_scheduler_address(study, tmp_path, loopback_cluster, capsys):
    """`--scheduler tcp://127.0.0.1:PORT`: an existing cluster does the work, same files, exit 1 for the
    corrupt file."""
    root, reference = study
    capsys.readouterr()
    status = main.main(predict_args(root, tmp_path / "out", "--scheduler", loopback_cluster))
    captured = capsys.readouterr()
    assert status == 1, captured.err
    assert f"Dask scheduler {loopback_cluster}" in captured.out
    assert "Dask dashboard: http://127.0.0.1:" in captured.out
    assert len([line for line in error_lines(captured.err) if line.endswith("(skipped)")]) == 1
    assert_same_results(tmp_path / "out", reference)


def test_flag_errors(tmp_path, capsys):
    """--workers with --scheduler, or a negative --workers: one line, exit 2, no output folder."""
    for extra in (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], ["--workers", "-1"]):
        capsys.readouterr()
        assert main.main(predict_args(tmp_path, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --workers"), err
        assert not (tmp_path / "out").exists()


def test_slurm_example_job_script(tmp_path):
    """examples/slurm_dask.py builds one-GPU worker jobs (nothing is submitted)."""
    pytest.importorskip("dask_jobqueue")
    sys.path.insert(0, str(PROJECT_DIR / "examples"))
    try:
        import slurm_dask
    finally:
        sys.path.remove(str(PROJECT_DIR / "examples"))
    args = slurm_dask.build_parser().parse_args(["--partition", "gpu", "--account", "lab", "--cpus_per_job", "6",
                                                 "--extra=--constraint=a100", "--interface", "lo",
                                                 "--log_dir", str(tmp_path)])
    cluster = slurm_dask.build_cluster(args)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --cpus-per-task=6", "#SBATCH --gres=gpu:1",
                 "#SBATCH --constraint=a100", "export DASK_DISTRIBUTED__WORKER__DAEMON=False",
                 f"export PYTHONPATH={PROJECT_DIR}"):
        assert line in script, script
    assert "--nthreads 1" in script and "tcp://127.0.0.1:" in script
