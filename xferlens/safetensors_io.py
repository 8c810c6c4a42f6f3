"""Read safetensors files into ordinary memory, one tensor at a time.

``safetensors.torch.load_file`` returns tensors backed by a memory map of the file: every
page touched stays resident until the last tensor from that file is gone, even after
processing has replaced the tensor. When converting a model we replace most tensors one
layer at a time, so we read each tensor into its own allocation with ``readinto`` (one
copy, no map) and let the replaced ones really free.
"""

import json
import math
import struct
from pathlib import Path

import torch

from xferlens.errors import XferlensError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFormatError(XferlensError, ValueError):
    pass


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor bytes start."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsFormatError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
    return header, 8 + n


def load_unmapped(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file into freshly allocated CPU memory."""
    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise SafetensorsFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape = info["shape"]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or start + end > size:
                raise SafetensorsFormatError(
                    f"{path}: tensor {name} needs {nbytes} bytes at [{begin}, {end}) but the "
                    f"file holds {size - start} bytes of data: truncated or corrupted"
                )
            t = torch.empty(shape, dtype=dtype)
            if nbytes:
                f.seek(start + begin)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
                got = f.readinto(view)
                if got != nbytes:
                    raise SafetensorsFormatError(f"{path}: short read for {name} ({got}/{nbytes} bytes)")
            out[name] = t
    return out


_NAMES = {v: k for k, v in _DTYPES.items()}


def save_streaming(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a standard safetensors file tensor by tensor (no second copy of the whole set).

    ``safetensors.torch.save_file`` assembles the whole payload in memory first, which
    for a 1.5B model in float32 costs another 7 GB at peak.
    """
    path = Path(path)
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise SafetensorsFormatError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():  # one contiguous copy at a time, only for non-contiguous views
                t = t.detach().cpu().contiguous()
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B"))
