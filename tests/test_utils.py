"""Tests of the shared helpers in utils.py."""
import io
import os
import stat

from pathlib import Path

import numpy as np
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
    with pytest.raises(utils.UserError, match=r"^--out .*sub: .*file is a file, not a folder$"):
        utils.make_output_dir(tmp_path / "file" / "sub", option="--out")


# ----------------------------------------------------------------------------------------------
# Issue 19: progress output, output folders, unreadable checkpoints
# ----------------------------------------------------------------------------------------------
def _sample_data_stderr(tmp_path, *extra):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(utils.PROGRESS_ENV, None)
    done = subprocess.run([sys.executable, str(utils.PROJECT_DIR / "main.py"), *extra, "make_sample_data",
                           "--output_dir", str(tmp_path / f"d{len(extra)}"), "--num_images", "20", "--image_size",
                           "32"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_progress_in_a_log_is_plain_lines_and_quiet_has_none(tmp_path):
    """stderr to a file or pipe (a batch job's log): progress as plain lines, no carriage return or cursor
    code (tqdm's bars wrote both); -q: no progress at all (the bars still showed)."""
    err = _sample_data_stderr(tmp_path)
    assert "\r" not in err and "\x1b" not in err, repr(err[:300])
    progress = [line for line in err.splitlines() if line.startswith("sample images: ")]
    assert len(progress) == 1 and progress[0].startswith("sample images: 100% 20/20 ["), err  # a short bar: its end
    assert _sample_data_stderr(tmp_path, "-q") == ""


def test_progress_line_writer_turns_redraws_into_lines():
    import io

    from tqdm import tqdm

    sink = io.StringIO()
    writer = utils.ProgressLineWriter(sink, interval=0)  # every redraw may become a line
    writer.write("\rstep 1 ")
    writer.write("\rstep 1     ")  # the same status redrawn: not repeated
    writer.write("\x1b[A\rstep 2")
    writer.write("\r     ")  # a bar cleared on close: nothing
    writer.write("\r")
    assert sink.getvalue() == "step 1\nstep 2\n"
    sink = io.StringIO()
    writer = utils.ProgressLineWriter(sink, interval=1e9)  # a bar shorter than the interval ...
    for i in range(5):
        writer.write(f"\rbatch {i}, loss=0.{i}")  # set_postfix redraws every batch
    assert sink.getvalue() == ""
    writer.write("\n")  # ... that stays on screen: only its final state
    assert sink.getvalue() == "batch 4, loss=0.4\n"
    sink = io.StringIO()
    writer = utils.ProgressLineWriter(sink, interval=1e9)
    writer.write("\rvalidation 1/2")
    writer.write("\r              ")  # cleared on close (leave=False): nothing at all
    writer.write("\r")
    assert sink.getvalue() == ""
    before = os.environ.get(utils.PROGRESS_ENV)
    try:
        os.environ[utils.PROGRESS_ENV] = "lines"
        utils.configure_progress(False, stream=io.StringIO())  # not a terminal -> lines; installs the hook
        out = io.StringIO()
        for _ in tqdm(range(3), desc="work", file=out, disable=False):
            pass
        assert out.getvalue() == "work: 100% 3/3 [00:00<00:00, " + out.getvalue().split(", ", 1)[1], repr(out.getvalue())
        assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 1
        utils.configure_progress(True)
        out = io.StringIO()
        for _ in tqdm(range(3), desc="work", file=out, disable=False):  # -q wins over a call site's disable=False
            pass
        assert out.getvalue() == ""
    finally:
        if before is None:
            os.environ.pop(utils.PROGRESS_ENV, None)
        else:
            os.environ[utils.PROGRESS_ENV] = before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_folder_on_a_virtual_file_system_names_the_cause():
    with pytest.raises(utils.UserError) as info:
        utils.make_output_dir("/proc/nuclei_test/out")
    assert str(info.value) == ("--output_dir /proc/nuclei_test/out: /proc is on the kernel's virtual 'proc' file "
                               "system (/proc), where no folder can be created; choose a folder on a disk")


def test_unreadable_checkpoints_are_one_line_saying_what_is_wrong(tmp_path):
    import pickle

    import torch

    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(2)}, good)
    data = good.read_bytes()
    cases = {
        "empty.pth": (b"", "empty file (0 bytes)"),
        "truncated.pth": (data[: len(data) // 2], "truncated or damaged PyTorch checkpoint"),
        "page.pth": (b"<!DOCTYPE html><html>Not found</html>", "a web page or XML file, not a checkpoint"),
        "notes.pth": (b"hello\n", "a text file, not a checkpoint (starts with 'hello')"),
        "random.pth": (bytes(np.random.default_rng(0).integers(128, 256, 600, dtype=np.uint8)),
                       "not a PyTorch checkpoint (neither a zip archive nor a pickle"),
        "pickle.pth": (pickle.dumps({"x": {1, 2}}), "a Python pickle (or PyTorch's legacy format) that a safe load"),
    }
    buf = io.BytesIO()
    torch.save({"a": np.zeros(2)}, buf)
    cases["numpy.pth"] = (buf.getvalue(), "a PyTorch checkpoint holding Python objects (numpy.")
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(utils.UserError) as info:
            utils.load_torch_file(tmp_path / name, f"--model_path {tmp_path / name}")
        message = str(info.value)
        assert message.startswith(f"--model_path {tmp_path / name}: {expected}"), message
        assert "\n" not in message and "weights_only" not in message and len(message) < 300, message
    assert float(utils.load_torch_file(good)["a"].sum()) == 0.0


def test_process_pool_workers_leave_ctrl_c_to_the_main_process():
    """Ctrl-C reaches every process of the command: the pool's workers ignore it (no traceback of their own),
    the main process reports it once; this process keeps its own handler."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    with utils.process_pool(1) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before


def test_array_handoff_round_trip(tmp_path):
    """`ArrayHandoff.pack` writes arrays to one file in the given folder; `unpack_arrays` maps them back (same
    values and dtypes, None kept, empty arrays), writable copy-on-write; a released file is rewritten by a later
    `pack`; `close` deletes the files."""
    rng = np.random.default_rng(0)
    arrays = {"fg": rng.random((37, 41), dtype=np.float32), "hv": None,
              "rgb": rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)[:, ::-1],   # not contiguous
              "empty": np.zeros((0, 5), np.int64), "ids": np.arange(7, dtype=np.uint32)}
    handoff = utils.ArrayHandoff(tmp_path)
    packed = handoff.pack(arrays)
    assert packed is not None and Path(packed["file"]).parent.parent == tmp_path
    import pickle

    back = utils.unpack_arrays(pickle.loads(pickle.dumps(packed)))   # what a worker process gets
    assert back["hv"] is None and set(back) == set(arrays)
    for key, a in arrays.items():
        if a is not None:
            assert back[key].dtype == a.dtype and np.array_equal(back[key], a) and type(back[key]) is np.ndarray
    back["fg"][0, 0] = -1.0                  # copy-on-write: the file keeps its values
    assert utils.unpack_arrays(packed)["fg"][0, 0] == arrays["fg"][0, 0]
    # a released file is rewritten by the next pack (smaller, then larger than it: it grows), a new one made while
    # every file is in use; each description maps back to its own arrays
    handoff.release(packed)
    small = {"a": np.arange(10, dtype=np.int16)}
    again = handoff.pack(small)
    assert again["file"] == packed["file"]
    other = handoff.pack(arrays)
    assert other["file"] != again["file"]
    handoff.release(again)
    large = {"b": rng.random((90, 80)), "c": np.arange(5, dtype=np.uint8)}
    grown = handoff.pack(large)
    assert grown["file"] == again["file"] and Path(grown["file"]).stat().st_size >= large["b"].nbytes
    for desc, want in ((grown, large), (other, arrays)):
        got = utils.unpack_arrays(desc)
        assert all(np.array_equal(got[k], a) for k, a in want.items() if a is not None)
    assert len(list(Path(packed["file"]).parent.iterdir())) == 2
    handoff.release(grown)
    handoff.release(other)
    handoff.close()
    assert list(tmp_path.iterdir()) == [] and handoff.pack({"x": np.ones(3)}) is not None   # usable again
    handoff.close()
    assert list(tmp_path.iterdir()) == []


def test_array_handoff_falls_back_to_pickles(tmp_path, monkeypatch):
    """No such folder, too little room, or a write that fails (a RAM file system full): `pack` is None (the caller
    sends the arrays themselves), and after a failed write it stops trying; nothing is left."""
    assert utils.ArrayHandoff(tmp_path / "missing").pack({"a": np.ones(4)}) is None
    handoff = utils.ArrayHandoff(tmp_path)

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(utils.os, "statvfs", lambda path: Full)
    assert handoff.pack({"a": np.ones(4)}) is None and handoff.enabled
    monkeypatch.undo()
    real_write = utils.os.fdopen

    def failing(fd, mode):
        f = real_write(fd, mode)

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def seek(self, n):
                f.seek(n)

            def write(self, data):
                raise OSError(28, "No space left on device")
        return Writer()

    monkeypatch.setattr(utils.os, "fdopen", failing)
    assert handoff.pack({"a": np.ones(4)}) is None and not handoff.enabled
    monkeypatch.undo()
    assert handoff.pack({"a": np.ones(4)}) is None   # stopped trying
    handoff.close()
    assert list(tmp_path.iterdir()) == []


def test_environment_info_records_the_slide_readers_versions():
    """Which library decodes a slide's tiles depends on the installed readers: their versions are recorded, as the
    installed distributions say (without importing them)."""
    from importlib import metadata

    info = utils.environment_info()
    for dist in ("openslide-python", "openslide-bin", "tiffslide", "imagecodecs", "zarr", "connected-components-3d",
                 "numba"):
        try:
            expected = metadata.version(dist)
        except metadata.PackageNotFoundError:
            assert dist not in info
        else:
            assert info[dist] == expected
    assert info["tiffslide"] and info["numpy"]


def test_deflate_makes_zlib_streams_with_and_without_zlib_ng(monkeypatch):
    """`utils.deflate`: a zlib stream that zlib inflates back to the data (bytes, label arrays of both label
    dtypes, empty), at levels 1 and 6, through zlib-ng where imagecodecs has it and through zlib without it (then
    zlib's very bytes)."""
    import zlib

    rng = np.random.default_rng(0)
    labels = np.where(rng.random((300, 257)) < 0.7, 0, rng.integers(1, 60000, (300, 257)))
    data = [b"", b"nuclei" * 500, labels.astype(np.uint16), labels.astype(np.uint32), np.zeros((0, 0), np.uint16)]
    for zlib_ng in (True, False):
        if not zlib_ng:
            monkeypatch.setattr(utils, "_ZLIB_NG", False)
        elif utils.zlib_ng_encoder() is None:
            continue
        assert (utils.zlib_ng_encoder() is not None) == zlib_ng
        for item in data:
            raw = item.tobytes() if isinstance(item, np.ndarray) else item
            for level in (1, 6):
                packed = utils.deflate(item, level)
                assert isinstance(packed, bytes) and zlib.decompress(packed) == raw
                if not zlib_ng:
                    assert packed == zlib.compress(raw, level)


def test_freeze_startup_objects_leaves_them_out_of_later_collections():
    """`utils.freeze_startup_objects` (called by predict once its model is loaded and by each post-processing worker
    after its imports): the objects alive then are frozen (a full collection no longer traverses them), garbage
    made before it is collected first, and cycles made later are still collected. In a process of its own (the
    freeze is process-wide)."""
    import subprocess
    import sys

    code = (
        "import gc, sys, weakref\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import utils\n"
        "class Node: pass\n"
        "before = Node(); before.me = before; probe_before = weakref.ref(before); del before\n"
        "kept = [Node() for _ in range(1000)]\n"
        "utils.freeze_startup_objects()\n"
        "assert probe_before() is None, 'garbage frozen'\n"
        "assert gc.get_freeze_count() > 1000\n"
        "tracked = len(gc.get_objects())\n"
        "later = Node(); later.me = later; probe = weakref.ref(later); del later\n"
        "gc.collect()\n"
        "assert probe() is None, 'a later cycle was not collected'\n"
        "print(tracked)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 100   # what a full collection still traverses
