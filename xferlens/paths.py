"""Where xferlens keeps its cache, and how it writes there without leaving half files.

Three guarantees live here:

* **Staging.** Everything is written in a folder under ``tmp/`` and renamed into place
  when complete (:func:`staging_dir`, :func:`publish_dir`). Each staging folder holds a
  lock its owner keeps while alive, so the next job can tell a dead job's leftovers from
  a running one's and remove them (:func:`clean_staging`): ``tmp/`` does not fill up.
* **Locks.** Jobs that write the same cache entry take :func:`cache_lock` first (an
  ``fcntl.flock`` on ``locks/<key>.lock``), so two pulls of one model never share or delete
  each other's files. The kernel drops the lock when its process dies.
* **File records.** :func:`record_files` notes the size, mtime, ctime, inode and sha256 of
  every file a folder was written with; :func:`check_files` compares a folder with its
  record, reading file bytes only when asked to or when a ``stat`` field differs from the
  record (an edit, even one whose mtime was set back, changes the ctime; a copy changes
  the inode).
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_HOME = "XFERLENS_HOME"
STAGE_LOCK = ".xferlens-stage.lock"  # inside each staging folder; its owner holds it
#: A staging folder that is not locked by a live owner is removed once older than this.
STALE_AFTER_S = 3600.0


def home(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$XFERLENS_HOME``, else ``~/.cache/xferlens``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "xferlens"


# ------------------------------------------------------------------------------ locks


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def cache_lock(root: Path, key: str) -> Iterator[Path]:
    """Hold the exclusive lock ``root/locks/<key>.lock`` (waits for other holders).

    Works across threads and processes on one machine: each call opens the file anew, and
    ``flock`` locks belong to the open file. Logs once when it has to wait.
    """
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            logger.info("waiting for %s (another job is writing %s)", path, key)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------- staging


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(entry: Path, now: float, stale_after_s: float) -> bool:
    """True when ``entry`` (a folder or file under tmp/) belongs to no running job."""
    try:
        age = now - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    lock = entry / STAGE_LOCK
    if not entry.is_dir() or entry.is_symlink() or not lock.is_file():
        return age > stale_after_s  # made before staging folders carried a lock
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        if not _try_lock(fd):
            return False  # its owner is alive and holds it
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    pid = int(text) if text.isdigit() else None
    if pid is not None and not _pid_alive(pid):
        return True
    # no pid written yet, or the pid was reused (or lives on another machine): go by age
    return age > stale_after_s


def clean_staging(root: Path, *, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the staging folders under ``root/tmp`` left by jobs that died; return them.

    A folder is left by a dead job when no process holds its lock and its owner's pid is
    gone, or when it is older than ``stale_after_s`` and nobody holds its lock.
    """
    tmp_root = root / "tmp"
    if not tmp_root.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in sorted(tmp_root.iterdir()):
        if _stale(entry, now, stale_after_s):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d staging folder(s) left by dead jobs in %s", len(removed), tmp_root)
    return removed


def claim_stage(path: Path) -> int:
    """Mark a staging folder as this live process's: lock ``STAGE_LOCK`` inside it and write
    the pid. Returns the descriptor; the lock lasts until it is closed or the process dies."""
    fd = os.open(path / STAGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    return fd


def clean_dead_stages(parent: Path, pattern: str, *, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the folders in ``parent`` matching ``pattern`` that a dead job left (same rule
    as :func:`clean_staging`); return them."""
    now = time.time()
    removed = []
    for entry in sorted(parent.glob(pattern)):
        if entry.is_dir() and not entry.is_symlink() and _stale(entry, now, stale_after_s):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d staging folder(s) left by dead jobs in %s", len(removed), parent)
    return removed


@contextlib.contextmanager
def staging_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder inside ``root/tmp`` (same filesystem, so a final rename is atomic).

    Removed on exit whatever happens, so an interrupted job leaves nothing a later run
    could take for a finished result; a job killed outright leaves a folder that the next
    :func:`staging_dir` call removes (see :func:`clean_staging`).
    """
    tmp_root = root / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    clean_staging(root)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
    fd = os.open(path / STAGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def publish_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place in one rename.

    If ``dest`` already exists (another process finished first, or a forced redo), the old
    one is moved aside first and removed after, so readers never see a mix of the two.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=dest.name + ".old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------- file records


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(block):
            digest.update(b)
    return digest.hexdigest()


#: The ``stat`` fields a file record keeps; a file whose fields all still match is trusted
#: unread. ``ctime_ns`` cannot be set back by a program (``os.utime`` sets it to now), and
#: ``ino`` changes when a file is copied or replaced, so restoring an edited file's mtime
#: or copying a corrupted file with its mtime kept still leads to a re-hash.
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


def _stat_fields(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def file_record(path: Path) -> dict:
    """``{"size", "mtime_ns", "ctime_ns", "ino", "sha256"}`` of one file (reads it whole)."""
    before = path.stat()
    sha = sha256_file(path)
    after = path.stat()
    if _stat_fields(after) != _stat_fields(before):
        raise RuntimeError(f"{path} changed while it was being hashed")
    return {**_stat_fields(before), "sha256": sha}


def record_files(folder: Path, *, skip: Iterable[str] = ()) -> dict[str, dict]:
    """A record of every regular file directly in ``folder`` except the names in ``skip``.

    Keys are file names; values as :func:`file_record`. Staging locks and hidden files
    are left out.
    """
    return {p.name: file_record(p) for p in _listed(folder, set(skip))}


@dataclass(frozen=True)
class FileProblem:
    """One way a folder differs from its record."""

    name: str
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


def _listed(folder: Path, skip: set[str]) -> list[Path]:
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.name not in skip and not p.name.startswith(".")
    ]


def check_files(
    folder: Path, record: dict[str, dict], *, full: bool = False, skip: Iterable[str] = ()
) -> tuple[list[FileProblem], dict[str, dict]]:
    """Compare the files in ``folder`` with ``record``; return (problems, updated record).

    Fast path: a file whose size, mtime, ctime and inode all equal the record's is trusted
    unread. It is hashed when ``full`` is true or when any of those differ (a different
    size is a problem at once). A file whose hash still matches gets its new ``stat``
    fields in the updated record, so the next check is fast again. A file in the folder
    that the record does not list (other than the names in ``skip``, hidden files and
    ``*.tmp``) is a problem too: loaders read every weight and tokenizer file they find.
    """
    skip = set(skip)
    problems: list[FileProblem] = []
    updated = {k: dict(v) for k, v in record.items()}
    for name, want in record.items():
        path = folder / name
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(FileProblem(name, path, "missing (the record lists it)"))
            continue
        if st.st_size != want["size"]:
            problems.append(
                FileProblem(name, path, f"{st.st_size:,} bytes, recorded {want['size']:,} bytes when written")
            )
            continue
        now = _stat_fields(st)
        if not full and all(want.get(k) == now[k] for k in STAT_FIELDS):
            continue
        got = sha256_file(path)
        if got != want["sha256"]:
            problems.append(FileProblem(name, path, f"sha256 {got}, recorded {want['sha256']} when written"))
        else:
            updated[name].update(now)
    for path in _listed(folder, skip):
        if path.name not in record and not path.name.endswith(".tmp"):
            problems.append(
                FileProblem(path.name, path, "not in the record (added after the folder was written)")
            )
    return problems, updated
