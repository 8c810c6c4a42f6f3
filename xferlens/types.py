"""Shared jaxtyping aliases for tensors that cross module boundaries, and the ``Report``
protocol every evaluation result follows.

Every public function annotates its tensor arguments with these aliases; the test suite
checks them at run time (``--jaxtyping-packages=xferlens,beartype.beartype``), so a shape
mismatch fails loudly in tests instead of silently broadcasting.

Do not turn on postponed evaluation of annotations (the ``__future__`` import) in modules
that use these: it makes the annotations strings and the run-time checks silently stop.
"""

from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float, Int
from torch import Tensor

#: Token ids of a batch of texts.
Tokens = Int[Tensor, "batch pos"]
#: Which positions of a batch hold real tokens (not padding).
Mask = Int[Tensor, "batch pos"]
#: Residual-stream activations of a batch.
Resid = Float[Tensor, "batch pos d_model"]
#: Logits over the vocabulary.
Logits = Float[Tensor, "batch pos d_vocab"]
#: Log-probabilities over the vocabulary.
LogProbs = Float[Tensor, "batch pos d_vocab"]
#: Rows of activations at real token positions, flattened over batch and position.
Rows = Float[Tensor, "n d_model"]
#: One direction in a model's residual stream.
Direction = Float[Tensor, " d_model"]
#: Rows of any hook point (``resid``: ``[n, d_model]``; ``attn.hook_z``: ``[n, heads, d_head]``).
HookRows = Float[Tensor, "n *d"]  # noqa: F821
#: One integer per row (text index, position, token id).
RowIndex = Int[Tensor, " n"]
#: Character span ``[start, end)`` of each row's token in its text.
CharSpans = Int[Tensor, "n 2"]
#: Paired rows: source side and target side of a map between two models.
SrcRows = Float[Tensor, "n d_src"]
TgtRows = Float[Tensor, "n d_tgt"]


@runtime_checkable
class Report(Protocol):
    """What every evaluation result offers (``MapperReport``, ``SteeringReport``,
    ``LayerSweep``, ``LayerScores``, ``DoseResponse``, ``DoseDifference``, ``FeatureTransfer``,
    ``FeatureRates``, ``TransferDiagnostics``, ``RankAgreement``, ``TriggerRates``): a
    markdown table, the same table as a pandas DataFrame (one row per table row), and a
    matplotlib figure. Reports that replaced a plain
    dict or list also have ``to_dict()``, which returns that dict or list unchanged."""

    def to_markdown(self) -> str: ...

    def to_frame(self) -> Any: ...

    def plot(self, ax: Any = None) -> Any: ...


__all__ = [
    "CharSpans",
    "Direction",
    "HookRows",
    "LogProbs",
    "Logits",
    "Mask",
    "Report",
    "Resid",
    "RowIndex",
    "Rows",
    "SrcRows",
    "TgtRows",
    "Tokens",
]
