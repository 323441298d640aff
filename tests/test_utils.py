"""Tests of the shared helpers in utils.py."""
import os
import stat

import pytest

import utils


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "result.json"
    utils.write_json(target, {"a": 1})
    utils.write_json(target, {"a": 2})
    assert utils.read_json(target) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_atomic_write_has_normal_permissions(tmp_path):
    target = utils.atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "t.csv"
    utils.write_csv(target, [{"a": 1}])

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        utils.write_csv(target, [{"a": Boom()}])
    assert utils.read_csv(target) == [{"a": "1"}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(utils.UserError, match="bad.json"):
        utils.read_json(bad)
    with pytest.raises(utils.UserError, match="missing.json: file not found"):
        utils.read_json(tmp_path / "missing.json")


def test_parse_list():
    assert utils.parse_list("2, 4,8", int) == [2, 4, 8]
    with pytest.raises(utils.UserError, match="--lora_ranks"):
        utils.parse_list("2,x", int, "--lora_ranks")


def test_make_output_dir(tmp_path):
    assert utils.make_output_dir(tmp_path / "a" / "b").is_dir()
    assert utils.make_output_dir(tmp_path / "a").is_dir()  # an existing folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(utils.UserError, match=r"^--output_dir .*file: exists and is not a folder$"):
        utils.make_output_dir(tmp_path / "file")
    with pytest.raises(utils.UserError, match=r"^--out .*sub: cannot create the folder"):
        utils.make_output_dir(tmp_path / "file" / "sub", option="--out")
