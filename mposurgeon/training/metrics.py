"""Evaluation metrics on fixed vectors: the one home of every score `train` and `eval` report.

Classification (class ids, 1-D, one per row): `accuracy`, `macro_f1`, `matthews_corrcoef`,
bundled by `classification_metrics`. Regression (real values, 1-D): `pearson`, `spearman`.
Language modelling (per-token losses in nats): `perplexity`, `exp_loss`.

Each function takes torch tensors, NumPy arrays or sequences of numbers, computes in float64
(exact integer counts for the class metrics) and returns a Python float. The definitions are
those of scikit-learn and SciPy, which are not dependencies: macro-F1 averages over every class
that occurs in the labels or the predictions; MCC is Gorodkin's R_K statistic for K classes;
Spearman's rho is Pearson's r of average ranks (tied values share the mean of their ranks).
A score with no data to measure (no rows, constant vectors) follows the same conventions:
0.0 for the class metrics, NaN for the correlations and perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: What the metric functions accept as a vector.
Vector = Tensor | np.ndarray | Sequence[float] | Sequence[int]


def _vector(values: Vector, name: str) -> Tensor:
    """`values` as a 1-D tensor (on the CPU); numbers not in a tensor are read as NumPy
    reads them (float64, int64), not as torch would (float32)."""
    if isinstance(values, Tensor):
        tensor = values.detach().cpu()
    else:
        tensor = torch.tensor(np.asarray(values))
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (got shape {tuple(tensor.shape)})")
    return tensor


def _pair(preds: Vector, labels: Vector) -> tuple[Tensor, Tensor]:
    """Predictions and labels as 1-D tensors of one length."""
    p, y = _vector(preds, "preds"), _vector(labels, "labels")
    if p.numel() != y.numel():
        raise ValueError(f"{p.numel()} predictions for {y.numel()} labels")
    return p, y


def confusion_matrix(preds: Vector, labels: Vector) -> tuple[Tensor, list[int]]:
    """The K x K matrix of counts (int64), row = true class, column = predicted class, over
    the K classes that occur in `labels` or `preds` (sorted: the second value)."""
    p, y = _pair(preds, labels)
    classes = torch.unique(torch.cat([p, y]).long())
    k = classes.numel()
    pi = torch.searchsorted(classes, p.long())
    yi = torch.searchsorted(classes, y.long())
    counts = torch.bincount(yi * k + pi, minlength=k * k).reshape(k, k)
    return counts, classes.tolist()


def accuracy(preds: Vector, labels: Vector) -> float:
    """The fraction of rows whose predicted class is the true one (0.0 with no rows)."""
    p, y = _pair(preds, labels)
    if y.numel() == 0:
        return 0.0
    return float((p.long() == y.long()).double().mean())


def macro_f1(preds: Vector, labels: Vector) -> float:
    """The mean F1 = 2 TP / (2 TP + FP + FN) over every class that occurs in `labels` or
    `preds` (scikit-learn's `f1_score(average="macro")`; a class never predicted correctly
    scores 0). 0.0 with no rows."""
    counts, _ = confusion_matrix(preds, labels)
    if counts.numel() == 0:
        return 0.0
    tp = counts.diagonal()
    fp, fn = (counts.sum(0) - tp).tolist(), (counts.sum(1) - tp).tolist()
    f1s = [
        2 * t / (2 * t + f + n) if t else 0.0 for t, f, n in zip(tp.tolist(), fp, fn, strict=True)
    ]
    return sum(f1s) / len(f1s)  # Python ints and floats: float64


def matthews_corrcoef(preds: Vector, labels: Vector) -> float:
    """Matthews correlation coefficient for K classes (Gorodkin's R_K, as scikit-learn's
    `matthews_corrcoef`): with the confusion matrix C, t = its row sums (true counts),
    p = its column sums (predicted counts), c = trace(C) and s = the number of rows,

        MCC = (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))

    in [-1, 1]: 1 for perfect predictions, 0 for chance, -1 for inverted binary predictions.
    0.0 when the denominator is 0 (a single class predicted or present, or no rows)."""
    counts, _ = confusion_matrix(preds, labels)
    t = [int(v) for v in counts.sum(1)]
    p = [int(v) for v in counts.sum(0)]
    c, s = int(counts.diagonal().sum()), sum(t)
    numerator = c * s - sum(a * b for a, b in zip(t, p, strict=True))
    var_p = s * s - sum(v * v for v in p)
    var_t = s * s - sum(v * v for v in t)
    if var_p == 0 or var_t == 0:
        return 0.0
    return numerator / math.sqrt(var_p * var_t)  # exact integers until this division


def classification_metrics(preds: Vector, labels: Vector) -> dict[str, float]:
    """`accuracy`, `macro_f1` and `mcc` of predicted vs true class ids."""
    return {
        "accuracy": accuracy(preds, labels),
        "macro_f1": macro_f1(preds, labels),
        "mcc": matthews_corrcoef(preds, labels),
    }


def pearson(x: Vector, y: Vector) -> float:
    """Pearson's correlation r = sum(dx dy) / sqrt(sum(dx^2) sum(dy^2)) (dx = x - mean x),
    clipped to [-1, 1]; NaN when either vector is constant or has fewer than 2 values."""
    a, b = _pair(x, y)
    a, b = a.double(), b.double()
    if a.numel() < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if denominator == 0.0 or not math.isfinite(denominator):
        return math.nan
    return max(-1.0, min(1.0, float((da * db).sum()) / denominator))


def average_ranks(values: Vector) -> Tensor:
    """The 1-based rank of every value (float64), tied values sharing the mean of their ranks:
    [10, 20, 20, 5] -> [2, 3.5, 3.5, 1] (SciPy's `rankdata(method="average")`)."""
    v = _vector(values, "values").double()
    n = v.numel()
    order = torch.argsort(v, stable=True)
    ordered = v[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts.long(), 0) - 1  # the tie group of each sorted position
    sizes = torch.bincount(group)
    first = torch.cumsum(sizes, 0) - sizes  # 0-based position of each group's first value
    mean_rank = first.double() + (sizes.double() + 1) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: Vector, y: Vector) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks of `x` and `y` (ties
    handled as SciPy's `spearmanr` does); NaN when either is constant or holds NaN."""
    a, b = _pair(x, y)
    if bool(torch.isnan(a.double()).any() or torch.isnan(b.double()).any()):
        return math.nan
    return pearson(average_ranks(a), average_ranks(b))


def perplexity(token_losses: Vector, mask: Vector | None = None) -> float:
    """exp of the mean loss per token: `token_losses` in nats, one per token (a flat vector);
    `mask` (same length, 0/1 or bool) keeps the tokens that count (not padding, not the
    prompt). The mean is over tokens, not over batches or rows. inf when the exponential
    overflows, NaN with no tokens."""
    losses = _vector(token_losses, "token_losses").double()
    if mask is not None:
        keep = _vector(mask, "mask").bool()
        if keep.numel() != losses.numel():
            raise ValueError(f"a mask of {keep.numel()} values for {losses.numel()} losses")
        losses = losses[keep]
    if losses.numel() == 0:
        return math.nan
    return exp_loss(float(losses.mean()))


def exp_loss(mean_loss: float) -> float:
    """Perplexity from a mean loss per token (nats): exp(mean_loss); inf where the
    exponential overflows a float, NaN for NaN."""
    if math.isnan(mean_loss):
        return math.nan
    return math.exp(mean_loss) if mean_loss < 709.0 else math.inf  # exp(709.8) overflows
