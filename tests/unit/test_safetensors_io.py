"""Our streaming safetensors reader/writer against the safetensors library."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from xferlens.safetensors_io import SafetensorsFormatError, load_unmapped, save_streaming


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "view": torch.randn(4, 6, generator=g).T,  # non-contiguous
    }


def test_streaming_writer_is_read_by_safetensors(tmp_path):
    ts = _tensors()
    save_streaming(ts, tmp_path / "x.safetensors", metadata={"who": "test"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(ts)
    for k in ts:
        assert torch.equal(back[k], ts[k].contiguous()), k


def test_unmapped_reader_reads_safetensors_files(tmp_path):
    ts = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(ts, tmp_path / "x.safetensors")
    back = load_unmapped(tmp_path / "x.safetensors")
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k


def test_truncated_file_is_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(raw[:-100])
    with pytest.raises(SafetensorsFormatError, match="truncated"):
        load_unmapped(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"\x05")
    with pytest.raises(SafetensorsFormatError, match="truncated"):
        load_unmapped(tmp_path / "y.safetensors")
