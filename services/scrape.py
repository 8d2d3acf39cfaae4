"""Reading another process's Prometheus `/metrics` page: the one parser (prometheus-client's)
that the replay client, the test launchers, the tests and the benchmarks share."""

from __future__ import annotations

from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]
"""(series name, labels, value), e.g. ("freshrec_store_ids", {"table": "user"}, 42.0)."""


def samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (histograms as their `_bucket`, `_sum` and
    `_count` series).

    Example:
        >>> samples('# TYPE x counter\\nx_total{table="user"} 3\\n')
        [('x_total', {'table': 'user'}, 3.0)]
    """
    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def values(text: str, names: str | Iterable[str], **labels: str) -> list[float]:
    """The values of the samples named `names` (one name or several) whose labels include
    `labels`.

    Example:
        >>> page = 'a{t="u"} 1\\na{t="i"} 2\\nb 5\\n'
        >>> values(page, "a"), values(page, "a", t="i"), sum(values(page, ["a", "b"]))
        ([1.0, 2.0], [2.0], 8.0)
    """
    wanted = {names} if isinstance(names, str) else set(names)
    return [
        value
        for name, got, value in samples(text)
        if name in wanted and all(got.get(k) == v for k, v in labels.items())
    ]


def fetch(url: str, client: httpx.Client | None = None, timeout_s: float = 5.0) -> str:
    """The text of the metrics page at `url` (an absolute URL, or a path of `client`'s base URL).

    Raises:
        httpx.HTTPError: the page cannot be read.
    """
    if client is not None:
        return client.get(url, timeout=timeout_s).raise_for_status().text
    return httpx.get(url, timeout=timeout_s).raise_for_status().text
