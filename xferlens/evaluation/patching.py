"""The report card of a mapper: reconstruction, patching, and patched generations.

Patching, as the paper validates a map: run the target on held-out text with its
activations at the mapper's target hook *replaced* by the mapped source activations, at
every text token that has a source partner (special tokens such as BOS and chat markers,
and the rare target tokens without a partner across tokenizers, keep the target's own
values; the fraction patched is reported). Then compare the target's next-token
distribution with the clean run: cross-entropy on the true next token and
``KL(clean || patched)``, averaged over the patched positions. Two baselines replace the
same positions: the mean target activation (mean-ablation; the paper's baseline) and a
random linear map rescaled row by row to the mapped output's norm.
"""

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens import distributed as xd
from xferlens.activations import (
    Pairs,
    align_sets,
    cache_activations,
    match_rows,
    same_tokenizer,
    token_rows,
)
from xferlens.activations.hooks import split_hook
from xferlens.activations.shares import cache_split
from xferlens.activations.tokens import length_batches, pad_batch, padding_side, tokenize
from xferlens.evaluation.score import _final_logprobs
from xferlens.evaluation.text import rouge_l
from xferlens.mappers.base import Mapper
from xferlens.mappers.controls import random_map_like

CONDITIONS = ("mapped", "mean_ablation", "random_map")


@dataclass
class MapperReport:
    """What :func:`evaluate_mapper` measured; ``to_markdown()``, ``to_frame()``, ``plot()``,
    ``to_dict()``."""

    mapper: dict
    n_texts: int
    n_rows: int
    coverage: dict
    reconstruction: dict  # condition -> {"mse", "cosine", "fvu"}
    patching: dict  # "clean" -> {"ce"}; condition -> {"ce", "kl"}
    patched_fraction: float
    n_positions: int
    generations: list[dict] = field(default_factory=list)
    #: :class:`~xferlens.evaluation.TransferDiagnostics` (as a dict) of the ``vector`` given
    #: to :func:`evaluate_mappers`, on the same held-out rows; ``None`` without one
    diagnostics: dict | None = None

    @property
    def kl_ratio(self) -> float:
        """KL of the mapped patch over KL of mean-ablation (lower is better; 1 = no better)."""
        return self.patching["mapped"]["kl"] / self.patching["mean_ablation"]["kl"]

    @property
    def rouge_l(self) -> float | None:
        if not self.generations:
            return None
        return sum(g["rouge_l"] for g in self.generations) / len(self.generations)

    def summary(self) -> dict:
        """The headline figures (what a mapper artifact stores)."""
        return {
            "fvu": self.reconstruction["mapped"]["fvu"],
            "cosine": self.reconstruction["mapped"]["cosine"],
            "ce_clean": self.patching["clean"]["ce"],
            "ce_mapped": self.patching["mapped"]["ce"],
            "kl_mapped": self.patching["mapped"]["kl"],
            "kl_mean_ablation": self.patching["mean_ablation"]["kl"],
            "kl_random_map": self.patching["random_map"]["kl"],
            "kl_ratio": self.kl_ratio,
            "rouge_l": self.rouge_l,
            "n_texts": self.n_texts,
            "n_positions": self.n_positions,
            **({f"diagnostics_{k}": v for k, v in self.diagnostics.items()} if self.diagnostics else {}),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "kl_ratio": self.kl_ratio, "rouge_l_mean": self.rouge_l}

    def to_frame(self):
        """The markdown's replacement table as a DataFrame: one row per replacement
        (``mapped``, ``mean_ablation``, ``random_map``) with its reconstruction and patching
        figures. The completions are in ``generations``."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "replacement": c,
                    "fvu": self.reconstruction[c]["fvu"],
                    "cosine": self.reconstruction[c]["cosine"],
                    "mse": self.reconstruction[c].get("mse"),
                    "ce": self.patching[c]["ce"],
                    "kl": self.patching[c]["kl"],
                }
                for c in CONDITIONS
            ]
        )

    def to_markdown(self, completions: int = 3) -> str:
        m = self.mapper
        lines = [
            f"### {m.get('name', m['kind'])} ({m['kind']}, {m['n_params']:,} parameters): "
            f"{m['src']} -> {m['tgt']}",
            "",
            f"{self.n_texts} held-out texts, {self.n_rows:,} paired rows (coverage src "
            f"{self.coverage['src']:.1%} / tgt {self.coverage['tgt']:.1%}); {self.n_positions:,} target "
            f"positions patched ({self.patched_fraction:.1%} of text tokens). Clean target CE "
            f"{self.patching['clean']['ce']:.3f} nats.",
            "",
            "| replacement at the target layer | FVU | cosine | CE (nats) | KL(clean ‖ patched) |",
            "|---|---|---|---|---|",
        ]
        for c in CONDITIONS:
            r, p = self.reconstruction[c], self.patching[c]
            lines.append(
                f"| {c.replace('_', ' ')} | {r['fvu']:.3f} | {r['cosine']:.3f} "
                f"| {p['ce']:.3f} | {p['kl']:.3f} |"
            )
        lines += ["", f"KL ratio mapped / mean-ablation: **{self.kl_ratio:.3f}**"]
        if self.diagnostics:
            from xferlens.evaluation.diagnostics import TransferDiagnostics

            lines += [
                "",
                "Will it carry the vector? " + TransferDiagnostics(**self.diagnostics).to_markdown(),
            ]
        if self.generations:
            lines += ["", f"Greedy completions, clean vs patched (mean ROUGE-L {self.rouge_l:.3f}):", ""]
            lines += ["| prompt | clean | patched | ROUGE-L |", "|---|---|---|---|"]
            for g in self.generations[:completions]:
                cells = [
                    _cell(g["prompt"][-60:]),
                    _cell(g["clean"]),
                    _cell(g["patched"]),
                    f"{g['rouge_l']:.2f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, ax=None):
        """Bar chart of KL and CE per replacement (matplotlib); returns the figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(1, 2, figsize=(8, 3))
        else:
            fig = ax[0].figure
        names = [c.replace("_", "\n") for c in CONDITIONS]
        ax[0].bar(names, [self.patching[c]["kl"] for c in CONDITIONS], color=["C0", "C7", "C3"])
        ax[0].set_ylabel("KL(clean || patched), nats")
        ax[1].bar(
            ["clean", *names],
            [self.patching["clean"]["ce"], *[self.patching[c]["ce"] for c in CONDITIONS]],
            color=["C2", "C0", "C7", "C3"],
        )
        ax[1].set_ylabel("next-token CE, nats")
        name = self.mapper.get("name", self.mapper["kind"])
        fig.suptitle(f"{name}: {self.mapper['src']} -> {self.mapper['tgt']}", fontsize=9)
        fig.tight_layout()
        return fig


def _cell(text: str, n: int = 120) -> str:
    """``text`` as one markdown table cell: whitespace collapsed, pipes escaped, cut to ``n``."""
    return " ".join(text.split()).replace("|", "\\|")[:n]


def _reconstruction(pred: Tensor, y: Tensor) -> dict:
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean(0)) ** 2).sum())
    return {
        "mse": sse / y.numel(),
        "cosine": float(F.cosine_similarity(pred, y, dim=-1).mean()),
        "fvu": sse / max(sst, 1e-30),
    }


def _resid_post_layer(hook_name: str) -> int | None:
    """``L`` for ``blocks.L.hook_resid_post`` (where a patch can start from stored lower layers)."""
    parts = hook_name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "hook_resid_post":
        return int(parts[1])
    return None


def _run_patched(tgt, tokens, lower, split, hook_name, mask, replace: Tensor | None) -> Tensor:
    """The target's final residual stream with ``hook_name`` replaced at ``mask`` by
    ``replace`` (``None``: clean), from the stored lower layers ``lower`` when there are any."""
    top = tgt.cfg.n_layers
    if lower is None:
        if replace is None:
            return tgt(tokens, stop_at_layer=top)
        with tgt.hooks(fwd_hooks=[(hook_name, _replace_hook(replace, mask))]):
            return tgt(tokens, stop_at_layer=top)
    x = lower if replace is None else _replace_hook(replace, mask)(lower, None)
    return tgt(x, start_at_layer=split + 1, stop_at_layer=top)


def _replace_hook(replacement: Tensor, mask: Tensor) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[mask] = replacement[mask].to(act.dtype)
        return act

    return hook


def evaluate_mapper(
    mapper: Mapper,
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    **kwargs,
) -> MapperReport:
    """Report card of ``mapper`` on held-out ``texts`` (never the texts it was fitted on).

    Keyword arguments as for :func:`evaluate_mappers`.

    Example:
        >>> report = evaluate_mapper(mapper, small, big, held_out, prompts=chat)  # doctest: +SKIP
        >>> print(report.to_markdown())  # doctest: +SKIP
    """
    return evaluate_mappers({mapper.kind: mapper}, src, tgt, texts, **kwargs)[mapper.kind]


def evaluate_mappers(
    mappers: dict[str, Mapper],
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    *,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 24,
    batch_size: int = 2,
    max_length: int = 256,
    seed: int = 0,
    controls: bool = True,
    positions: Literal["all", "last"] = "all",
    force: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    vector=None,
    native=None,
    backward: Mapper | None = None,
) -> dict[str, MapperReport]:
    """Report cards of several mappers into the same target hook, sharing the work they
    have in common (caching, pairing, the clean and mean-ablated target runs, clean
    completions).

    Args:
        mappers: name -> mapper; all map into the same target hook, from any source hooks.
        texts: held-out texts for reconstruction and patching figures.
        prompts: a few prompts for greedy completions, clean vs patched (ROUGE-L).
        max_length: texts are cut to this many target tokens (logits cost ``d_vocab``
            floats per token).
        controls: also run the mean-ablation and random-map baselines (``False``: only
            the mapped patch, e.g. to rank many layer pairs; their figures are then NaN).
        positions: ``"all"`` patches every paired position and scores each on the next
            token; ``"last"`` patches only each text's last token and compares the next-token
            distribution there (KL only: the next token is not in the text, so cross-entropy
            is NaN) -- the card for a map fitted on the last prompt token, read on held-out
            prompts (``texts`` are then chat-formatted prompts).
        force: evaluate even if the models are not those a mapper was fitted between.
        vector: a source steering vector (``SteeringVector`` or a ``[d_src]`` direction at
            the maps' source hook) the maps are to carry: each card then holds
            :func:`~xferlens.evaluation.transfer_diagnostics` of it on the same held-out
            rows (``positions="last"`` with the vector's task prompts as ``texts`` reads them
            where a last-token vector lives). ``native``: the target's own vector, for the
            cosine and probe agreement with it; ``backward``: a map fitted target -> source,
            for the round trip.
        distributed: ``None`` (default) splits the work over the ranks when a process
            group of several ranks is initialised; ``False`` never (each process does it
            all). Distributed, call it on every rank with the same arguments: the rows are
            cached in shares and gathered on every rank (the mean-ablation row and the
            random map's centring read all of them), each rank patches whole batches of
            the texts and the loss sums are added over the ranks, the completions are dealt
            out; every rank returns the same cards (the patching means equal one process's
            to float rounding, everything else exactly).
    """
    from xferlens.activations.cache import texts_fingerprint

    if not mappers:
        raise ValueError("no mappers given")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of held-out strings")
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', not {positions!r}")
    for given in (vector, native):  # named before any model runs
        if isinstance(given, Tensor) and given.ndim != 1:
            raise ValueError(
                f"vector must be a [d] direction or a SteeringVector, got shape {tuple(given.shape)}"
            )
    tgt_hooks = {m.tgt_hook for m in mappers.values()}
    if len(tgt_hooks) != 1 or None in tgt_hooks or any(m.src_hook is None for m in mappers.values()):
        raise ValueError(
            f"mappers must name their hooks and share the target hook (fit them with fit_mapper): {tgt_hooks}"
        )
    (tgt_hook,) = tgt_hooks
    src_hooks = list(dict.fromkeys(m.src_hook for m in mappers.values()))
    for name, mapper in mappers.items():
        mapper.check_models(src, tgt, force=force)
        fitted_on = (mapper.meta.get("training") or {}).get("texts_fingerprint")
        if fitted_on is not None and fitted_on == texts_fingerprint(texts):
            raise ValueError(
                f"{name}: these are the texts the mapper was fitted on; evaluate on held-out texts"
            )
    texts = list(texts)
    spread = xd.active(distributed)
    alignment = "position" if same_tokenizer(src, tgt) else "char_end"
    cache = cache_split if spread else cache_activations
    parts = list(dict.fromkeys(h for joined in src_hooks for h in split_hook(joined)))  # multi-layer maps
    a = cache(src, texts, parts, max_length=max_length, progress=progress)
    b = cache(tgt, texts, tgt_hook, max_length=max_length, progress=progress)
    # the pairing depends on tokens only: every source hook gets the same rows
    by_hook: dict[str, Pairs] = {h: align_sets(a, b, h, tgt_hook, alignment) for h in src_hooks}
    if positions == "last":
        by_hook = {h: p.select(_last_rows(p, len(texts))) for h, p in by_hook.items()}
    pairs = by_hook[src_hooks[0]]
    tgt_rows = pairs.tgt.float()
    replacements = _replacements(mappers, by_hook, tgt_rows, controls, seed)
    recon = {c: _reconstruction(r, tgt_rows) for c, r in replacements.items()}
    patch, n_pos, n_text_tokens = _patched_losses(
        tgt, texts, pairs, replacements, tgt_hook, batch_size, max_length, progress, positions == "last",
        spread=spread,
    )  # fmt: skip
    if not controls:
        nan = float("nan")
        for name in mappers:
            for c in ("mean_ablation", f"{name}/random_map"):
                recon[c] = {"mse": nan, "cosine": nan, "fvu": nan}
                patch[c] = {"ce": nan, "kl": nan}
    done = _completions(mappers, src, tgt, list(prompts), alignment, max_new_tokens, progress, spread)
    reports = {}
    for name, mapper in mappers.items():
        diag = None
        if vector is not None:
            from xferlens.evaluation.diagnostics import transfer_diagnostics

            diag = transfer_diagnostics(
                _direction(vector, mapper.src_hook),
                mapper,
                by_hook[mapper.src_hook].src.float(),
                tgt_rows,
                backward=backward,
                native=None if native is None else _direction(native, tgt_hook),
            ).to_dict()
        gens = [
            {
                "prompt": p,
                "clean": done[(i, None)],
                "patched": done[(i, name)],
                "rouge_l": rouge_l(done[(i, None)], done[(i, name)]),
            }
            for i, p in enumerate(prompts)
        ]
        pick = {
            "mean_ablation": "mean_ablation",
            "mapped": f"{name}/mapped",
            "random_map": f"{name}/random_map",
        }
        reports[name] = MapperReport(
            mapper={
                "name": name,
                "kind": mapper.kind,
                "src": f"{src.cfg.model_name} {mapper.src_hook}",
                "tgt": f"{tgt.cfg.model_name} {tgt_hook}",
                "n_params": mapper.n_params,
            },
            n_texts=len(texts),
            n_rows=len(pairs),
            coverage=dict(pairs.coverage),
            reconstruction={c: recon[k] for c, k in pick.items()},
            patching={"clean": patch["clean"], **{c: patch[k] for c, k in pick.items()}},
            patched_fraction=len(pairs) / max(1, n_text_tokens),
            n_positions=n_pos,
            generations=gens,
            diagnostics=diag,
        )
    return reports


def _direction(vector, hook: str) -> Tensor:
    """A ``[d]`` float32 CPU direction at ``hook`` from a steering vector or a tensor (its
    shape checked on entry to :func:`evaluate_mappers`)."""
    if isinstance(vector, Tensor):
        return vector.float().cpu()
    return vector.direction(hook).float().cpu()


def _replacements(mappers: dict[str, Mapper], by_hook: dict[str, Pairs], tgt_rows, controls, seed) -> dict:
    """What replaces the paired target rows: ``{name}/mapped`` for every mapper and, with
    ``controls``, the mean target row (``mean_ablation``) and a random map of the centred
    source rows, each rescaled to its mapped row's norm (``{name}/random_map``)."""
    replacements = {}
    if controls:  # every row replaced by the mean target row
        mean_row = reduce(tgt_rows, "row d -> d", "mean")
        replacements["mean_ablation"] = repeat(mean_row, "d -> row d", row=len(tgt_rows))
    for name, mapper in mappers.items():
        src_rows = by_hook[mapper.src_hook].src.float()
        with torch.no_grad():
            mapped = torch.cat([mapper(b) for b in src_rows.split(4096)])
        replacements[f"{name}/mapped"] = mapped
        if controls:  # a random map of the centred rows, each rescaled to its mapped row's norm
            with torch.no_grad():
                rand = random_map_like(mapper, seed)(src_rows - reduce(src_rows, "row d -> d", "mean"))
            scale = mapped.norm(dim=-1, keepdim=True) / rand.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            replacements[f"{name}/random_map"] = rand * scale
    return replacements


def _completions(mappers, src, tgt, prompts, alignment, max_new_tokens, progress, spread) -> dict:
    """Greedy completions of every prompt, clean and patched through every mapper:
    ``{(prompt index, mapper name or None for clean): text}``. ``spread``: dealt out over
    the ranks, every rank gets all of them."""
    jobs = [(i, name) for i in range(len(prompts)) for name in (None, *mappers)]
    mine = xd.shard_indices(len(jobs)) if spread else range(len(jobs))
    with xd.collectively("the report cards' completions", spread):
        done = {}
        for i, name in tqdm([jobs[j] for j in mine], desc="completions", disable=not progress or not prompts):
            mapper = mappers[name] if name is not None else None
            done[(i, name)] = _complete(src, tgt, prompts[i], alignment, max_new_tokens, mapper)
    if spread:
        done = {k: v for part in xd.all_gather_objects(done) for k, v in part.items()}
    return done


def _last_rows(pairs: Pairs, n_texts: int) -> Tensor:
    """Mask of each text's last paired target position (texts without a pair: none)."""
    keep = torch.zeros(len(pairs), dtype=torch.bool)
    best: dict[int, tuple[int, int]] = {}
    for r, (t, pos) in enumerate(zip(pairs.text_index.tolist(), pairs.tgt_position.tolist(), strict=True)):
        if t not in best or pos > best[t][0]:
            best[t] = (pos, r)
    for _, r in best.values():
        keep[r] = True
    if not keep.any():
        raise ValueError(f"none of the {n_texts} texts has a paired last position")
    return keep


def _patched_losses(
    tgt, texts, pairs, replacements, hook_name, batch_size, max_length, progress, last=False, *, spread=False
):
    """Mean next-token CE (and KL to the clean run) per replacement over the patched
    positions, the number of positions scored and of text tokens. ``spread``: each rank
    runs whole batches of the batching one process uses, and the sums are added over the
    ranks (every rank gets the means)."""
    tk = tokenize(tgt, texts, max_length=max_length)
    device = tgt.cfg.device
    n_text_tokens = sum(sum(not s for s in sp) for sp in tk.special)
    bounds = torch.searchsorted(pairs.text_index, torch.arange(len(texts) + 1))
    sums = {"clean": {"ce": 0.0}, **{c: {"ce": 0.0, "kl": 0.0} for c in replacements}}
    n = 0
    lengths = [len(x) for x in tk.ids]
    batches = list(length_batches(lengths, batch_size))
    if spread:
        batches = xd.batch_share(batches, lengths)
    bar = tqdm(total=sum(map(len, batches)), desc="patching", unit="text", disable=not progress)
    with xd.collectively("patching the report cards' texts", spread):
        for batch in batches:
            padded = pad_batch(tgt.tokenizer, [tk.ids[i] for i in batch], "right")
            tokens, width = padded.tokens, padded.tokens.shape[1]
            patched = torch.zeros((len(batch), width), dtype=torch.bool)
            rows_at = torch.full((len(batch), width), -1, dtype=torch.long)
            for r, i in enumerate(batch):
                rows = torch.arange(int(bounds[i]), int(bounds[i + 1]))
                pos = pairs.tgt_position[rows]  # right padding: a text position is its column
                patched[r, pos] = True
                rows_at[r, pos] = rows
            # score position t on token t+1 when t was patched and t+1 is a real token
            has_next = rearrange(torch.arange(width), "pos -> 1 pos") < rearrange(padded.last, "b -> b 1")
            score = patched if last else patched & has_next  # last: KL of the next-token distribution only
            nxt = torch.roll(tokens, -1, dims=1)[score].to(device)
            score_dev = score.to(device)
            with torch.no_grad(), padding_side(tgt.tokenizer, "right"):
                # the layers below the patched residual are the same for every condition: run
                # them once and start each condition there (right padding: causal attention
                # keeps pads out of the scored positions)
                split = _resid_post_layer(hook_name)
                toks, mask = tokens.to(device), patched.to(device)
                lower = tgt(toks, stop_at_layer=split + 1) if split is not None else None
                # logits only where they are scored (the unembedding is most of a forward pass)
                clean = _final_logprobs(
                    tgt, _run_patched(tgt, toks, lower, split, hook_name, mask, None)[score_dev]
                )
                sums["clean"]["ce"] += float(-clean.gather(-1, nxt[:, None]).sum())
                for c, rep in replacements.items():
                    full = torch.zeros((len(batch), width, rep.shape[1]), dtype=rep.dtype)
                    full[patched] = rep[rows_at[patched]]
                    lp = _run_patched(tgt, toks, lower, split, hook_name, mask, full.to(device))
                    lp = _final_logprobs(tgt, lp[score_dev])
                    sums[c]["ce"] += float(-lp.gather(-1, nxt[:, None]).sum())
                    sums[c]["kl"] += float((clean.exp() * (clean - lp)).sum())
            n += int(score.sum())
            bar.update(len(batch))
    bar.close()
    if spread:  # float64 sums over the ranks, in a fixed order
        keys = [(c, k) for c, d in sums.items() for k in d]
        total = xd.all_reduce_scalars([float(n)] + [sums[c][k] for c, k in keys])
        n = int(total[0])
        for (c, k), v in zip(keys, total[1:], strict=True):
            sums[c][k] = v
    if n == 0:
        raise ValueError("no patched position has a next token to score: use longer texts")
    out = {c: {k: v / n for k, v in d.items()} for c, d in sums.items()}
    if last:  # the next token is not in the text: cross-entropy is not defined there
        for d in out.values():
            d["ce"] = float("nan")
    return out, n, n_text_tokens


def _greedy_step(mapper, src, tgt, text: str, alignment: str, patch: bool) -> int:
    tk = tokenize(tgt, [text])
    tokens = torch.tensor([tk.ids[0]], device=tgt.cfg.device)
    hooks = []
    if patch:
        hooks_in = split_hook(mapper.src_hook)
        s = cache_activations(src, [text], hooks_in, progress=False)
        t = token_rows(tgt, [text])
        si, ti = match_rows(s, t, alignment)
        with torch.no_grad():
            rep = mapper(torch.cat([s.rows(h)[si] for h in hooks_in], dim=-1).float())
        full = torch.zeros((1, tokens.shape[1], mapper.d_tgt))
        mask = torch.zeros((1, tokens.shape[1]), dtype=torch.bool)
        full[0, t.position[ti]] = rep
        mask[0, t.position[ti]] = True
        hooks = [(mapper.tgt_hook, _replace_hook(full.to(tgt.cfg.device), mask.to(tgt.cfg.device)))]
    with torch.no_grad(), tgt.hooks(fwd_hooks=hooks):
        logits = tgt(tokens)
    return int(logits[0, -1].argmax())


def _complete(src, tgt, prompt: str, alignment: str, max_new_tokens: int, mapper: Mapper | None) -> str:
    """Greedy completion of ``prompt`` by the target, patched through ``mapper`` (``None``:
    clean). Each step re-tokenizes the text so far for both models (the source must read
    the same text), so clean and patched completions are made the same way; no KV cache."""
    eos = tgt.tokenizer.eos_token_id
    special = set(tgt.tokenizer.all_special_ids or [])
    ids: list[int] = []
    for _ in range(max_new_tokens):
        nxt = _greedy_step(
            mapper, src, tgt, prompt + tgt.tokenizer.decode(ids), alignment, mapper is not None
        )
        if nxt == eos or nxt in special:
            break
        ids.append(nxt)
    return tgt.tokenizer.decode(ids)
