"""CPU threads: usable cores from affinity and cgroup quota, --threads / OMP_NUM_THREADS, the OpenMP wait policy
set before torch loads (issue 12, point 1; the speed figure is bench/bench_threads.py, docs/benchmarks.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import main
import utils

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_quota_smallest_of_the_hierarchy(tmp_path):
    _tree(tmp_path, {"proc": "0::/slice/job\n", "fs/slice/job/cpu.max": "max 100000\n",
                     "fs/slice/cpu.max": "150000 100000\n", "fs/cpu.max": "max 100000\n"})
    assert utils.cgroup_cpu_limit(str(tmp_path / "proc"), str(tmp_path / "fs")) == pytest.approx(1.5)


def test_cgroup_v2_without_quota_and_container_paths(tmp_path):
    # in a container the host path in /proc/self/cgroup does not exist: the mount's own files are read
    _tree(tmp_path, {"proc": "0::/host/path/not/here\n", "fs/cpu.max": "200000 100000\n"})
    assert utils.cgroup_cpu_limit(str(tmp_path / "proc"), str(tmp_path / "fs")) == pytest.approx(2.0)
    _tree(tmp_path, {"fs/cpu.max": "max 100000\n"})
    assert utils.cgroup_cpu_limit(str(tmp_path / "proc"), str(tmp_path / "fs")) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    _tree(tmp_path, {"proc": "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
                     "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                     "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert utils.cgroup_cpu_limit(str(tmp_path / "proc"), str(tmp_path / "fs")) == pytest.approx(2.5)
    (tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert utils.cgroup_cpu_limit(str(tmp_path / "proc"), str(tmp_path / "fs")) is None


def test_usable_cores_is_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: 2.5)
    assert utils.usable_cores() == 3
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: None)
    assert utils.usable_cores() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(utils, "cgroup_cpu_limit", lambda: 8.0)
    assert utils.usable_cores() == 2


def test_threads_option_then_omp_num_threads_then_cores_shared_among_processes():
    assert utils.resolve_threads(5, 4, env_value="3", cores=8) == 5
    assert utils.resolve_threads(None, 4, env_value="3", cores=8) == 3
    assert utils.resolve_threads(None, 1, env_value=None, cores=8) == 8
    assert utils.resolve_threads(None, 3, env_value=None, cores=8) == 2
    assert utils.resolve_threads(None, 5, env_value="", cores=2) == 1
    with pytest.raises(utils.UserError, match="--threads 0"):
        utils.resolve_threads(0)


def test_children_get_their_share_through_the_environment(monkeypatch):
    import torch

    for name in utils.THREAD_ENV_VARS:
        monkeypatch.setenv(name, "99")  # restored after the test
    monkeypatch.setattr(utils, "USER_OMP_NUM_THREADS", None)
    monkeypatch.setattr(utils, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        assert utils.configure_threads(None, workers=1) == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
        assert utils.configure_threads(1, workers=3) == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_every_command_has_threads_and_quiet_after_its_name():
    parser = main.build_parser()
    for name, sub in parser.command_parsers.items():
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--threads", "-q", "--quiet"} <= options, name
    assert parser.parse_args(["make_sample_data", "--threads", "3", "-q"]).quiet
    assert parser.parse_args(["make_sample_data", "--threads", "3"]).threads == 3
    assert not parser.parse_args(["make_sample_data"]).quiet
    assert parser.parse_args(["-q", "make_sample_data"]).quiet


def _run_fresh(code: str, extra_env: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_thread_setup_happens_before_torch_loads():
    """main sets the wait policy and the thread count before the command modules import torch (the OpenMP
    runtime reads them once, when it loads); a user's own wait policy is kept."""
    code = ("import sys, os, main; main.preset_environment(['train', '--threads', '1']); "
            "assert 'torch' not in sys.modules; main.build_parser(); import torch; "
            "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])")
    assert _run_fresh(code) == ["1", "PASSIVE", "0"]
    assert _run_fresh(code, {"OMP_WAIT_POLICY": "ACTIVE"})[1] == "ACTIVE"
    code = ("import os, main, utils; main.preset_environment(['train']); "
            "print(os.environ['OMP_NUM_THREADS'], utils.usable_cores())")
    threads, cores = _run_fresh(code)
    assert threads == cores
    assert _run_fresh(code, {"OMP_NUM_THREADS": "1"})[0] == "1"
