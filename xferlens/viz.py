"""Token-level pictures of interventions, with circuitsvis in notebooks and static exports.

- :func:`token_projections`: per token of a text, the residual stream at a hook projected
  on a direction (a steering vector, an SAE feature's decoder row).
- :func:`side_by_side`: the same text coloured in the source and the target model, by the
  source vector and its transferred image (tokenizations may differ).
- :func:`next_token_shift`: which next tokens a steering vector makes more or less likely.

Each returns a :class:`View`: shown interactively in Jupyter (circuitsvis), and savable
for reports that are read outside notebooks: ``view.save("x.html")`` writes a
self-contained page (circuitsvis's JavaScript inlined, no network needed) and
``view.save("x.png")`` draws the same colours with matplotlib.
"""

import html
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import resolve_hooks, stop_layer
from xferlens.steering.apply import steer
from xferlens.steering.vector import SteeringVector


@dataclass
class Panel:
    """One row of coloured tokens: ``values[i]`` colours ``tokens[i]``."""

    title: str
    tokens: list[str]
    values: list[float]


@dataclass
class View:
    """Panels of coloured tokens; ``_repr_html_`` renders them with circuitsvis."""

    panels: list[Panel]
    caption: str = ""
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p.title!r}: {len(p.tokens)} tokens" for p in self.panels)
        return f"View({sizes})"

    def _limits(self) -> tuple[float, float]:
        m = max((abs(v) for p in self.panels for v in p.values), default=1.0) or 1.0
        return -m, m

    def html(self, inline_js: bool = True) -> str:
        """HTML of all panels; ``inline_js=True`` embeds circuitsvis's code (offline-safe)."""
        from circuitsvis.tokens import colored_tokens

        lo, hi = self._limits()
        parts = [f"<p><b>{html.escape(self.caption)}</b></p>"] if self.caption else []
        for p in self.panels:
            r = colored_tokens(p.tokens, [float(v) for v in p.values], min_value=lo, max_value=hi)
            parts.append(f"<div><p>{html.escape(p.title)}</p>{r.local_src if inline_js else r.cdn_src}</div>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.html()

    def figure(self, width: float = 10.0):
        """A matplotlib figure: tokens as coloured boxes (red positive, blue negative)."""
        import matplotlib.pyplot as plt
        from matplotlib import colormaps

        lo, hi = self._limits()
        cmap = colormaps["RdBu_r"]
        rows = []  # (kind, content): a panel title, or a line of ~100 characters of tokens
        for p in self.panels:
            rows.append(("title", p.title))
            line, n = [], 0
            for t, v in zip(p.tokens, p.values, strict=True):
                s = t.replace("\n", "\\n") or " "
                if n + len(s) > 100 and line:
                    rows.append(("tokens", line))
                    line, n = [], 0
                line.append((s, v))
                n += len(s) + 1
            rows.append(("tokens", line))
        fig = plt.figure(figsize=(width, 0.32 * len(rows) + 0.4))
        ax = fig.add_axes([0, 0, 1, 1])
        renderer = fig.canvas.get_renderer()
        ax.axis("off")
        y = 1 - 0.5 / (len(rows) + 1)
        step = 1 / (len(rows) + 1)
        if self.caption:
            fig.suptitle(self.caption, fontsize=9)
        for kind, content in rows:
            if kind == "title":
                ax.text(0.005, y, content, fontsize=8, weight="bold", va="center")
            else:
                x = 0.005
                for s, v in content:
                    frac = float(v) / hi if hi else 0.0
                    t = ax.text(
                        x,
                        y,
                        s,
                        fontsize=8,
                        family="monospace",
                        va="center",
                        color="white" if abs(frac) > 0.6 else "black",
                        bbox={"facecolor": cmap(0.5 + 0.5 * frac), "edgecolor": "none", "pad": 1},
                    )
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message="Glyph .* missing")
                        box = t.get_window_extent(renderer).transformed(ax.transAxes.inverted())
                    x = box.x1 + 0.004
            y -= step
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """``.html`` (self-contained, circuitsvis) or ``.png``/``.svg``/``.pdf`` (matplotlib)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".html":
            path.write_text("<!doctype html><meta charset='utf-8'>\n" + self.html(inline_js=True))
        elif path.suffix in (".png", ".svg", ".pdf"):
            import matplotlib.pyplot as plt

            with warnings.catch_warnings():  # glyphs the font lacks (CJK, emoji) draw as boxes
                warnings.filterwarnings("ignore", message="Glyph .* missing")
                fig = self.figure()
                fig.savefig(path, dpi=130, bbox_inches="tight")
            plt.close(fig)
        else:
            raise ValueError(f"save to .html, .png, .svg or .pdf, not {path.suffix!r}")
        return path


def _direction(vector: SteeringVector | Tensor, hook: str | None) -> tuple[str | None, Tensor]:
    if isinstance(vector, SteeringVector):
        hook = hook or vector.hook
        d = vector.direction(hook)
    else:
        d = vector
    if d.ndim != 1:
        raise ValueError(f"a direction must be 1-D [d_model], got shape {tuple(d.shape)}")
    return hook, d.float() / d.float().norm().clamp_min(1e-12)


@torch.no_grad()
def token_projections(
    model: HookedTransformer,
    text: str,
    vector: SteeringVector | Float[Tensor, " d_model"],
    hook: str | None = None,
) -> tuple[list[str], Float[Tensor, " pos"]]:
    """Tokens of ``text`` and the residual stream at ``hook`` projected on the unit
    direction of ``vector`` (a ``SteeringVector`` names its own hook)."""
    hook, d = _direction(vector, hook)
    if hook is None:
        raise ValueError("pass hook= (e.g. 'blocks.10.hook_resid_post') with a plain tensor direction")
    if isinstance(vector, SteeringVector):
        vector.check_model(model)
    (name,) = resolve_hooks(model, hook)
    if d.shape[0] != model.cfg.d_model:
        raise ValueError(
            f"direction has {d.shape[0]} entries; {model.cfg.model_name} has d_model={model.cfg.d_model}"
        )
    tokens = model.to_tokens(text)
    _, cache = model.run_with_cache(tokens, names_filter=[name], stop_at_layer=stop_layer(model, [name]))
    values = cache[name][0].float() @ d.to(cache[name].device)
    return model.to_str_tokens(tokens[0]), values.cpu()


def projection_view(
    model: HookedTransformer, text: str, vector: SteeringVector | Tensor, hook: str | None = None, title=None
) -> View:
    toks, vals = token_projections(model, text, vector, hook)
    return View([Panel(title or f"{model.cfg.model_name}", toks, vals.tolist())])


def side_by_side(
    src: HookedTransformer,
    tgt: HookedTransformer,
    text: str,
    src_vector: SteeringVector,
    tgt_vector: SteeringVector,
    *,
    drop_first: bool = True,
) -> View:
    """``text`` coloured by its projection on ``src_vector`` in ``src`` and on
    ``tgt_vector`` (e.g. its transfer) in ``tgt``. ``drop_first`` leaves out the first
    token, an attention sink whose huge norm would flatten every other colour."""
    panels = []
    for model, vec in ((src, src_vector), (tgt, tgt_vector)):
        toks, vals = token_projections(model, text, vec)
        k = 1 if drop_first and len(toks) > 1 else 0
        panels.append(Panel(f"{model.cfg.model_name} {vec.hook}", toks[k:], vals[k:].tolist()))
    # each model on its own scale: residual norms differ between models
    for p in panels:
        m = max(abs(v) for v in p.values) or 1.0
        p.values = [v / m for v in p.values]
    return View(panels, caption="projection on the vector (each row scaled to its max |value|)")


@torch.no_grad()
def next_token_shift(
    model: HookedTransformer,
    prompt: str,
    vector: SteeringVector,
    alpha: float = 1.0,
    *,
    k: int = 10,
    mode: str = "add",
    layers=None,
) -> View:
    """The ``k`` next tokens whose log-probability after ``prompt`` rises most and the
    ``k`` that fall most when ``vector`` steers the model; values are the change in
    log-probability. ``view.meta`` holds the numbers (tokens, before, after)."""
    tokens = model.to_tokens(prompt)
    before = model(tokens)[0, -1].log_softmax(-1).float()
    with steer(model, vector, alpha, mode=mode, layers=layers):
        after = model(tokens)[0, -1].log_softmax(-1).float()
    delta = (after - before).cpu()
    up = delta.topk(k).indices
    down = (-delta).topk(k).indices
    idx = torch.cat([up, down])
    names = [model.tokenizer.decode([int(i)]) for i in idx]
    meta = {
        "tokens": names,
        "ids": idx.tolist(),
        "logprob_before": before.cpu()[idx].tolist(),
        "logprob_after": after.cpu()[idx].tolist(),
        "delta": delta[idx].tolist(),
        "alpha": alpha,
    }
    return View(
        [
            Panel(f"most promoted (alpha={alpha:g})", names[:k], delta[up].tolist()),
            Panel("most suppressed", names[k:], delta[down].tolist()),
        ],
        caption=f"change in next-token log-probability, {model.cfg.model_name}",
        meta=meta,
    )
