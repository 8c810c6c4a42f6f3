"""TransformerLens's weight processing, one layer at a time.

``ProcessWeights.process_weights`` copies the whole state dict at each step (fold_ln,
center_unembed, fold_value_biases), so processing a 1.5B model holds three or more copies
of its weights at once and does not fit a 24 GiB machine. The steps themselves are
per-layer, so we run TransformerLens's own per-layer functions on slices of the state
dict (one block, or the embedding/unembedding keys) and put the results back: peak memory
is the weights plus one layer. A reference test checks the result equals
``ProcessWeights.process_weights`` on tiny models of every supported architecture.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processing:
    """Which of TransformerLens's weight simplifications to apply.

    * ``fold_ln``: fold the norm's scale (and LayerNorm's bias) into the next linear layer;
      LayerNorm becomes ``LNPre``/RMSNorm becomes ``RMSNormPre``. Residual stream unchanged.
    * ``center_writing_weights``: remove the mean from weights writing to the residual stream
      (LayerNorm models only, as in TransformerLens).
    * ``center_unembed``: remove ``W_U``'s mean over the vocabulary: logits shift by a
      constant per position, log-probabilities are unchanged.
    * ``fold_value_biases``: fold value biases into the attention output bias.
    """

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True

    @classmethod
    def none(cls) -> "Processing":
        return cls(False, False, False, False)

    def any(self) -> bool:
        return any(self.__dict__.values())


StateDict = dict[str, torch.Tensor]


def _apply_to_slice(
    sd: StateDict, select: Callable[[str], bool], fn: Callable[[StateDict], StateDict]
) -> None:
    """Run ``fn`` on the keys ``select`` picks and write its output back into ``sd``."""
    part = {k: sd.pop(k) for k in [k for k in sd if select(k)]}
    sd.update(fn(part))


def _block(layer: int) -> Callable[[str], bool]:
    prefix = f"blocks.{layer}."
    return lambda k: k.startswith(prefix)


def _outside_blocks(k: str) -> bool:
    return not k.startswith("blocks.")


def process_state_dict(sd: StateDict, cfg: Any, processing: Processing) -> StateDict:
    """Apply ``processing`` to a HookedTransformer-format state dict, in place.

    ``cfg`` is the model's ``HookedTransformerConfig`` (its ``normalization_type`` says
    whether LayerNorm or RMSNorm is folded). Tensors are processed in float32.
    """
    from transformer_lens.weight_processing import ProcessWeights as PW

    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            sd[k] = v.float()
    norm = getattr(cfg, "normalization_type", "LN")
    layer_norm = norm in ("LN", "LNPre")
    if processing.fold_ln and norm in ("LN", "LNPre", "RMS", "RMSPre"):
        gqa = "" if getattr(cfg, "n_key_value_heads", None) is None else "_"
        for layer in range(cfg.n_layers):
            _apply_to_slice(
                sd,
                _block(layer),
                lambda part, layer=layer: PW._fold_layer(part, cfg, layer, layer_norm, layer_norm, None, gqa),
            )

        def fold_final(part: StateDict) -> StateDict:
            part = PW._fold_final_rms_bias(part, cfg, layer_norm, None)
            return PW._fold_unembed_layer_norm(part, cfg, layer_norm, layer_norm, None)

        _apply_to_slice(sd, _outside_blocks, fold_final)
    elif processing.fold_ln:
        logger.warning("normalization %r cannot be folded; skipping fold_ln", norm)

    if processing.center_writing_weights and layer_norm and not getattr(cfg, "final_rms", False):
        # Touches W_E, W_pos and every block's W_O/W_out/b_O/b_out: a single pass, no copy.
        sd.update(PW.center_writing_weights(sd, cfg))

    if processing.center_unembed:
        _apply_to_slice(sd, lambda k: k.startswith("unembed."), lambda part: PW.center_unembed(part, cfg=cfg))

    if processing.fold_value_biases:
        for layer in range(cfg.n_layers):

            def fold_vb(part: StateDict, layer: int = layer) -> StateDict:
                part = PW.fold_value_biases(part, cfg)
                key = f"blocks.{layer}.attn.b_O"
                if processing.center_writing_weights and layer_norm and key in part:
                    part[key] = part[key] - part[key].mean()
                return part

            _apply_to_slice(sd, _block(layer), fold_vb)
    return sd
