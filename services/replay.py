"""Stream a data set through the public REST API at a fixed rate, then report what was learnt."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from services import scrape
from services.datasets import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did: events sent and accepted, how fast, and the trainer's progressive AUC."""

    sent: int
    accepted: int
    seconds: float
    trained: bool
    progressive_auc: float
    trained_s: float = float("nan")  # from the first post until the trainer had trained on all

    @property
    def events_per_s(self) -> float:
        """Events accepted per second of posting."""
        return self.accepted / self.seconds if self.seconds > 0 else float("nan")

    @property
    def trained_events_per_s(self) -> float:
        """Events per second end to end: accepted and trained on (NaN if it did not catch up)."""
        return self.accepted / self.trained_s if self.trained and self.trained_s > 0 else float("nan")


def read_metric(client: httpx.Client, metrics_url: str, name: str) -> float:
    """Sum of all samples of one Prometheus series at `metrics_url` (NaN if absent)."""
    values = scrape.values(scrape.fetch(metrics_url, client), name)
    return float(sum(values)) if values else float("nan")


def read_consumed(client: httpx.Client, metrics_url: str) -> float:
    """Events the trainer has taken from the log: trained on, or dropped as copies of events
    it had trained on (a replay of the same data again)."""
    names = ("freshrec_trainer_events_total", "freshrec_trainer_duplicate_events_total")
    return sum(scrape.values(scrape.fetch(metrics_url, client), names))  # one read of the page


def show_recommendations(
    client: httpx.Client,
    url: str,
    user_id: str,
    names: dict[str, str],
    label: str,
    k: int = 5,
    out: Callable[[str], None] = print,
) -> list[str]:
    """Print (and return) the top-k recommendations for `user_id`."""
    body = client.post(f"{url}/v1/recommendations", json={"user_id": user_id, "k": k}).raise_for_status().json()
    items = [i["item_id"] for i in body["items"]]
    out(f"\n[{label}] top {k} for user {user_id} (model version {body['model_version']}):")
    if not items:
        out("  (nothing yet: the model has seen no events)")
    for rank, item in enumerate(body["items"], 1):
        out(f"  {rank}. {names.get(item['item_id'], item['item_id'])}  score={item['score']:.3f}")
    return items


def replay(
    dataset: Dataset,
    url: str = "http://127.0.0.1:8000",
    rate: float = 0.0,
    batch_size: int = 500,
    metrics_url: str | None = None,
    watch_user: str | None = None,
    checkpoints: int = 4,
    wait_s: float = 300.0,
    out: Callable[[str], None] = print,
    api_key: str | None = None,
) -> ReplayReport:
    """Post `dataset.events` in order, `batch_size` per call, at about `rate` events/s (0 = as
    fast as the gateway takes them); then wait until the trainer has trained on all of them.

    Args:
        metrics_url: where the trainer's /metrics are (default: `url`/metrics, embedded mode).
        watch_user: show this user's recommendations at `checkpoints` points of the stream.
        wait_s: longest wait for the trainer to catch up.
        api_key: sent as `Authorization: Bearer` when the gateway wants keys (ingest and
            recommend scopes, or admin).
    """
    metrics_url = metrics_url or f"{url}/metrics"
    events = dataset.events
    marks = {len(events) * c // checkpoints for c in range(1, checkpoints + 1)}
    accepted = 0
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    with httpx.Client(timeout=30.0, headers=headers) as client:
        trained_before = read_consumed(client, metrics_url)
        if watch_user:
            show_recommendations(client, url, watch_user, dataset.item_names, "before replay", out=out)
        start = time.perf_counter()
        with tqdm(total=len(events), unit="ev", desc=f"replay {dataset.name}") as bar:
            for offset in range(0, len(events), batch_size):
                batch = events[offset : offset + batch_size]
                for attempt in range(10):
                    response = client.post(f"{url}/v1/events", json={"events": batch})
                    if response.status_code != 503:
                        break
                    time.sleep(float(response.headers.get("Retry-After", "1")) * (attempt + 1))
                response.raise_for_status()
                accepted += response.json()["accepted"]
                bar.update(len(batch))
                done = offset + len(batch)
                if rate > 0:
                    ahead = done / rate - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                if watch_user and any(offset < m <= done for m in marks) and done < len(events):
                    show_recommendations(client, url, watch_user, dataset.item_names, f"after {done:,} events", out=out)
        seconds = time.perf_counter() - start

        deadline = time.monotonic() + wait_s
        trained = False
        while time.monotonic() < deadline:
            if read_consumed(client, metrics_url) - trained_before >= accepted:
                trained = True
                break
            time.sleep(0.25)  # a scrape of /metrics costs the node: not more often
        trained_s = time.perf_counter() - start
        auc = read_metric(client, metrics_url, "freshrec_trainer_progressive_auc")
        if watch_user:
            time.sleep(1.5)  # one sync interval, so the last rows reach serving
            show_recommendations(client, url, watch_user, dataset.item_names, "after replay", out=out)
    report = ReplayReport(len(events), accepted, seconds, trained, auc, trained_s)
    caught_up = f"yes, {trained_s:.1f}s after the first post" if trained else "NO"
    out(
        f"\nreplayed {report.accepted:,}/{report.sent:,} events in {report.seconds:.1f}s "
        f"({report.events_per_s:,.0f} events/s); trainer caught up: {caught_up}; "
        f"progressive AUC: {report.progressive_auc:.4f}"
    )
    return report
