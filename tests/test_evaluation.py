import numpy as np

from trainer.evaluation import StreamingAUC


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_streaming_auc_matches_exact_auc_in_chunks() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 3000)
    scores = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 3000), 0, 1)
    auc = StreamingAUC(bins=10_000)
    for chunk in np.array_split(np.arange(3000), 7):
        auc.update(scores[chunk], labels[chunk])
    assert abs(auc.value() - exact_auc(scores, labels)) < 2e-3
    assert auc.count == 3000
    assert 0 < auc.log_loss() < 2


def test_auc_is_nan_until_both_classes() -> None:
    auc = StreamingAUC()
    auc.update(np.array([0.3]), np.array([1]))
    assert np.isnan(auc.value())
