"""The README's exit-status rule for every command (issue 19, "done when"): a bad option value is exit status 2,
one line `error: ...` on stderr, no traceback, and nothing is written: run in an empty folder, the folder is
still empty afterwards, and the output folder the command was given does not exist. Each command runs in its
own process, as a user runs it; the bad values are ones the commands refuse before any work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time (what "unchanged" means)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        out[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Inputs outside the folder the commands run in: a small dataset, a file standing for a model, an image
    and an annotation folder."""
    import numpy as np
    from PIL import Image

    import sample_data

    root = tmp_path_factory.mktemp("exit_inputs")
    data = sample_data.make_sample_dataset(root / "data", num_images=4, seed=0, image_size=64)
    model = root / "model.pth"
    model.write_bytes(b"stands for a model; never read, the option check comes first")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "image.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "image.xml").write_text("<Annotations/>")
    return {"data": data, "model": model, "image": root / "image.png", "root": root}


def _cases(inputs: dict[str, Path]) -> dict[str, list[str]]:
    data, model, root = str(inputs["data"]), str(inputs["model"]), inputs["root"]
    return {
        "download": ["download", "--output_dir", "out", "--timeout", "0"],
        "make_sample_data": ["make_sample_data", "--output_dir", "out", "--image_size", "100000"],
        "train": ["train", "--data_dir", data, "--output_dir", "out", "--pretrained", "none", "--num_folds", "2",
                  "--tile_size", "100000"],
        "evaluate": ["evaluate", "--data_dir", data, "--model_path", model, "--output_dir", "out", "--mpp", "1e6"],
        "demo": ["demo", "--data_dir", data, "--model_path", model, "--output_dir", "out", "--num_samples", "0"],
        "parameter_search": ["parameter_search", "--data_dir", data, "--output_dir", "out", "--pretrained", "none",
                             "--num_folds", "2", "--sampler", "tpe"],
        "predict": ["predict", "--model_path", model, "--input", str(inputs["image"]), "--output_dir", "out",
                    "--tile_size", "100000"],
        "import_annotations": ["import_annotations", "--format", "imagescope_xml", "--images", str(root),
                               "--annotations", str(root / "annotations"), "--output_dir", "out", "--mpp", "-1"],
    }


def test_every_command_is_covered():
    import main

    assert set(_cases({"data": Path("d"), "model": Path("m"), "image": Path("i"), "root": Path("r")})) == \
        set(main.COMMANDS)


def test_a_bad_value_is_exit_2_one_line_and_nothing_written(inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("NUCLEI_PROGRESS", None)
    before_inputs = _tree(inputs["root"])
    procs = {}
    for name, argv in _cases(inputs).items():
        cwd = tmp_path / name
        cwd.mkdir()
        procs[name] = subprocess.Popen([sys.executable, str(PROJECT_DIR / "main.py"), *argv], cwd=cwd, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in err, (name, err)
        assert list((tmp_path / name).iterdir()) == [], (name, "wrote", list((tmp_path / name).iterdir()))
    assert _tree(inputs["root"]) == before_inputs  # the inputs are untouched too
