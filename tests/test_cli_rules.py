"""Issue 12, points 3, 4 and 7: data checked before anything is written, one exit-status rule and one-line
option errors for every command, flags the parameter search would override refused, one --amp spelling."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import main
import sample_data


@pytest.fixture
def small_data(tmp_path):
    return sample_data.make_sample_dataset(tmp_path / "data", num_images=4, seed=0, image_size=64)


def _train(data, out, *extra):
    return main.main(["-q", "train", "--data_dir", str(data), "--output_dir", str(out), "--pretrained", "none",
                      "--input_size", "64", "--epochs", "1", "--num_workers", "0", "--num_folds", "2", *extra])


def _break(sample, how):
    if how == "float label":
        tifffile.imwrite(sample.label_path, dataset.read_label_mask(sample.label_path).astype(np.float32))
    elif how == "rgb label":
        tifffile.imwrite(sample.label_path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    elif how == "label size":
        tifffile.imwrite(sample.label_path, np.zeros((32, 64), np.uint16))
    elif how == "truncated png":
        data = sample.image_path.read_bytes()
        sample.image_path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes png":  # issue 19: crashed in train.typical_tile_size before the data were checked
        sample.image_path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif how == "16-bit image":
        tifffile.imwrite(sample.image_path.with_suffix(".tif"), np.zeros((64, 64, 3), np.uint16), photometric="rgb")
        sample.image_path.unlink()
    return sample.label_path if "label" in how else sample.image_path


@pytest.mark.parametrize("how", ["float label", "rgb label", "label size", "truncated png", "random bytes png",
                                 "16-bit image"])
def test_train_checks_the_data_before_writing_anything(small_data, tmp_path, capsys, how):
    bad = _break(dataset.discover_nuinsseg(small_data)[-1], how)
    out = tmp_path / "run"
    assert _train(small_data, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad.with_suffix('')}"), err
    assert not out.exists()  # a plain rerun after fixing the data is not refused
    assert main.main(["-q", "parameter_search", "--data_dir", str(small_data), "--output_dir", str(out),
                      "--pretrained", "none", "--input_size", "64", "--lora_ranks", "2", "--lora_alphas", "2",
                      "--learning_rates", "1e-3", "--epochs", "1", "--num_folds", "2"]) == 2
    assert not out.exists()


def test_option_errors_are_one_line_with_a_help_pointer(capsys):
    for argv, line in (
            (["train", "--epochs", "abc"],
             "error: --epochs: invalid int value: 'abc' (see python main.py train --help)"),
            (["predict", "--model_path", "m.pth"],
             "error: --input: required (see python main.py predict --help)"),
            (["evaluate", "--data_dir", "d", "--model_path", "m", "--bogus"],
             "error: --bogus: unknown option (see python main.py evaluate --help)")):
        assert main.main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]


def test_predict_input_that_matches_nothing_is_a_usage_error(tmp_path, capsys):
    """No input exists at all: exit 2 before the model is loaded (a text file as model proves it is not
    read), nothing written, one line."""
    model = tmp_path / "model.pth"
    model.write_text("not a checkpoint")
    out = tmp_path / "out"
    assert main.main(["-q", "predict", "--model_path", str(model), "--input", str(tmp_path / "*.tif"),
                      str(tmp_path / "missing.png"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --input ") and "no image file found" in err[0]
    assert not out.exists()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    assert main.main(["-q", "predict", "--model_path", str(model), "--input", str(tmp_path / "a.png"),
                      "--output_dir", str(out), "--device", "cpu"]) == 2  # a text .pth: error, no folder
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()


@pytest.mark.parametrize("flag, value", [("--lora_rank", "8"), ("--learning_rate", "1e-3"), ("--fold", "1"),
                                         ("--lora_alpha", "8")])
def test_parameter_search_refuses_flags_it_would_override(small_data, tmp_path, capsys, flag, value):
    out = tmp_path / "search"
    assert main.main(["-q", "parameter_search", "--data_dir", str(small_data), "--output_dir", str(out),
                      "--pretrained", "none", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}: set by the parameter search") and not out.exists()


def test_amp_has_one_spelling_in_train_and_predict():
    parser = main.build_parser()
    for command in ("train", "predict"):
        sub = parser.command_parsers[command]
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--amp", "--no-amp"} <= options and "--no_amp" not in options, command


def test_exit_status_rule_through_main(tmp_path, monkeypatch, capsys):
    """0 done, 2 usage error before any work, 130 interrupted (1: tests/test_predict.py, a batch with bad inputs)."""
    args = ["-q", "make_sample_data", "--output_dir", str(tmp_path / "d"), "--num_images", "1", "--image_size", "32"]
    assert main.main(args) == 0
    assert main.main(["make_sample_data", "--num_images", "x"]) == 2
    assert main.main(["make_sample_data", "--threads", "0", "--output_dir", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_data, "run", interrupted)
    assert main.main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"


# ----------------------------------------------------------------------------------------------
# Issue 19: absurd values refused before anything is written, naming the option
# ----------------------------------------------------------------------------------------------
def _search(data, out, *extra):
    return main.main(["-q", "parameter_search", "--data_dir", str(data), "--output_dir", str(out), "--pretrained",
                      "none", "--input_size", "64", "--epochs", "1", "--num_folds", "2", "--lora_ranks", "2",
                      "--lora_alphas", "2", "--learning_rates", "1e-3", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--tile_size", "100000"], "error: --tile_size 100000: must be at most 8192 ("),
    (["--tile_size", "65"], "error: --tile_size 65: larger than every image (the largest side is 64 px); use at most 64"),
    (["--input_size", "8192"], "error: --input_size 8192: must be at most 4096 ("),
    (["--mpp", "1e-5"], "error: --mpp 1e-05: must be between 0.01 and 100 micrometres per pixel"),
    (["--batch_size", "100000"], "error: --batch_size 100000: must be at most 1024"),
    (["--lora_rank", "-1"], "error: --lora_rank -1: must be 0 (no LoRA) or a positive integer"),
])
def test_train_refuses_values_that_exhaust_memory_before_writing(small_data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _train(small_data, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()
    if "--lora_rank" not in extra:  # the search sets the rank itself
        assert _search(small_data, out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
        assert not out.exists()


def test_train_mpp_that_would_shrink_the_images_below_a_window(small_data, tmp_path, run_error):
    """The data's pixel size is known (dataset.json of the folders layout): --mpp 50 would make the 64-px
    images about 1 px; refused naming --mpp, before the output folder exists."""
    import json

    (small_data / "dataset.json").write_text(json.dumps({"mpp": 0.5}))
    folders = tmp_path / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "labels").mkdir()
    for s in dataset.discover_nuinsseg(small_data):
        (folders / "images" / s.image_path.name).write_bytes(s.image_path.read_bytes())
        (folders / "labels" / s.label_path.name).write_bytes(s.label_path.read_bytes())
    (folders / "dataset.json").write_text(json.dumps({"mpp": 0.5}))
    out = tmp_path / "run"
    line = run_error(["-q", "train", "--data_dir", str(folders), "--output_dir", str(out), "--pretrained", "none",
                      "--input_size", "64", "--num_folds", "2", "--mpp", "50"])
    assert line.startswith("error: --mpp 50: the images would be at most 1 px at the model's 50 µm/px"), line
    assert not out.exists()


def test_train_resume_with_overwrite_is_refused(small_data, tmp_path, run_error):
    out = tmp_path / "run"
    line = run_error(["-q", "train", "--data_dir", str(small_data), "--output_dir", str(out), "--resume",
                      "--overwrite"])
    assert line.startswith("error: --resume and --overwrite: choose one"), line
    assert not out.exists()


def test_train_pretrained_folder_says_folder(small_data, tmp_path, run_error):
    out = tmp_path / "run"
    line = run_error(["-q", "train", "--data_dir", str(small_data), "--output_dir", str(out), "--pretrained",
                      str(tmp_path), "--num_folds", "2", "--input_size", "64"])
    assert line.startswith(f"error: --pretrained {tmp_path}: is a folder, expected a file"), line
    assert not out.exists()


def test_predict_and_evaluate_upper_bounds(tmp_path, run_error):
    model = tmp_path / "model.pth"
    model.write_text("never read: the options are checked first")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    base = ["-q", "predict", "--model_path", str(model), "--input", str(image), "--output_dir", str(out)]
    for option, value, limit in (("--tile_size", "100000", 8192), ("--region_size", "1000000", 16384),
                                 ("--batch_size", "5000", 1024), ("--num_workers", "100000", 256),
                                 ("--read_threads", "1000", 256)):
        line = run_error(base + [option, value])
        assert line.startswith(f"error: {option} {value}: must be at most {limit}"), line
    line = run_error(base + ["--pretrained", str(tmp_path)])
    assert line == f"error: --pretrained {tmp_path}: is a folder, expected a file", line
    data = sample_data.make_sample_dataset(tmp_path / "data", num_images=2, seed=0, image_size=32)
    line = run_error(["-q", "evaluate", "--data_dir", str(data), "--model_path", str(model), "--output_dir",
                      str(out), "--mpp", "1e6"])
    assert line.startswith("error: --mpp 1e+06: must be between 0.01 and 100 micrometres per pixel"), line
    line = run_error(["-q", "make_sample_data", "--output_dir", str(out), "--image_size", "100000"])
    assert line.startswith("error: --image_size 100000: must be at most 8192"), line
    line = run_error(["-q", "make_sample_data", "--threads", "100000", "--output_dir", str(out)])
    assert line.startswith("error: --threads 100000: must be at most 1024"), line
    assert not out.exists()


def test_a_value_starting_with_minus_and_a_digit_is_a_value(tmp_path, run_error):
    """argparse took `-1,0` for an option ("expected one argument"); now the command's own check answers."""
    line = run_error(["parameter_search", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                      "--lora_ranks", "-1,0"])
    assert line == "error: --lora_ranks -1: must be 0 (no LoRA) or a positive integer", line
    line = run_error(["parameter_search", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                      "--learning_rates", "-1e-3,1e-3"])
    assert line.startswith("error: --learning_rates -0.001: values must be positive"), line
    line = run_error(["train", "--data_dir", str(tmp_path), "--epochs", "-q"])  # an option is still an option
    assert line.startswith("error: --epochs: expected one argument"), line
