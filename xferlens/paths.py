"""Where xferlens keeps its cache, and how it writes there without leaving half files."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_HOME = "XFERLENS_HOME"


def home(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$XFERLENS_HOME``, else ``~/.cache/xferlens``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "xferlens"


@contextlib.contextmanager
def staging_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder inside ``root/tmp`` (same filesystem, so a final rename is atomic).

    Removed on exit whatever happens, so an interrupted job leaves nothing a later run
    could take for a finished result.
    """
    tmp_root = root / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place in one rename.

    If ``dest`` already exists (another process finished first, or a forced redo), the old
    one is moved aside first and removed after, so readers never see a mix of the two.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = dest.with_name(dest.name + f".old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
