"""Trainer settings (one section of the process config in `services.config`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerConfig:
    """How the online trainer learns and publishes.

    Args:
        dim: embedding width of the user and item tables.
        learning_rate: row-wise Adagrad step size of the embedding tables.
        init_std: initial row scale.
        negatives: popularity-sampled negatives per positive event (data without impressions).
        uniform_negatives: share of sampled negatives drawn uniformly over items instead of by
            popularity; without it, rare items almost never appear as negatives and drift to the
            top of every list.
        batch_size: most events per training step.
        poll_timeout_s: how long one poll of the log waits for events.
        sync_interval_s: how often changed rows are published to the serving store.
        group_id: consumer group of the trainer on the event log.
        popular_items: length of the popular-items list published for cold users.
        seed: seed of row initialisation and negative sampling.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    dim: int = 32
    learning_rate: float = 0.2
    init_std: float = 0.1
    negatives: int = 4
    uniform_negatives: float = 0.5
    batch_size: int = 512
    poll_timeout_s: float = 0.2
    sync_interval_s: float = 1.0
    group_id: str = "freshrec-trainer"
    popular_items: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "dim": 1 <= self.dim <= 4096,
            "learning_rate": self.learning_rate > 0,
            "init_std": self.init_std >= 0,
            "negatives": 0 <= self.negatives <= 1000,
            "uniform_negatives": 0.0 <= self.uniform_negatives <= 1.0,
            "batch_size": self.batch_size >= 1,
            "poll_timeout_s": self.poll_timeout_s >= 0,
            "sync_interval_s": self.sync_interval_s > 0,
            "group_id": bool(self.group_id),
            "popular_items": self.popular_items >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"trainer.{name}: invalid value {getattr(self, name)!r}")
