"""What identifies a model for artifacts: :class:`ModelId`, and the one :func:`check`.

Every artifact records the identity of the model(s) it was made with: mappers (``meta``'s
``src`` and ``tgt``), steering vectors and SAEs (``model``), activation sets and shards
(flat keys), pairs (the same keys prefixed ``src_``/``tgt_``). :meth:`ModelId.read` reads
all of them, in every spelling written so far; :func:`check` refuses a model whose
identity differs from the recorded one (or, where the caller offers ``force=True``, warns
loudly), raising one :class:`~xferlens.errors.ModelMismatchError` subclass per artifact.

The weights fingerprint comes from ``load_model`` (the zoo's sha256 or a hash of the local
folder); for a model built another way it is a hash of its parameters, computed once. The
tokenizer fingerprint hashes the vocabulary and the BOS rule. Both are kept in side tables
here, weakly keyed by the model and tokenizer objects: nothing is attached to
TransformerLens's or Hugging Face's objects.

Example:
    >>> ident = ModelId.of(model)  # doctest: +SKIP
    >>> ModelId.read(vector_header).check(model, what="this vector belongs elsewhere")  # doctest: +SKIP
"""

import hashlib
import json
import logging
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from transformer_lens import HookedTransformer

from xferlens.errors import ModelMismatchError

logger = logging.getLogger(__name__)

#: model -> how ``load_model`` made it (``weights``, ``spec``, ``name``, ``folder``, ``processing``)
_LOADED: "weakref.WeakKeyDictionary[HookedTransformer, dict]" = weakref.WeakKeyDictionary()
#: model -> hash of its parameters (models ``load_model`` did not make)
_PARAMS: "weakref.WeakKeyDictionary[HookedTransformer, str]" = weakref.WeakKeyDictionary()
#: tokenizer -> {prepend_bos: fingerprint}
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[bool, str]]" = weakref.WeakKeyDictionary()


def remember_source(model: HookedTransformer, weights: str, **details: Any) -> None:
    """Record that ``model``'s weights are ``weights`` (a fingerprint), plus where they came
    from (``load_model`` passes ``spec``, ``name``, ``folder``, ``processing``)."""
    _LOADED[model] = {**details, "weights": str(weights)}


def loaded_from(model: HookedTransformer) -> dict:
    """What ``load_model`` recorded about ``model`` (``weights``, ``spec``, ``name``,
    ``folder``, ``processing``), or ``{}`` for a model made another way."""
    return dict(_LOADED.get(model, {}))


def weights_fingerprint(model: HookedTransformer) -> str:
    recorded = _LOADED.get(model, {}).get("weights")
    if recorded:
        return recorded
    cached = _PARAMS.get(model)
    if cached is None:
        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in sorted(model.state_dict().items()):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        cached = _PARAMS[model] = "params:" + h.hexdigest()[:32]
    return cached


def tokenizer_fingerprint(model: HookedTransformer) -> str | None:
    tok = model.tokenizer
    if tok is None:
        return None
    prepend = bool(model.cfg.default_prepend_bos)
    known = _TOKENIZERS.setdefault(tok, {})
    if prepend not in known:
        payload = json.dumps(
            {"vocab": sorted(tok.get_vocab().items()), "bos": tok.bos_token_id, "prepend_bos": prepend}
        )
        known[prepend] = "vocab:" + hashlib.sha256(payload.encode()).hexdigest()[:32]
    return known[prepend]


@dataclass(frozen=True)
class ModelId:
    """Which model an artifact belongs to. ``None`` means not recorded (never compared).

    Attributes:
        name: ``cfg.model_name``.
        weights: fingerprint of the exact weights.
        tokenizer: fingerprint of the vocabulary and BOS rule (``None``: no tokenizer).
        d_model, n_layers: the model's shape.
    """

    name: str | None = None
    weights: str | None = None
    tokenizer: str | None = None
    d_model: int | None = None
    n_layers: int | None = None

    #: the order mismatches are reported in
    FIELDS: ClassVar[tuple[str, ...]] = ("name", "d_model", "n_layers", "weights", "tokenizer")

    @classmethod
    def of(cls, model: HookedTransformer) -> "ModelId":
        return cls(
            model.cfg.model_name,
            weights_fingerprint(model),
            tokenizer_fingerprint(model),
            model.cfg.d_model,
            model.cfg.n_layers,
        )

    @classmethod
    def read(cls, meta: Mapping, role: str | None = None) -> "ModelId":
        """The identity an artifact's metadata records, in any spelling written so far.

        ``meta`` is ``{"name", "weights", "tokenizer", "d_model", "n_layers"}`` (a
        mapper's ``src``/``tgt``, a vector's or SAE's ``model``), a header holding such a
        dict under ``model``, or the flat keys of activation sets and shards (``model``
        for the name, ``weights`` or the older ``fingerprint``). ``role`` (``"src"`` or
        ``"tgt"``) reads one side of a mapper's meta or of pairs (``src_model``, ...).
        """
        if role is not None:
            side = meta.get(role)
            if isinstance(side, Mapping):
                return cls.read(side)
            cut = len(role) + 1
            return cls.read({k[cut:]: v for k, v in meta.items() if k.startswith(f"{role}_")})
        if isinstance(meta.get("model"), Mapping):
            return cls.read(meta["model"])
        name = meta.get("name")
        if name is None and isinstance(meta.get("model"), str):
            name = meta["model"]
        weights = meta.get("weights")
        if weights is None:
            weights = meta.get("fingerprint")
        return cls(name, weights, meta.get("tokenizer"), meta.get("d_model"), meta.get("n_layers"))

    def to_dict(self) -> dict:
        """``{"name", "weights", "tokenizer", "d_model", "n_layers"}``: what mappers,
        steering vectors and SAEs write."""
        return asdict(self)

    def flat(self, prefix: str = "") -> dict:
        """The flat keys activation sets and shards (``prefix=""``) and pairs
        (``"src_"``/``"tgt_"``) write: ``model`` is the name."""
        return {
            f"{prefix}model": self.name,
            f"{prefix}weights": self.weights,
            f"{prefix}tokenizer": self.tokenizer,
            f"{prefix}d_model": self.d_model,
            f"{prefix}n_layers": self.n_layers,
        }

    def differences(self, given: "ModelId", role: str = "model") -> list[str]:
        """One line per recorded field where ``given`` differs."""
        out = []
        for key in self.FIELDS:
            mine, theirs = getattr(self, key), getattr(given, key)
            if mine is not None and mine != theirs:
                out.append(f"{role} {key}: recorded {mine!r}, given {theirs!r}")
        return out

    def check(
        self, given: "HookedTransformer | ModelId | Mapping", *, what: str, role: str = "model", **kw
    ) -> None:
        """:func:`check` with this identity as the only side."""
        kw["stacklevel"] = kw.get("stacklevel", 1) + 1
        check(what, [(role, self, given)], **kw)


def model_identity(model: HookedTransformer) -> dict:
    """``{"name", "weights", "tokenizer", "d_model", "n_layers"}`` of a model."""
    return ModelId.of(model).to_dict()


def _as_id(x: "HookedTransformer | ModelId | Mapping") -> ModelId:
    if isinstance(x, ModelId):
        return x
    if isinstance(x, Mapping):
        return ModelId.read(x)
    return ModelId.of(x)


def check(
    what: str,
    sides: Sequence[tuple[str, "ModelId | Mapping", "HookedTransformer | ModelId | Mapping | None"]],
    *,
    extra: Sequence[str] = (),
    blocking: Sequence[str] = (),
    force: bool | None = None,
    error: type[ModelMismatchError] = ModelMismatchError,
    shout: str = "USING AN ARTIFACT WITH A MODEL IT WAS NOT MADE FOR",
    stacklevel: int = 1,
) -> None:
    """Refuse models other than the ones an artifact was made with.

    Args:
        what: the message's opening, naming the artifact and its models.
        sides: ``(role, recorded, given)`` per model: ``recorded`` a :class:`ModelId` or
            metadata :meth:`ModelId.read` understands; ``given`` a model, a ``ModelId``,
            such metadata, or ``None`` (not checked). Fields recorded as ``None`` are
            not compared.
        extra: further mismatches the caller found (widths, hooks) that ``force`` may
            override; ``blocking``: ones it may not (a hook the model lacks).
        force: ``None`` when the caller offers no override: any mismatch raises.
            ``False``: raise, and say ``force=True`` would apply it anyway. ``True``:
            warn loudly (``shout``) and log instead, unless there is a ``blocking`` one.
        error: the :class:`~xferlens.errors.ModelMismatchError` subclass to raise.
        stacklevel: of the warning, counted from the caller of ``check``.
    """
    diffs = []
    for role, recorded, given in sides:
        if given is not None:
            diffs += _as_id(recorded).differences(_as_id(given), role)
    diffs += [*extra, *blocking]
    if not diffs:
        return
    msg = f"{what}: " + "; ".join(dict.fromkeys(diffs))
    if force and not blocking:
        warnings.warn(f"{shout}: {msg}", stacklevel=stacklevel + 1)
        logger.warning("force=True: %s", msg)
        return
    raise error(msg + (". Pass force=True to apply it anyway." if force is not None and not blocking else ""))
