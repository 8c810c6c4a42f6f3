"""Steering vectors in and out of other tools: llama.cpp control vectors (GGUF),
``steering_vectors.SteeringVector`` and ``repeng.ControlVector``.

All of them add one vector per layer to the output of a decoder block at every position:
TransformerLens ``blocks.{l}.hook_resid_post``, with the same ``l`` in every format (see
``xferlens.interop.gguf_cvec`` and ``xferlens.interop.libraries`` for the source references).
``xferlens.interop.llama_cpp`` runs an exported file in llama.cpp through llama-cpp-python
(optional), loading it as llama.cpp's ``--control-vector-scaled`` does.
"""

from xferlens.interop.common import HF_MODEL_TYPE, LLAMA_CPP_ARCH, InteropError
from xferlens.interop.gguf_cvec import ControlVectorError, from_gguf, read_control_vector, to_gguf
from xferlens.interop.libraries import from_repeng, from_steering_vectors, to_repeng, to_steering_vectors

__all__ = [
    "HF_MODEL_TYPE",
    "LLAMA_CPP_ARCH",
    "ControlVectorError",
    "InteropError",
    "from_gguf",
    "from_repeng",
    "from_steering_vectors",
    "read_control_vector",
    "to_gguf",
    "to_repeng",
    "to_steering_vectors",
]
