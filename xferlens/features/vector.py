"""An SAE feature as a steering vector (then ``transfer`` carries it to another model)."""

import torch
from jaxtyping import Float
from torch import Tensor

from xferlens.features.sae import TrainedSAE
from xferlens.steering.vector import SteeringVector


@torch.no_grad()
def feature_vector(
    sae: TrainedSAE, feature: int, *, rows: Float[Tensor, "n d_in"] | None = None
) -> SteeringVector:
    """Feature ``feature``'s decoder direction as a :class:`SteeringVector` at the SAE's hook.

    Length: with ``rows`` (activations of that hook), the feature's typical contribution
    to the residual stream, ``mean(activation | active) * |W_dec[feature]|``, and the
    rows' mean norm is recorded so recalibration and relative norms work; without, unit.
    ``steer(model, v, alpha=...)`` then adds ``alpha`` times that.

    Example:
        >>> v = feature_vector(src_sae, 123, rows=pairs.src)  # doctest: +SKIP
        >>> with steer(tgt, transfer(v, mapper), alpha=4.0): ...  # doctest: +SKIP
    """
    if not 0 <= feature < sae.d_sae:
        raise IndexError(
            f"feature {feature} is out of range: this SAE has {sae.d_sae} features (0..{sae.d_sae - 1})"
        )
    w = sae.sae.W_dec[feature].detach().float().cpu()
    length, act_norm, mean_act = 1.0, {}, None
    if rows is not None:
        acts = sae.encode(rows)[:, feature].float().cpu()
        active = acts[acts > 0]
        if len(active) == 0:
            raise ValueError(f"feature {feature} never fires on the {len(rows)} rows given: a dead feature")
        mean_act = float(active.mean())
        length = mean_act * float(w.norm())
        act_norm = {sae.hook: float(rows.float().norm(dim=1).mean())}
    direction = w / w.norm().clamp_min(1e-12) * length
    recipe = {
        "method": "sae_feature",
        "feature": int(feature),
        "sae": {**sae.recipe, "metrics": sae.metrics},
        "mean_activation": mean_act,
    }
    model = dict(sae.model) or {"d_model": sae.d_in}
    return SteeringVector({sae.hook: direction}, model, recipe, act_norm)
