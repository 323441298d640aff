"""Tests of download_weights.py against a local HTTP server on 127.0.0.1 (no internet needed)."""
from __future__ import annotations

import hashlib
import os
import stat
import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import download_weights as dw
import main
from utils import UserError

PAYLOAD = bytes(range(256)) * 4000 + b"end"  # ~1 MB, a little over one read chunk


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /good, /nolength (no Content-Length, body ends at close), /truncated (announces more
    bytes than it sends), /stall (sends part of the body, then waits), /slow (waits before answering);
    anything else is 404."""

    protocol_version = "HTTP/1.1"
    body = PAYLOAD

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        if route == "/good":
            self._send(self.body, len(self.body))
        elif route == "/nolength":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(self.body)
            self.close_connection = True
        elif route == "/truncated":
            self._send(self.body[: len(self.body) // 2], len(self.body))
            self.close_connection = True
        elif route == "/stall":
            self._send(self.body[:1000], len(self.body))
            self.wfile.flush()
            time.sleep(1.5)
            self.close_connection = True
        elif route == "/slow":
            time.sleep(1.5)
            self._send(self.body, len(self.body))
        else:
            self.send_error(404, "Not Found")

    def _send(self, data: bytes, announced: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mobile_sam.pt"


def leftovers(folder: Path) -> list[str]:
    """Everything in `folder` except the destination itself (temporary files must not remain)."""
    return sorted(p.name for p in folder.iterdir() if p.name != "mobile_sam.pt")


def error_line(err: str) -> str:
    """The single `error: ...` line of stderr (a progress bar drawn before it uses carriage returns)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert err.count("error:") == 1 and lines and lines[-1].startswith("error: "), err
    return lines[-1]


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    rc = main.main(["download", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------
def test_git_blob_sha1_formula(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello world\n")
    # Known value: `echo 'hello world' | git hash-object --stdin`.
    assert dw.git_blob_sha1(path) == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
    assert dw.file_sha1(path) == hashlib.sha1(b"hello world\n").hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert dw.git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_blob_sha1_matches_git_hash_object(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(PAYLOAD)
    out = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert dw.git_blob_sha1(path) == out.stdout.strip() == blob_id(PAYLOAD)


def test_verify_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(PAYLOAD)
    assert "matches" in dw.verify_file(path, expected_git_blob=blob_id(PAYLOAD).upper())
    assert "matches" in dw.verify_file(path, expected_sha1=hashlib.sha1(PAYLOAD).hexdigest())
    assert dw.verify_file(path) == "not verified"
    with pytest.raises(UserError, match="git blob id"):
        dw.verify_file(path, expected_git_blob=dw.OFFICIAL_GIT_BLOB)
    with pytest.raises(UserError, match="SHA-1"):
        dw.verify_file(path, expected_sha1="0" * 40)
    with pytest.raises(UserError, match="40 hexadecimal"):
        dw.verify_file(path, expected_sha1="abc")
    with pytest.raises(UserError, match="not found"):
        dw.verify_file(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------
# download_file
# ----------------------------------------------------------------------------------------------
def test_good_download(server, tmp_path):
    dest = tmp_path / "weights" / "mobile_sam.pt"
    path = dw.download_file(f"{server}/good", dest, expected_git_blob=blob_id(PAYLOAD))
    assert path == dest and dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask  # readable like any file, not owner-only


def test_download_without_content_length(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    dw.download_file(f"{server}/nolength", dest, expected_sha1=hashlib.sha1(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []


def test_truncated_download_leaves_nothing(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError, match="incomplete") as info:
        dw.download_file(f"{server}/truncated", dest, expected_git_blob=blob_id(PAYLOAD))
    assert "\n" not in str(info.value)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_truncated_download_detected_even_without_checksum(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError, match="incomplete"):
        dw.download_file(f"{server}/truncated", dest)
    assert list(tmp_path.iterdir()) == []


def test_wrong_content_rejected(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError, match="git blob id") as info:
        dw.download_file(f"{server}/good", dest, expected_git_blob=dw.OFFICIAL_GIT_BLOB)
    assert "nothing was written" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="SHA-1"):
        dw.download_file(f"{server}/good", dest, expected_sha1="1" * 40)
    assert list(tmp_path.iterdir()) == []


def test_http_404(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError, match="HTTP 404"):
        dw.download_file(f"{server}/missing.pt", dest, expected_git_blob=blob_id(PAYLOAD))
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_explains_hand_placement(closed_port_url, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError) as info:
        dw.download_file(closed_port_url, dest, expected_git_blob=dw.OFFICIAL_GIT_BLOB)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot connect" in message
    assert closed_port_url in message and str(dest) in message
    assert f"git hash-object {dest}" in message and dw.OFFICIAL_GIT_BLOB in message
    assert list(tmp_path.iterdir()) == []


def test_timeouts(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    with pytest.raises(UserError, match="timed out") as info:
        dw.download_file(f"{server}/slow", dest, timeout=0.3)
    assert "git hash-object" not in str(info.value)  # no checksum requested: none to suggest
    with pytest.raises(UserError, match="interrupted.*timed out"):
        dw.download_file(f"{server}/stall", dest, expected_git_blob=blob_id(PAYLOAD), timeout=0.3)
    assert list(tmp_path.iterdir()) == []


def test_existing_good_file_kept_on_failed_redownload(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    dw.download_file(f"{server}/good", dest, expected_git_blob=blob_id(PAYLOAD))
    before = dest.stat().st_mtime_ns
    for route in ("truncated", "missing", "good"):  # /good with the wrong checksum = corrupted
        with pytest.raises(UserError):
            dw.download_file(f"{server}/{route}", dest, expected_git_blob=blob_id(PAYLOAD[:-1]),
                             force=True)
        assert dest.read_bytes() == PAYLOAD and dest.stat().st_mtime_ns == before
        assert leftovers(tmp_path) == []


def test_existing_file_verified_kept_or_refused(server, tmp_path):
    dest = tmp_path / "mobile_sam.pt"
    dest.write_bytes(PAYLOAD)
    # Verified and kept without contacting the server (the URL does not even exist).
    assert dw.download_file(f"{server}/missing", dest, expected_git_blob=blob_id(PAYLOAD)) == dest
    dest.write_bytes(b"junk")
    with pytest.raises(UserError, match="--force"):
        dw.download_file(f"{server}/good", dest, expected_git_blob=blob_id(PAYLOAD))
    assert dest.read_bytes() == b"junk"
    dw.download_file(f"{server}/good", dest, expected_git_blob=blob_id(PAYLOAD), force=True)
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def test_cli_download_with_sha1_and_reuse(server, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "weights"
    sha1 = hashlib.sha1(PAYLOAD).hexdigest()
    rc, out, err = run_cli(monkeypatch, capsys, "--output_dir", str(out_dir), "--url", f"{server}/good",
                           "--sha1", sha1)
    assert rc == 0
    dest = out_dir / "mobile_sam.pt"
    assert dest.read_bytes() == PAYLOAD
    assert str(dest.resolve()) in out and "downloaded" in out and "SHA-1" in out
    rc, out, _ = run_cli(monkeypatch, capsys, "--output_dir", str(out_dir), "--url", f"{server}/good",
                         "--sha1", sha1)
    assert rc == 0 and "kept existing file" in out


def test_cli_custom_url_still_checks_official_blob(server, tmp_path, monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", f"{server}/good")
    assert rc == 2
    assert dw.OFFICIAL_GIT_BLOB in error_line(err)
    assert list(tmp_path.iterdir()) == []
    rc, out, err = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", f"{server}/good",
                           "--no_verify")
    assert rc == 0 and (tmp_path / "mobile_sam.pt").read_bytes() == PAYLOAD and "not verified" in out


def test_cli_existing_bad_file_needs_force(server, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "mobile_sam.pt"
    dest.write_bytes(b"partial")
    sha1 = hashlib.sha1(PAYLOAD).hexdigest()
    rc, _, err = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", f"{server}/good",
                         "--sha1", sha1)
    assert rc == 2 and "--force" in error_line(err)
    assert dest.read_bytes() == b"partial"
    rc, out, _ = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", f"{server}/good",
                         "--sha1", sha1, "--force")
    assert rc == 0 and dest.read_bytes() == PAYLOAD


def test_cli_offline_one_line_error(closed_port_url, tmp_path, monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", closed_port_url,
                           "--timeout", "5")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1  # fails before any progress bar
    line = error_line(err)
    assert "git hash-object" in line and str(tmp_path / "mobile_sam.pt") in line


@pytest.mark.parametrize("argv, message", [
    (["--sha1", "xyz"], "--sha1"),
    (["--timeout", "0"], "--timeout"),
    (["--url", "not a url"], "--url"),
])
def test_cli_bad_options(tmp_path, monkeypatch, capsys, argv, message):
    rc, _, err = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), *argv)
    assert rc == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


def test_failed_download_leaves_no_empty_output_folder(closed_port_url, tmp_path, monkeypatch, capsys):
    """Issue 12, point 3: a failed download removes the folders it created (and only those)."""
    target = tmp_path / "new" / "weights"
    rc, _, err = run_cli(monkeypatch, capsys, "--output_dir", str(target), "--url", closed_port_url, "--timeout", "5")
    assert rc == 2 and err.startswith("error: ")
    assert not (tmp_path / "new").exists()
    rc, _, _ = run_cli(monkeypatch, capsys, "--output_dir", str(tmp_path), "--url", closed_port_url, "--timeout", "5")
    assert rc == 2 and tmp_path.is_dir()  # a folder that was there before stays
