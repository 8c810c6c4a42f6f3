"""``report.md`` and its figures, from a finished run's step records (no model needed)."""

import math
from pathlib import Path

from xferlens.evaluation.patching import _cell
from xferlens.evaluation.steering import SteeringReport


def text_table(rows: list[dict]) -> str:
    """Plain-text table of ``rows`` (dicts with the same keys), columns padded."""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def summary_rows(run) -> list[dict]:
    """One row per steering condition: rate, CI, perplexity and the ratio to native."""
    rep = SteeringReport(run.results["steering"]["rows"], run.results["steering"]["meta"])
    rows = []
    for r in rep.rows:
        native = rep.rate("native", r["alpha"]) if r["label"] != "none" else math.nan
        rows.append(
            {
                "condition": r["label"],
                "alpha": "-" if r["label"] == "none" else f"{r['alpha']:g}",
                "rate": f"{r['rate']:.0%}",
                "95% CI": f"{r['ci'][0]:.0%}-{r['ci'][1]:.0%}",
                "/ native": "-"
                if r["label"] in ("none", "native") or not native
                else f"{r['rate'] / native:.2f}x",
                "perplexity": "-" if r.get("perplexity") is None else f"{r['perplexity']:.1f}",
            }
        )
    return rows


def summary_table(run) -> str:
    return text_table(summary_rows(run))


def success_bars(rep: SteeringReport, path: Path) -> None:
    """Grouped bars: rate per condition at each alpha, 95 % CIs, 'none' as a line."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [lab for lab in rep.labels if lab != "none"]
    alphas = rep.alphas
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(alphas) * max(1, len(labels)) / 3, 3.4))
    w = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        rows = [next(r for r in rep.rows if r["label"] == lab and r["alpha"] == a) for a in alphas]
        xs = np.arange(len(alphas)) + (i - (len(labels) - 1) / 2) * w
        err = [[r["rate"] - r["ci"][0] for r in rows], [r["ci"][1] - r["rate"] for r in rows]]
        ax.bar(xs, [r["rate"] for r in rows], w, yerr=err, capsize=2, label=lab)
    ax.axhline(rep.rate("none"), color="gray", ls="--", label="none")
    ax.set_xticks(range(len(alphas)), [f"alpha {a:g}" for a in alphas])
    ax.set_ylabel(f"{rep.meta.get('judge', 'judge')} rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(f"{rep.meta.get('model', '')}: {rep.meta.get('n_prompts')} held-out prompts", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(run) -> Path:
    spec, res, folder = run.spec, run.results, Path(run.folder)
    st = res["steering"]
    rep = SteeringReport(st["rows"], st["meta"])
    success_bars(rep, folder / "figures" / "success_bars.png")
    lay, vec, maps = res["layers"], res["vectors"], res["mappers"]
    total = sum(run.seconds.values())
    out = [
        f"# {spec.name}: {spec.source.model} L{lay['src_layer']} -> {spec.target.model} L{lay['tgt_layer']}",
        "",
        f"Spec: `spec.yaml` (fingerprint {spec.fingerprint()}). Steps took "
        + ", ".join(f"{k} {v:.0f} s" for k, v in run.seconds.items())
        + f"; {total:.0f} s in all.",
        "",
        "## Layer pair",
        "",
    ]
    if lay["searched"]:
        out += [
            f"Linear {lay['method'].upper()} over {lay['n_rows']:,} paired tokens of held-out corpus text "
            f"(first token of each text dropped), {len(lay['src_layers'])} x {len(lay['tgt_layers'])} "
            f"layers; best pair within depth {tuple(spec.search.depth)}: "
            f"**L{lay['src_layer']} -> L{lay['tgt_layer']}** "
            f"(score {lay['score']:.3f}). Next: "
            + ", ".join(f"L{a}->L{b} {s:.3f}" for a, b, s in lay["top"][1:4]),
            "",
            "![layer pairs](figures/layer_pairs.png)",
            "",
        ]
    else:
        out += ["Both layers set in the spec (no search).", ""]
    out += [
        "## Mappers",
        "",
        f"Fitted on {maps['rows']:,} paired content-token rows from {maps['texts']} texts.",
        "",
        "| kind | validation MSE | validation FVU |",
        "|---|---|---|",
    ]
    for k, h in maps["kinds"].items():
        fvu = h.get("val_fvu")
        out.append(f"| {k} | {h.get('val_mse', math.nan):.4g} | {'-' if fvu is None else f'{fvu:.3f}'} |")
    cards = res["report_cards"]["cards"]
    if cards:
        out += [
            "",
            "### Report cards (held-out text; patch every position of the target layer)",
            "",
            "| kind | FVU | cosine | KL mapped | KL mean-ablation | KL random map | KL ratio (paper: 0.60) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, c in cards.items():
            rc, p = c["reconstruction"]["mapped"], c["patching"]
            out.append(
                f"| {k} | {rc['fvu']:.3f} | {rc['cosine']:.3f} | {p['mapped']['kl']:.3f} | "
                f"{p['mean_ablation']['kl']:.3f} | {p['random_map']['kl']:.3f} | {c['kl_ratio']:.3f} |"
            )
        out += [""] + [f"![report card {k}](figures/report_card_{k}.png)" for k in cards]
    out += [
        "",
        "## Steering vectors",
        "",
        f"Difference of means at the last prompt token ({_prompt_note(spec, vec)}); transferred through the "
        f"`{vec['mapper']}` map. cosine(transferred, native) = **{vec['cosine_transferred_native']:.3f}**.",
        "",
        "| vector | norm | norm / typical activation norm |",
        "|---|---|---|",
    ]
    for n, v in vec["vectors"].items():
        out.append(f"| {n} | {v['norm']:.3g} | {v['relative_norm']:.3f} |")
    out += [
        "",
        f"## Steering the target ({st['meta'].get('n_prompts')} held-out prompts, judge "
        f"`{st['meta'].get('judge')}`, greedy, {spec.evaluation.max_new_tokens} new tokens)",
        "",
        "Controls: no steering (`none`) and a random direction with the native vector's norm (`random`).",
        "",
        "| condition | alpha | rate | 95 % CI | / native | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary_rows(run):
        out.append("| " + " | ".join(r.values()) + " |")
    out += [
        "",
        "![alpha sweep](figures/alpha_sweep.png)",
        "",
        "![success bars](figures/success_bars.png)",
        "",
    ]
    out += _completions(st, max(rep.alphas))
    path = folder / "report.md"
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(path)
    return path


def _prompt_note(spec, vec) -> str:
    used = vec.get("prompts_used", {}).get("source", {})
    what = (
        "harmful vs harmless instructions"
        if spec.vector.task == "refusal"
        else "positive vs negative prompts"
    )
    filt = ", filtered by the model's own behaviour" if spec.vector.filter_by_behaviour else ""
    return f"{what}, {used.get('positive', '?')} + {used.get('negative', '?')} prompts in the source{filt}"


def _completions(st: dict, alpha: float, n: int = 3) -> list[str]:
    rows = {(r["label"], r["alpha"]): r for r in st["rows"]}
    none = next(r for r in st["rows"] if r["label"] == "none")
    show = [
        lab
        for lab in ("native", "transferred", "transferred (recalibrated)", "random")
        if (lab, alpha) in rows
    ]
    head = "| prompt | none | " + " | ".join(f"{lab} (alpha {alpha:g})" for lab in show) + " |"
    lines = ["## Side-by-side completions", "", head, "|" + "---|" * (2 + len(show))]
    for i, prompt in enumerate(st["prompts"][:n]):
        cells = [_cell(prompt, 80), _cell(none["completions"][i])]
        cells += [_cell(rows[(lab, alpha)]["completions"][i]) for lab in show]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
