"""metrics.py: the evaluation metrics of GLUE, IMDb and SQuAD v1.1, in plain numpy.

    from tasks.metrics import accuracy, f1, matthews_corrcoef, pearson, spearman, squad_f1
    accuracy([1, 0, 1], [1, 1, 1])          # 0.666...

Every function takes lists or numpy arrays and returns a float in 0-1 (correlations in -1..1),
never a percentage: the report multiplies by 100 for display. Paper: section 4 and 4.1 (Table 1:
GLUE dev; Table 2: IMDb test accuracy, SQuAD v1.1 dev EM/F1). Which metrics each GLUE task
reports, and the GLUE macro-score, are in glue.py. The SQuAD functions follow the official v1.1
evaluation script, including its treatment of answers that normalise to the empty string.
"""

import re
import string
from collections import Counter

import numpy as np

_PUNCT = set(string.punctuation)


def _pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two non-empty 1-d sequences of equal length, got shapes {a.shape} "
                         f"and {b.shape}")
    return a, b


def accuracy(preds, labels):
    preds, labels = _pair(preds, labels)
    return float(np.mean(preds == labels))


def f1(preds, labels):
    """Binary F1 of the positive class 1; 0 when there is no true positive (as sklearn, without the
    warning)."""
    preds, labels = _pair(preds, labels)
    tp = np.sum((preds == 1) & (labels == 1))
    fp = np.sum((preds == 1) & (labels != 1))
    fn = np.sum((preds != 1) & (labels == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews_corrcoef(preds, labels):
    """Matthews correlation (Gorodkin's multiclass form, the usual formula for two classes).
    0 when either side is constant, where the formula divides by zero."""
    preds, labels = _pair(preds, labels)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    conf = np.zeros((len(classes), len(classes)))  # (true, predicted)
    np.add.at(conf, (idx[:len(labels)], idx[len(labels):]), 1)
    t, p, n = conf.sum(1), conf.sum(0), conf.sum()
    cov = np.trace(conf) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov / denom) if denom else 0.0


def pearson(x, y):
    """Pearson correlation; 0 when either side is constant (scipy would return nan)."""
    x, y = (v.astype(np.float64) for v in _pair(x, y))
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom else 0.0


def _ranks(a):
    """1-based ranks; ties share the average of the ranks they span (scipy's rankdata average)."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def spearman(x, y):
    x, y = _pair(x, y)
    return pearson(_ranks(x), _ranks(y))


def normalize_answer(s):
    """The official SQuAD v1.1 normalisation: lower case, drop punctuation, drop a/an/the, collapse
    spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _ground_truths(ground_truths):
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    if not ground_truths:
        raise ValueError("need at least one ground-truth answer")
    return ground_truths


def squad_em(prediction, ground_truths):
    """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
    pred = normalize_answer(prediction)
    return float(max(pred == normalize_answer(gt) for gt in _ground_truths(ground_truths)))


def _token_f1(pred_tokens, gt_tokens):
    # As the v1.1 script: no shared token (which includes both sides empty) scores 0.
    same = sum((Counter(pred_tokens) & Counter(gt_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gt_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction, ground_truths):
    """Bag-of-tokens F1 between the normalised prediction and each ground truth: the best one."""
    pred = normalize_answer(prediction).split()
    truths = _ground_truths(ground_truths)
    return max(_token_f1(pred, normalize_answer(gt).split()) for gt in truths)
