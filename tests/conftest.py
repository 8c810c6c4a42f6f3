"""Shared fixtures.

Unit tests use tiny models made here (random weights, a tiny GGUF with a real byte-level
BPE tokenizer) and a private cache folder. Tests marked ``slow`` use the real zoo models
from one shared cache: ``$XFERLENS_HOME`` if set, else ``~/.cache/xferlens``, so every
slow test (and every CI run on the same machine) shares one download and one conversion.
"""

import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch, request):
    """Unit tests never touch the user's cache; slow tests use the shared one."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("XFERLENS_HOME", str(tmp_path / "xferlens-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_gguf, tmp_path_factory) -> Path:
    """Tokenizer files (byte-level BPE with a chat template) from the tiny GGUF."""
    from xferlens.gguf_export import gguf_to_hf

    out = tmp_path_factory.mktemp("tiny-hf") / "hf"
    gguf_to_hf(tiny_gguf, out, progress=False)
    return out


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal but valid wheel (what pip download fetches) holding ``members``."""
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: xferlens-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def wheelhouse(tmp_path, tiny_gguf):
    """A local package index (a find-links folder) carrying the tiny GGUF in 3 chunks,
    and a zoo registry whose entry points at it."""
    from xferlens import zoo

    data = tiny_gguf.read_bytes()
    third = len(data) // 3 + 1
    pieces = [data[i * third : (i + 1) * third] for i in range(3)]
    house = tmp_path / "wheelhouse"
    house.mkdir()
    chunks = []
    for i, piece in enumerate(pieces, start=1):
        pkg = f"xferlens-test-tiny-part{i}"
        member = f"xferlens_test_tiny_part{i}/data/part{i:02d}.bin"
        make_wheel(house, pkg, "0.0.1", {member: piece, f"xferlens_test_tiny_part{i}/__init__.py": b""})
        chunks.append(zoo.Chunk(pkg, "0.0.1", member))
    entry = zoo.ZooModel(
        name="tiny-llama",
        family="test",
        architecture="llama",
        n_layers=2,
        d_model=64,
        tokenizer="byte BPE",
        vocab_size=263,
        gguf_name="tiny-llama.gguf",
        sha256=zoo.sha256_file(tiny_gguf),
        size=len(data),
        chunks=tuple(chunks),
        original="(written by the tests)",
        license="test",
    )
    return {
        "registry": {"tiny-llama": entry},
        "entry": entry,
        "pip_args": ["--no-index", "--find-links", str(house)],
        "house": house,
    }


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a freshly initialised HF model weights large enough that mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5) * 1.5)
            elif "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


TINY = dict(
    vocab_size=263,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_hf_config(arch: str):
    import transformers as tr

    if arch == "llama":
        return tr.LlamaConfig(**TINY, tie_word_embeddings=False, bos_token_id=261, eos_token_id=262)
    if arch == "qwen2":
        return tr.Qwen2Config(**TINY, tie_word_embeddings=True, bos_token_id=261, eos_token_id=262)
    if arch == "gemma3":
        return tr.Gemma3TextConfig(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            bos_token_id=261,
            eos_token_id=262,
            pad_token_id=262,
        )
    if arch == "gpt2":
        return tr.GPT2Config(
            vocab_size=263,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=256,
            bos_token_id=261,
            eos_token_id=262,
        )
    raise KeyError(arch)


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: a saved HF folder (random weights + the tiny tokenizer) per architecture."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"hf-{arch}") / f"tiny-{arch}"
            torch.manual_seed(0)
            model = randomize_(AutoModelForCausalLM.from_config(tiny_hf_config(arch)), seed=1)
            model.save_pretrained(folder)
            for f in tiny_tokenizer_dir.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy(f, folder / f.name)
            made[arch] = folder
        return made[arch]

    return make


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO, logger="xferlens")
    return caplog


@pytest.fixture(scope="session")
def tiny_tl(tiny_hf_folder, tmp_path_factory):
    """Factory: a tiny random HookedTransformer per architecture, loaded once per session
    (``tiny_tl("llama")``, ``tiny_tl("qwen2")``); all share the tiny byte-BPE tokenizer."""
    from xferlens import load_model

    home = tmp_path_factory.mktemp("tiny-tl-home")
    made = {}

    def make(arch: str):
        if arch not in made:
            made[arch] = load_model(tiny_hf_folder(arch), device="cpu", progress=False, home=home)
        return made[arch]

    return make
