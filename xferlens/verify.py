"""Check that a converted HookedTransformer computes what the original HF model computes."""

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.types import Tokens


@torch.no_grad()
def logprob_gap(
    model: HookedTransformer, hf_model: torch.nn.Module, tokens: Tokens
) -> Float[Tensor, " batch"]:
    """Largest absolute difference of next-token log-probabilities, per sequence.

    Log-probabilities (not logits) are compared because ``center_unembed`` shifts logits by
    a per-position constant. Both models see exactly the same token ids.
    """
    tokens = tokens.to(model.cfg.device)
    ours = model(tokens).float().log_softmax(-1)
    theirs = hf_model(tokens.to(next(hf_model.parameters()).device)).logits.float().log_softmax(-1)
    return (ours - theirs.to(ours.device)).abs().amax(dim=(1, 2))
