"""Tests of the command-line entry point (main.py)."""
from __future__ import annotations

import re

import main


def test_help_states_each_default_once():
    """An option whose help already names its default must not get a second '(default: None)'."""
    parser = main.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "predict" in a.choices)
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        assert not re.search(r"\(default[^()]*\) \(default:", text), name
    predict_help = " ".join(subparsers.choices["predict"].format_help().split())
    assert "(default: the model's training tile, 512) (default: None)" not in predict_help
    assert "--batch_size BATCH_SIZE windows per network call (default: the fastest per window on the device" in predict_help
    assert "raises throughput, probed once) (default:" not in predict_help


def test_os_error_on_a_user_path_is_one_line(tmp_path, capsys):
    """An output folder under a file (here for make_sample_data): `error: <path>: <problem>`, status 2."""
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "data"
    assert main.main(["-q", "make_sample_data", "--output_dir", str(target), "--num_images", "2",
                      "--image_size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {target}: {tmp_path / 'afile'} is a file, not a folder"], err


def test_log_lines_go_above_progress_bars_on_a_terminal(monkeypatch, tmp_path):
    """Issue 19: with bars on a terminal, a warning logged while a bar runs is written through tqdm (above the
    bar), not onto the bar's line; without a terminal (plain progress lines) logging is left as it is."""
    import logging
    import sys
    import types

    import main
    import utils

    seen = {}

    def run(args):
        seen["handlers"] = [type(h).__name__ for h in logging.getLogger().handlers]
        return 0

    fake = types.ModuleType("fake_command")
    fake.add_arguments = lambda parser: None
    fake.run = run
    monkeypatch.setitem(main.COMMANDS, "fake", ("fake_command", "a test command"))
    monkeypatch.setitem(sys.modules, "fake_command", fake)
    for mode, expect in (("bars", True), ("lines", False)):
        monkeypatch.setattr(utils, "configure_progress", lambda quiet, stream=None, m=mode: m)
        assert main.main(["fake"]) == 0
        assert ("_TqdmLoggingHandler" in seen["handlers"]) is expect, (mode, seen)
