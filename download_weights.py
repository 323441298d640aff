"""Download the official MobileSAM weights (`mobile_sam.pt`) and verify them.

The file is streamed into a temporary file next to the destination and renamed to `mobile_sam.pt`
only after its content has been checked, so a failed, truncated or corrupted download never leaves a
file (or a half-written one) behind, and an existing good file is never replaced by a bad one.
By default the check is the file's git blob id in the official MobileSAM repository
(sha1 of b"blob <size>\\0" + content, what `git hash-object mobile_sam.pt` prints). With `--sha1` the
file's plain SHA-1 is checked instead; `--no_verify` skips the check (not recommended).
Without internet access, place the file by hand: see docs/download.md.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

import utils
from utils import UserError

log = logging.getLogger(__name__)

DEFAULT_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
OFFICIAL_GIT_BLOB = "7ef2d090979fd9853adf17b7a99c8b94a1c5a6a7"
WEIGHTS_FILENAME = "mobile_sam.pt"
DEFAULT_TIMEOUT = 60.0
CHUNK_SIZE = 1 << 20

_HEX40 = re.compile(r"[0-9a-fA-F]{40}")


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------
def _hash_file(path: Path, digest: "hashlib._Hash") -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha1(path: str | os.PathLike) -> str:
    """Plain SHA-1 of the file's bytes (what `sha1sum` prints)."""
    return _hash_file(Path(path), hashlib.sha1())


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The file's git blob id: sha1(b"blob <size>\\0" + content), what `git hash-object <path>` prints."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    return _hash_file(path, digest)


def _normalise_hex(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not _HEX40.fullmatch(value):
        raise UserError(f"{what} {value!r}: expected 40 hexadecimal digits (a SHA-1)")
    return value


def verify_file(path: str | os.PathLike, expected_sha1: str | None = None,
                expected_git_blob: str | None = None) -> str:
    """Check the file against the given checksums; raise UserError naming the file on a mismatch.

    Returns a short description of what was checked ("git blob id 7ef2d09... matches", or
    "not verified" when no checksum was given).
    """
    path = Path(path)
    expected_sha1 = _normalise_hex(expected_sha1, "expected SHA-1")
    expected_git_blob = _normalise_hex(expected_git_blob, "expected git blob id")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    checked = []
    if expected_git_blob is not None:
        actual = git_blob_sha1(path)
        if actual != expected_git_blob:
            raise UserError(f"{path}: git blob id is {actual}, expected {expected_git_blob} "
                            f"(corrupted, incomplete or a different file)")
        checked.append(f"git blob id {actual} matches")
    if expected_sha1 is not None:
        actual = file_sha1(path)
        if actual != expected_sha1:
            raise UserError(f"{path}: SHA-1 is {actual}, expected {expected_sha1} "
                            f"(corrupted, incomplete or a different file)")
        checked.append(f"SHA-1 {actual} matches")
    return ", ".join(checked) if checked else "not verified"


def _check_command(path: Path, expected_sha1: str | None, expected_git_blob: str | None) -> str:
    """How a person checks a hand-placed file (one line)."""
    if expected_git_blob:
        return f"`git hash-object {path}` must print {expected_git_blob}"
    if expected_sha1:
        return f"`sha1sum {path}` must print {expected_sha1}"
    return "no checksum was requested"


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------
def download_file(url: str, destination: str | os.PathLike, expected_sha1: str | None = None,
                  expected_git_blob: str | None = None, force: bool = False,
                  timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download `url` to `destination`, verified against the given checksums; returns the path.

    Without `force`, an existing destination that passes the checks is kept (no download) and one that
    fails them raises UserError (use force). With `force`, or when the file is absent, the content is
    streamed into a temporary file in the destination folder, checked (byte count against
    Content-Length, then the checksums) and renamed over the destination; on any failure the temporary
    file is removed and an existing destination is left untouched.
    """
    destination = Path(destination)
    expected_sha1 = _normalise_hex(expected_sha1, "expected SHA-1")
    expected_git_blob = _normalise_hex(expected_git_blob, "expected git blob id")
    if destination.is_dir():
        raise UserError(f"{destination}: is a folder, expected a file path")
    if destination.exists() and not force:
        try:
            result = verify_file(destination, expected_sha1, expected_git_blob)
        except UserError as e:
            raise UserError(f"{e}; use --force to download it again") from None
        log.info("%s already present (%s); use --force to download it again", destination, result)
        return destination

    # folders this call creates; removed again (when empty) if the download fails: no empty folder is left
    created = [p for p in (destination.parent, *destination.parent.parents) if not p.exists()]
    done = False
    try:
        tmp = utils.temp_file_beside(destination, suffix=".part")
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"{destination.parent}: {utils.output_dir_problem(destination.parent, e)}") from None
    try:
        with open(tmp, "wb") as out:
            _stream(url, out, destination, expected_sha1, expected_git_blob, timeout)
            out.flush()
            os.fsync(out.fileno())
        if tmp.stat().st_size == 0:
            raise UserError(f"{url}: the server sent an empty file; nothing was written to {destination}")
        try:
            verify_file(tmp, expected_sha1, expected_git_blob)
        except UserError as e:
            detail = str(e).split(": ", 1)[1]
            raise UserError(f"{url}: downloaded file rejected: {detail}; nothing was written to "
                            f"{destination}") from None
        os.replace(tmp, destination)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty(created)
    return destination


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _stream(url: str, out, destination: Path, expected_sha1: str | None,
            expected_git_blob: str | None, timeout: float) -> None:
    """Copy the response body of `url` into the open file `out`, with a progress bar."""
    hand = (f"without internet access, download {url} on another computer, copy it to {destination} "
            f"and check it: {_check_command(destination, expected_sha1, expected_git_blob)} "
            f"(see docs/download.md)")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "nuclei-sam-download/1.0"})
    except ValueError:
        raise UserError(f"--url {url}: not a valid download address (expected https://...)") from None
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: server answered HTTP {e.code} ({e.reason}); check --url, or "
                        f"{hand}") from None
    except urllib.error.URLError as e:
        raise UserError(f"{url}: cannot connect ({_reason(e.reason)}); {hand}") from None
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"{url}: cannot connect ({_reason(e)}); {hand}") from None
    except ValueError as e:
        raise UserError(f"--url {url}: not a valid download address ({e})") from None

    with response:
        length_header = response.headers.get("Content-Length")
        try:
            total = int(length_header) if length_header is not None else None
        except ValueError:
            total = None
        log.info("downloading %s -> %s", url, destination)
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=destination.name, leave=False) as bar:
            try:
                while True:
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, http.client.IncompleteRead):
                    received += len(e.partial)
                raise UserError(f"{url}: download interrupted after {received} bytes "
                                f"({_reason(e)}); nothing was written to {destination}; try again, "
                                f"or {hand}") from None
    if total is not None and received != total:
        raise UserError(f"{url}: download incomplete: received {received} of {total} bytes "
                        f"(connection closed early); nothing was written to {destination}; try again")


def _reason(error: object) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"host name not resolved: {error.strerror or error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text or type(error).__name__


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="weights",
                        help=f"folder for {WEIGHTS_FILENAME} (created if missing)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="download address (e.g. a mirror); the official git blob id is still "
                             "checked unless --sha1 or --no_verify is given")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--sha1", metavar="HEX", default=None,
                       help="expected plain SHA-1 of the file (sha1sum); replaces the official "
                            "git blob id check")
    check.add_argument("--no_verify", action="store_true",
                       help="do not check the content (only the byte count); not recommended")
    parser.add_argument("--force", action="store_true",
                        help="download again even if a verified file is already there")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="network timeout in seconds (connecting and each read)")


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout}: must be positive")
    expected_sha1 = _normalise_hex(args.sha1, "--sha1")
    expected_git_blob = None if (args.no_verify or expected_sha1) else OFFICIAL_GIT_BLOB
    if args.no_verify:
        log.warning("--no_verify: the downloaded file's content is not checked")
    destination = Path(args.output_dir) / WEIGHTS_FILENAME
    existed = destination.is_file()
    path = download_file(args.url, destination, expected_sha1=expected_sha1,
                         expected_git_blob=expected_git_blob, force=args.force, timeout=args.timeout)
    result = verify_file(path, expected_sha1, expected_git_blob)
    action = "kept existing file" if existed and not args.force else "downloaded"
    print(f"MobileSAM weights: {path.resolve()} ({action}, {path.stat().st_size} bytes, {result})")
    return 0
