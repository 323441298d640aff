"""Shared test fixtures: paths to the shared reference data and a small synthetic NuInsSeg dataset."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N runs N worker processes: one torch thread each, or they oversubscribe the cores; also for the
    # commands the tests run through main.main (which share the cores by OMP_NUM_THREADS, read when utils loads)
    # and for the processes they start
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

SHARED_DIR = Path(os.environ.get("NUCLEI_SHARED_DIR", PROJECT_DIR.parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference" / "mobile_sam"
REAL_SAMPLE_DIR = SHARED_DIR / "data" / "nuinsseg_sample"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "mobile_sam_random_weights.pt").is_file():
        pytest.skip(f"MobileSAM reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    if not REAL_SAMPLE_DIR.is_dir():
        pytest.skip(f"real NuInsSeg sample not found at {REAL_SAMPLE_DIR}")
    return REAL_SAMPLE_DIR


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the NuInsSeg layout (made once per test session)."""
    import sample_data

    out = tmp_path_factory.mktemp("synthetic_nuinsseg")
    sample_data.make_sample_dataset(out, num_images=12, seed=0, image_size=128)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's training/inference tests (also in a serial run): faster on small
    machines, where several threads per process oversubscribe the cores. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_error(capsys):
    """`run_error(argv)` runs `main.main(argv)`, checks exit status 2 and exactly one line `error: ...` on
    stderr (the project's rule for usage and input errors) and returns that line."""
    import main

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        code = main.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run


@pytest.fixture
def report(record_property):
    """`report("text")` shows a measured figure in the test run's summary (also under pytest-xdist)."""
    return lambda text: record_property("report", text)


def pytest_terminal_summary(terminalreporter):
    lines = [f"{rep.nodeid.split('::')[-1]}: {value}"
             for rep in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
             if rep.when == "call" for key, value in rep.user_properties if key == "report"]
    if lines:
        terminalreporter.section("measured figures")
        for line in sorted(lines):
            terminalreporter.write_line(line)
