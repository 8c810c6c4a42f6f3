"""Interop: llama.cpp control vectors (GGUF), steering-vectors and repeng, on tiny models.

No llama.cpp here: the file is checked with the ``gguf`` package's reader against what
llama.cpp's loader reads, and the layer numbering against a hand-written forward hook on the
Hugging Face model (what llama.cpp, steering-vectors and repeng all steer: a decoder
layer's output). The two libraries are optional: small stand-in dataclasses with their
fields run always, the real classes when installed.
"""

import dataclasses
import importlib
import sys

import gguf
import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from xferlens.identity import model_identity
from xferlens.interop import (
    ControlVectorError,
    InteropError,
    from_gguf,
    from_repeng,
    from_steering_vectors,
    read_control_vector,
    to_gguf,
    to_repeng,
    to_steering_vectors,
)
from xferlens.mappers import AffineMapper
from xferlens.steering import SteeringMismatchError, SteeringVector, steer, transfer


@dataclasses.dataclass
class StandInSV:
    """steering_vectors.SteeringVector's fields."""

    layer_activations: dict
    layer_type: str = "decoder_block"


@dataclasses.dataclass
class StandInCV:
    """repeng.ControlVector's fields."""

    model_type: str
    directions: dict


def make_vector(model, layers=(1, 2), seed=0, scale=1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    dirs = {f"blocks.{layer}.hook_resid_post": scale * torch.randn(d, generator=g) for layer in layers}
    act_norm = {h: 3.0 + i for i, h in enumerate(dirs)}
    return SteeringVector(dirs, model_identity(model), {"method": "test", "seed": seed}, act_norm)


def write_foreign(path, tensors: dict[str, np.ndarray], hint="llama", arch="controlvector"):
    """A control vector as llama.cpp's cvector-generator or repeng writes it (no xferlens header)."""
    w = gguf.GGUFWriter(path, arch)
    if hint is not None:
        w.add_string("controlvector.model_hint", hint)
    w.add_int32("controlvector.layer_count", len(tensors))
    for name, arr in tensors.items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def import_or_skip(name: str):
    """``pytest.importorskip`` that also skips an installed package that fails to import
    (repeng 0.4.0 under NumPy 2 raises AttributeError on ``np.float_``)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"{name} not importable here: {type(e).__name__}: {e}")


def unknown_arch_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, act_fn="relu"
    )
    return HookedTransformer(cfg)


# ---------------------------------------------------------------- GGUF


def test_gguf_round_trip_is_exact(tiny_tl, tmp_path):
    model = tiny_tl("llama")
    v = make_vector(model)
    path = to_gguf(v, tmp_path / "v.gguf", model)
    w = from_gguf(path, model)
    assert w.hooks == v.hooks
    for h in v.hooks:
        assert torch.equal(w.directions[h], v.directions[h])
    assert w.model == v.model and w.recipe == v.recipe and w.act_norm == v.act_norm
    # alpha folded in: the file holds vector.scaled(alpha), bit for bit
    w2 = from_gguf(to_gguf(v, tmp_path / "a.gguf", model, alpha=2.5), model)
    for h in v.hooks:
        assert torch.equal(w2.directions[h], v.scaled(2.5).directions[h])
    assert w2.recipe["scaled_by"] == 2.5
    # the same through the SteeringVector methods
    w3 = SteeringVector.from_gguf(v.to_gguf(tmp_path / "m.gguf", model), model)
    assert w3.hooks == v.hooks and all(torch.equal(w3.directions[h], v.directions[h]) for h in v.hooks)


def test_gguf_file_has_what_llama_cpp_reads(tiny_tl, tmp_path):
    model = tiny_tl("qwen2")
    v = make_vector(model, layers=(2, 1))
    r = gguf.GGUFReader(to_gguf(v, tmp_path / "v.gguf", model))
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "qwen2"
    lc = r.fields["controlvector.layer_count"]
    assert lc.contents() == 2 and lc.types == [gguf.GGUFValueType.INT32]
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.2"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [model.cfg.d_model]
        layer = int(t.name.split(".")[1])  # direction.n is added to block n's output
        assert np.array_equal(t.data, v.directions[f"blocks.{layer}.hook_resid_post"].numpy())
    meta, dirs = read_control_vector(tmp_path / "v.gguf")
    assert set(dirs) == {1, 2} and meta["general.name"] == model.cfg.model_name


def test_block_output_is_resid_post_against_a_hand_hook_on_the_hf_model(tiny_tl, tiny_hf_folder):
    """llama.cpp (l_out of layer n), steering-vectors and repeng add to the output of HF
    ``model.model.layers[n]``; that must be xferlens's ``blocks.{n}.hook_resid_post``."""
    from transformers import AutoModelForCausalLM

    tl = tiny_tl("llama")
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_folder("llama"), dtype=torch.float32).eval()
    tokens = torch.tensor([[261, 5, 77, 130, 9, 200, 31]])
    v = make_vector(tl, layers=(1,), scale=4.0)

    def hf_logprobs(layer: int | None):
        def add(_module, _inputs, out):
            if isinstance(out, tuple):
                return (out[0] + v.direction(),) + out[1:]
            return out + v.direction()

        handle = hf.model.layers[layer].register_forward_hook(add) if layer is not None else None
        try:
            with torch.no_grad():
                return hf(input_ids=tokens).logits.log_softmax(-1)
        finally:
            if handle is not None:
                handle.remove()

    with torch.no_grad(), steer(tl, v, 1.0):
        ours = tl(tokens).log_softmax(-1)
    base = hf_logprobs(None)
    assert (hf_logprobs(1) - base).abs().max() > 0.05  # the steer does something
    torch.testing.assert_close(ours, hf_logprobs(1), atol=2e-3, rtol=0)
    assert (ours - hf_logprobs(0)).abs().max() > 0.05  # and not the same as one layer earlier


def test_gguf_export_refuses_what_llama_cpp_cannot_express(tiny_tl, tmp_path):
    model = tiny_tl("llama")
    other = unknown_arch_model()
    with pytest.raises(
        ControlVectorError, match=r"architecture of .* is unknown.*to_gguf\(vector, path, model\)"
    ):
        to_gguf(make_vector(other, layers=(1,)), tmp_path / "x.gguf", other)
    other.cfg.original_architecture = "GPTNeoXForCausalLM"
    with pytest.raises(
        ControlVectorError, match=r"GPTNeoXForCausalLM.*no llama.cpp .*LlamaForCausalLM -> llama"
    ):
        to_gguf(make_vector(other, layers=(1,)), tmp_path / "x.gguf", other)
    with pytest.raises(ControlVectorError, match="block 0"):
        to_gguf(make_vector(model, layers=(0, 1)), tmp_path / "x.gguf", model)
    pre = SteeringVector({"blocks.2.hook_resid_pre": torch.ones(64)}, model_identity(model))
    with pytest.raises(
        InteropError, match=r"'blocks.2.hook_resid_pre'.*same point as 'blocks.1.hook_resid_post'"
    ):
        to_gguf(pre, tmp_path / "x.gguf", model)
    mid = SteeringVector({"blocks.1.hook_resid_mid": torch.ones(64)}, model_identity(model))
    with pytest.raises(InteropError, match="hook_resid_mid"):
        to_gguf(mid, tmp_path / "x.gguf", model)
    with pytest.raises(SteeringMismatchError):  # a vector of another model
        to_gguf(make_vector(model), tmp_path / "x.gguf", tiny_tl("qwen2"))
    # without the model, the architecture must be recorded in the vector's identity
    with pytest.raises(ControlVectorError, match="unknown"):
        to_gguf(make_vector(model), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_import_refuses_another_model_width_or_architecture(tiny_tl, tmp_path):
    llama, qwen = tiny_tl("llama"), tiny_tl("qwen2")
    path = to_gguf(make_vector(llama), tmp_path / "v.gguf", llama)
    with pytest.raises(
        ControlVectorError, match=r"made for a LlamaForCausalLM, but .* is a Qwen2ForCausalLM"
    ):
        from_gguf(path, qwen)
    with pytest.warns(UserWarning) as caught:
        forced = from_gguf(path, qwen, force=True)
    said = " ".join(str(w.message) for w in caught)
    assert "ANOTHER ARCHITECTURE" in said and "APPLYING A STEERING VECTOR TO ANOTHER MODEL" in said
    assert forced.hooks == make_vector(llama).hooks
    # same architecture, other weights: the identity recorded in the file is checked
    v = make_vector(llama)
    v.model = {**v.model, "weights": "params:someone-else", "architecture": "LlamaForCausalLM"}
    path2 = to_gguf(v, tmp_path / "other.gguf")  # no model: architecture from the identity
    with pytest.raises(SteeringMismatchError, match=r"weights: recorded 'params:someone-else', given '"):
        from_gguf(path2, llama)
    narrow = write_foreign(tmp_path / "narrow.gguf", {"direction.1": np.ones(32)})
    with pytest.raises(InteropError, match=r"direction.1 has 32 entries, but .* has d_model=64"):
        from_gguf(narrow, llama)
    deep = write_foreign(tmp_path / "deep.gguf", {"direction.7": np.ones(64)})
    with pytest.raises(InteropError, match=r"layer 7, but .* has 3 layers"):
        from_gguf(deep, llama)


def test_gguf_from_llama_cpp_or_repeng_files(tiny_tl, tmp_path, tiny_gguf):
    llama, qwen = tiny_tl("llama"), tiny_tl("qwen2")
    a, b = np.arange(64, dtype=np.float32), -np.ones(64, dtype=np.float32)
    path = write_foreign(tmp_path / "cv.gguf", {"direction.1": a, "direction.2": b})
    v = from_gguf(path, llama)
    assert v.hooks == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert np.array_equal(v.direction("blocks.1.hook_resid_post").numpy(), a)
    assert v.recipe["method"] == "llama.cpp control vector" and v.model == model_identity(llama)
    with pytest.raises(ControlVectorError, match=r"model_hint is 'llama', but .* Qwen2ForCausalLM"):
        from_gguf(path, qwen)
    repeng_style = write_foreign(tmp_path / "r.gguf", {"direction.2": a}, hint="qwen2")  # HF model_type
    assert from_gguf(repeng_style, qwen).hooks == ["blocks.2.hook_resid_post"]
    # two names for one layer: llama.cpp sums them (common_control_vector_load_one)
    dup = write_foreign(tmp_path / "dup.gguf", {"direction.1": a, "direction.01": b})
    assert np.array_equal(from_gguf(dup, llama).direction().numpy(), a + b)
    with pytest.raises(ControlVectorError, match="direction.0"):
        from_gguf(write_foreign(tmp_path / "z.gguf", {"direction.0": a}), llama)
    with pytest.raises(ControlVectorError, match="not a control vector"):
        from_gguf(tiny_gguf, llama)  # a model, not a control vector
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ControlVectorError, match="not a readable GGUF"):
        from_gguf(tmp_path / "junk.gguf", llama)


# ---------------------------------------------------------------- steering-vectors and repeng


def _check_sv_round_trips(model, cls):
    v = make_vector(model, layers=(0, 2))
    sv = to_steering_vectors(v, cls=cls)
    assert sv.layer_type == "decoder_block" and set(sv.layer_activations) == {0, 2}
    back = from_steering_vectors(sv, model)
    assert back.hooks == v.hooks and all(torch.equal(back.directions[h], v.directions[h]) for h in v.hooks)
    # made there (negative layer = from the end, as steering-vectors indexes), here, and back
    there = cls(layer_activations={1: torch.randn(64), -1: torch.randn(64)})
    here = from_steering_vectors(there, model)
    assert here.hooks == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    again = to_steering_vectors(here, cls=cls)
    assert torch.equal(again.layer_activations[1], there.layer_activations[1])
    assert torch.equal(again.layer_activations[2], there.layer_activations[-1])


def test_steering_vectors_round_trip_with_a_stand_in(tiny_tl):
    model = tiny_tl("llama")
    _check_sv_round_trips(model, StandInSV)
    with pytest.raises(InteropError, match=r"layer_type 'mlp'.*decoder_block"):
        from_steering_vectors(StandInSV({1: torch.ones(64)}, "mlp"), model)
    with pytest.raises(InteropError, match="32 entries.*d_model=64"):
        from_steering_vectors(StandInSV({1: torch.ones(32)}), model)
    with pytest.raises(InteropError, match="layer 5, but .* 3 layers"):
        from_steering_vectors(StandInSV({5: torch.ones(64)}), model)


def test_steering_vectors_round_trip_with_the_real_library(tiny_tl):
    sv_mod = import_or_skip("steering_vectors")
    _check_sv_round_trips(tiny_tl("llama"), sv_mod.SteeringVector)
    assert isinstance(to_steering_vectors(make_vector(tiny_tl("llama"))), sv_mod.SteeringVector)


def test_a_vector_made_there_is_transferred_here_and_sent_back(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    there = StandInSV({1: torch.randn(64)})
    v = from_steering_vectors(there, src)
    d = src.cfg.d_model
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))
    m = AffineMapper(d, d).set_solution(q, torch.zeros(d))
    m.meta = {
        "src": {**model_identity(src), "hook": "blocks.1.hook_resid_post"},
        "tgt": {**model_identity(tgt), "hook": "blocks.1.hook_resid_post"},
        "training": {"src_norm": 2.0, "tgt_norm": 2.0},
    }
    t = transfer(v, m)
    t.check_model(tgt)
    back = to_steering_vectors(t, cls=StandInSV)
    assert set(back.layer_activations) == {1}
    assert torch.equal(back.layer_activations[1], t.direction())
    cv = to_repeng(t, tgt, cls=StandInCV)
    assert cv.model_type == "qwen2" and np.array_equal(cv.directions[1], t.direction().numpy())


def _check_repeng_round_trips(model, cls):
    v = make_vector(model, layers=(1, 2))
    cv = to_repeng(v, model, cls=cls)
    assert cv.model_type == "llama" and set(cv.directions) == {1, 2}
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in cv.directions.values())
    back = from_repeng(cv, model)
    assert back.hooks == v.hooks and all(torch.equal(back.directions[h], v.directions[h]) for h in v.hooks)
    there = cls(
        model_type="llama", directions={0: np.ones(64, np.float32), 2: np.arange(64, dtype=np.float32)}
    )
    again = to_repeng(from_repeng(there, model), model, cls=cls)
    assert set(again.directions) == {0, 2}
    assert all(np.array_equal(again.directions[k], there.directions[k]) for k in (0, 2))


def test_repeng_round_trip_with_a_stand_in(tiny_tl):
    model = tiny_tl("llama")
    _check_repeng_round_trips(model, StandInCV)
    with pytest.raises(InteropError, match=r"made for a 'qwen2' model, but .* is 'llama'"):
        from_repeng(StandInCV("qwen2", {1: np.ones(64)}), model)
    with pytest.warns(UserWarning, match="ANOTHER ARCHITECTURE"):
        from_repeng(StandInCV("qwen2", {1: np.ones(64)}), model, force=True)
    with pytest.raises(InteropError, match="32 entries"):
        from_repeng(StandInCV("llama", {1: np.ones(32)}), model)
    with pytest.raises(InteropError, match="model_type"):
        to_repeng(make_vector(unknown_arch_model(), layers=(1,)), cls=StandInCV)
    assert to_repeng(make_vector(model), model_type="custom", cls=StandInCV).model_type == "custom"


def test_repeng_round_trip_and_gguf_with_the_real_library(tiny_tl, tmp_path):
    repeng = import_or_skip("repeng")
    model = tiny_tl("llama")
    _check_repeng_round_trips(model, repeng.ControlVector)
    v = make_vector(model)
    # repeng's own GGUF export reads here at the same layers, and ours reads there
    to_repeng(v, model).export_gguf(str(tmp_path / "r.gguf"))
    w = from_gguf(tmp_path / "r.gguf", model)
    assert w.hooks == v.hooks and all(torch.equal(w.directions[h], v.directions[h]) for h in v.hooks)
    cv = repeng.ControlVector.import_gguf(str(to_gguf(v, tmp_path / "x.gguf", model)))
    assert set(cv.directions) == {1, 2} and cv.model_type == "llama"
    assert np.array_equal(cv.directions[2], v.directions["blocks.2.hook_resid_post"].numpy())


def test_a_broken_optional_install_is_an_import_error_that_names_the_way_out(tmp_path, monkeypatch):
    from xferlens.interop.libraries import _load_class

    (tmp_path / "brokenlib_xl.py").write_text("raise AttributeError('np.float_ was removed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "brokenlib_xl", raising=False)
    with pytest.raises(ImportError, match=r"installed but does not import here.*to_gguf / from_gguf"):
        _load_class("brokenlib_xl", "ControlVector", "brokenlib_xl")
    with pytest.raises(ImportError, match=r"pip install --no-deps no-such-pkg"):
        _load_class("no_such_module_xl", "X", "no-such-pkg")


# ---------------------------------------------------------------- llama.cpp runtime helpers


def test_control_vector_buffer_is_laid_out_as_llama_cpp_loads_it(tmp_path):
    """``common_control_vector_load``: direction.n at offset n_embd * (n - 1), times the
    file's strength, summed over files; the buffer ends at the highest layer named."""
    from xferlens.interop.llama_cpp import control_vector_data

    a, b = np.arange(8, dtype=np.float32), np.ones(8, dtype=np.float32)
    f1 = write_foreign(tmp_path / "1.gguf", {"direction.1": a, "direction.3": b})
    f2 = write_foreign(tmp_path / "2.gguf", {"direction.3": a})
    data, width = control_vector_data([(f1, 2.0), (f2, -1.0)], n_embd=8)
    assert width == 8 and data.shape == (24,) and data.dtype == np.float32
    assert np.array_equal(data[0:8], 2 * a)  # layer 1 at [0]
    assert np.array_equal(data[8:16], np.zeros(8))  # layer 2: nothing
    assert np.array_equal(data[16:24], 2 * b - a)  # layer 3, both files
    with pytest.raises(ValueError, match="n_embd=16"):
        control_vector_data([(f1, 1.0)], n_embd=16)
    wide = write_foreign(tmp_path / "w.gguf", {"direction.1": np.ones(4)})
    with pytest.raises(ValueError, match="width 4 and 8"):
        control_vector_data([(f1, 1.0), (wide, 1.0)])


def test_dequantized_gguf_keeps_metadata_and_values(tiny_gguf, tmp_path):
    from xferlens.interop.llama_cpp import dequantized_gguf

    out = dequantized_gguf(tiny_gguf, tmp_path / "f32.gguf")
    src, dst = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(out)
    keys = {k for k in src.fields if not k.startswith("GGUF.")} - {"general.file_type"}
    for k in keys:
        assert dst.fields[k].contents() == src.fields[k].contents(), k
    assert dst.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for s, d in zip(src.tensors, dst.tensors, strict=True):
        assert d.tensor_type == gguf.GGMLQuantizationType.F32 and list(d.shape) == list(s.shape)
        assert np.array_equal(np.asarray(d.data), gguf.quants.dequantize(s.data, s.tensor_type))


def test_real_llama_cpp_adds_direction_n_at_blocks_n_resid_post(tmp_path):
    """With llama-cpp-python installed: a tiny GGUF model, de-quantized to float32 so both
    runtimes hold the same weights, steered by an exported ``direction.2`` in llama.cpp,
    matches the HookedTransformer steered at ``blocks.2.hook_resid_post``, and not at the
    neighbouring blocks."""
    import_or_skip("llama_cpp")
    from llama_cpp import Llama

    from tests.helpers.tiny_gguf import write_tiny_llama_gguf
    from xferlens import load_model
    from xferlens.interop import llama_cpp as xlc

    write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=4)
    f32 = xlc.dequantized_gguf(tmp_path / "tiny.gguf")
    tl = load_model(tmp_path / "tiny.gguf", device="cpu", progress=False, home=tmp_path / "home")
    toks = [5, 77, 130, 9, 200, 31, 40]
    d = 3 * torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def hooked(layer: int | None) -> np.ndarray:
        with torch.no_grad():
            if layer is None:
                return tl(torch.tensor([toks]))[0, -1].double().log_softmax(-1).numpy()
            v = SteeringVector({f"blocks.{layer}.hook_resid_post": d}, model_identity(tl))
            with steer(tl, v, 1.0):
                return tl(torch.tensor([toks]))[0, -1].double().log_softmax(-1).numpy()

    path = to_gguf(
        SteeringVector({"blocks.2.hook_resid_post": d}, model_identity(tl)), tmp_path / "v.gguf", tl
    )
    llm = Llama(model_path=str(f32), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False)
    try:
        base = xlc.next_token_logprobs(llm, toks)
        xlc.set_control_vector(llm, [(path, 1.0)])
        steered = xlc.next_token_logprobs(llm, toks)
        xlc.set_control_vector(llm, None)
        cleared = xlc.next_token_logprobs(llm, toks)
    finally:
        llm.close()
    assert np.abs(base - hooked(None)).max() < 0.02  # same weights, same numbers
    assert np.abs(steered - base).max() > 0.5  # the vector does something
    assert np.abs(steered - hooked(2)).max() < 0.02  # ... exactly what blocks.2 does
    for other in (1, 3):
        assert np.abs(steered - hooked(other)).max() > 0.3
    assert np.array_equal(cleared, base)
