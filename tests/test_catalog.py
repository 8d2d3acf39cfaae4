"""The trainer's item catalogue: trending and all-time counts, and their extrapolation when a
trainer worker sees only its share of the users."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.catalog import ItemCatalog
from trainer.clock import ModelClock

HALF_LIFE_S = 3600.0


def stream(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, item keys, event times): Zipf-popular items over an hour."""
    rng = np.random.default_rng(seed)
    items = (rng.zipf(1.5, n) % 200 + 1).astype(np.uint64)
    return rng.integers(0, 5000, n), items, np.sort(rng.uniform(0, 3600, n))


def observe(catalog: ItemCatalog, items: np.ndarray, times: np.ndarray) -> None:
    for start in range(0, len(items), 500):  # batches, as the trainer does
        part = slice(start, start + 500)
        keys = items[part]
        catalog.observe(keys, [str(k) for k in keys.tolist()], np.ones(len(keys)), float(times[part][-1]))


def test_drained_trending_counts_come_back_as_counts() -> None:
    _, items, times = stream(5000)
    catalog = ItemCatalog(half_life_s=HALF_LIFE_S)
    observe(catalog, items, times)
    keys, columns = catalog.drain_counts()
    trending, total = catalog.counts(keys)
    np.testing.assert_allclose(ItemCatalog.trending_at(columns[:, 0], catalog.clock_s, HALF_LIFE_S), trending)
    np.testing.assert_array_equal(columns[:, 1], total)
    assert total.sum() == len(items) and (trending <= total).all() and (trending < total).any()  # decayed
    assert len(catalog.drain_counts()[0]) == 0  # nothing changed since


def test_workers_catalogues_extrapolate_to_the_whole_stream() -> None:
    """Two workers each see the users of their partitions: each one's counts, extrapolated by
    its traffic share, estimate the counts of a catalogue that saw everything."""
    users, items, times = stream(40_000, seed=1)
    whole = ItemCatalog(half_life_s=HALF_LIFE_S)
    observe(whole, items, times)
    popular = whole.popular(5)[0]  # over 1,000 events each: a half's noise is a few %
    expected_trending, expected_total = whole.counts(popular)
    for mine in (users % 2 == 0, users % 2 == 1):
        worker = ItemCatalog(half_life_s=HALF_LIFE_S, traffic_share=0.5)
        observe(worker, items[mine], times[mine])
        trending, total = worker.counts(popular)
        np.testing.assert_allclose(total, expected_total, rtol=0.15)
        np.testing.assert_allclose(trending, expected_trending, rtol=0.15)
        keys, columns = worker.drain_counts()
        at = {k: i for i, k in enumerate(keys.tolist())}
        rows = [at[k] for k in popular.tolist()]
        np.testing.assert_allclose(columns[rows, 1], total)
        np.testing.assert_allclose(ItemCatalog.trending_at(columns[rows, 0], worker.clock_s, HALF_LIFE_S), trending)
        # what is relative does not change with the share
        unscaled = ItemCatalog(half_life_s=HALF_LIFE_S)
        observe(unscaled, items[mine], times[mine])
        np.testing.assert_array_equal(worker.popular(10)[1], unscaled.popular(10)[1])
        np.testing.assert_array_equal(worker.share(popular), unscaled.share(popular))


def test_traffic_share_is_validated() -> None:
    with pytest.raises(ValueError, match="traffic_share"):
        ItemCatalog(traffic_share=0.0)


def test_trending_survives_any_time_gap_without_overflow() -> None:
    catalog = ItemCatalog(half_life_s=HALF_LIFE_S)
    keys = np.array([1, 2], dtype=np.uint64)
    catalog.observe(keys, ["a", "b"], np.array([5.0, 1.0]), 880_000_000.0)  # 1997
    for now_s in (880_000_000.0 + 86400, 1.8e9, ((1 << 53) - 1) / 1000):  # a day, to 2027, to 2^53 ms
        catalog.observe(keys[:1], ["a"], np.array([1.0]), now_s)
        trending, counts = catalog.counts(keys)
        assert np.isfinite(trending).all() and trending[0] >= 1.0 and counts.tolist()[1] == 1.0
        _, drained = catalog.drain_counts()
        assert np.isfinite(drained).all()
        assert catalog.popular(1)[0].tolist() == [1]


def test_the_model_clock_follows_traffic_and_cuts_silences_short() -> None:
    clock = ModelClock(max_jump_s=3600.0)
    assert clock.advance(100.0) == 100.0
    assert clock.advance(160.0) == 160.0  # traffic: event time
    assert clock.advance(50.0) == 160.0  # a late event never moves it back
    assert clock.advance(160.0 + 10 * 365 * 86400) == 160.0 + 3600  # ten years of silence: an hour
    assert clock.advance(160.0 + 10 * 365 * 86400 + 30) == 160.0 + 3630  # then traffic again
    assert clock.advance(float("inf")) == 160.0 + 3630 and clock.advance(float("nan")) == 160.0 + 3630


def test_a_batch_spread_over_a_gap_is_no_silence_and_late_events_keep_their_own_time() -> None:
    """A batch from a lagging partition lands hours after the clock, but its events fill the
    time between: the clock follows them all; only a real silence is cut, and an event that
    arrives late maps to when it happened."""
    hour = 3600.0
    clock = ModelClock(max_jump_s=hour)
    clock.advance(0.0)
    batch = np.arange(1, 11) * 0.5 * hour  # ten events every half hour, up to 5 hours
    assert clock.advance(batch) == 5 * hour  # not cut to 1 hour: there was traffic all along
    assert clock.advance(np.array([100 * hour, 100 * hour + 60])) == 6 * hour + 60  # 95 silent hours: one
    late = clock.at(np.array([2 * hour, 100 * hour, 100 * hour + 60]))
    np.testing.assert_allclose(late, [2 * hour, 6 * hour, 6 * hour + 60])
    # a clock checkpointed before cuts were kept resumes and cuts silences from then on
    old = ModelClock(max_jump_s=hour)
    state = dict(old.__dict__, event_s=5 * hour, now_s=5 * hour)
    del state["cuts"]
    resumed = ModelClock.__new__(ModelClock)
    resumed.__setstate__(state)
    assert resumed.advance(50 * hour) == 6 * hour and resumed.at(np.array([50 * hour])).tolist() == [6 * hour]
    # trending counts decay from each event's own model time, whatever order they came in
    catalog, shuffled = ItemCatalog(half_life_s=hour), ItemCatalog(half_life_s=hour)
    keys = np.array([1, 2, 2, 3], dtype=np.uint64)
    times = np.array([0.0, 3 * hour, 3 * hour, 5 * hour])
    catalog.observe(keys, ["a", "b", "b", "c"], np.ones(4), times)
    shuffled.observe(keys[2:], ["b", "c"], np.ones(2), times[2:])
    shuffled.observe(keys[:2], ["a", "b"], np.ones(2), times[:2])
    np.testing.assert_allclose(catalog.counts(keys)[0], shuffled.counts(keys)[0])
    np.testing.assert_allclose(catalog.counts(keys[:1])[0], [2.0**-5])
    with pytest.raises(ValueError, match="max_jump_s"):
        ModelClock(max_jump_s=0)
