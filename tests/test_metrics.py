"""training/metrics.py against reference formulas computed here independently (NumPy, by
definition), hand-worked examples with known values, and properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mposurgeon.training import metrics as M
from mposurgeon.training import tasks

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)

#: Pairs of class-id vectors of one length (1..40 rows, classes 0..4).
label_pairs = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
    )
)
#: Pairs of real vectors of one length (2..30 values, moderate magnitudes).
real_pairs = st.integers(2, 30).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n),
        st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n),
    )
)


# -- references, written from the definitions -----------------------------------------------


def ref_macro_f1(preds: list[int], labels: list[int]) -> float:
    """Mean over the classes present of 2 P R / (P + R), precision and recall per class."""
    p, y = np.array(preds), np.array(labels)
    scores = []
    for c in sorted(set(preds) | set(labels)):
        tp = np.sum((p == c) & (y == c))
        precision = tp / np.sum(p == c) if np.sum(p == c) else 0.0
        recall = tp / np.sum(y == c) if np.sum(y == c) else 0.0
        scores.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    return float(np.mean(scores))


def ref_mcc(preds: list[int], labels: list[int]) -> float:
    """Gorodkin's R_K as a correlation of one-hot matrices: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y))
    with cov(A, B) = sum over classes k of the covariance of columns A_k and B_k."""
    classes = sorted(set(preds) | set(labels))
    x = np.array([[float(v == c) for c in classes] for v in labels])
    y = np.array([[float(v == c) for c in classes] for v in preds])
    x, y = x - x.mean(0), y - y.mean(0)
    cov_xy, cov_xx, cov_yy = np.sum(x * y), np.sum(x * x), np.sum(y * y)
    if cov_xx * cov_yy == 0:
        return 0.0
    return float(cov_xy / np.sqrt(cov_xx * cov_yy))


def ref_ranks(values: list[float]) -> list[float]:
    """rank_i = #{values below v_i} + (#{values equal to v_i} + 1) / 2: the average rank."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


# -- classification ---------------------------------------------------------------------------


def test_hand_worked_classification_scores() -> None:
    preds, labels = [0, 0, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2]
    # Confusion (rows true): [[2,0,0],[0,1,1],[0,0,2]]; t = (2,2,2), p = (2,1,3), c = 5, s = 6.
    assert M.accuracy(preds, labels) == 5 / 6
    assert M.macro_f1(preds, labels) == pytest.approx((1 + 2 / 3 + 0.8) / 3, abs=1e-15)
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(18 / math.sqrt(22 * 24), abs=1e-15)
    # Binary: TP=2, TN=0, FP=1, FN=1 -> (TP TN - FP FN) / sqrt(3 * 3 * 1 * 1) = -1/3.
    assert M.matthews_corrcoef([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3, abs=1e-15)
    # A class never predicted right scores F1 0; chance-level predictions score MCC 0.
    assert M.macro_f1([1, 1], [0, 1]) == pytest.approx((0 + 2 / 3) / 2)
    assert M.matthews_corrcoef([0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2]) == 0.0
    assert M.classification_metrics(preds, labels) == {
        "accuracy": M.accuracy(preds, labels),
        "macro_f1": M.macro_f1(preds, labels),
        "mcc": M.matthews_corrcoef(preds, labels),
    }


def test_degenerate_classification_inputs() -> None:
    assert M.classification_metrics([], []) == {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}
    assert M.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # one class: no correlation
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # one class predicted
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        M.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        M.macro_f1(torch.zeros(2, 2), torch.zeros(2, 2))


def test_the_tasks_score_with_the_metrics_module() -> None:
    """One home: the task scorers import the metric functions, they keep no copy."""
    assert tasks.classification_metrics is M.classification_metrics
    assert tasks.pearson is M.pearson and tasks.spearman is M.spearman
    assert tasks.exp_loss is M.exp_loss


@SETTINGS
@given(label_pairs)
def test_classification_scores_match_the_references(pair: tuple[list[int], list[int]]) -> None:
    preds, labels = pair
    assert M.accuracy(preds, labels) == pytest.approx(np.mean(np.equal(preds, labels)))
    assert M.macro_f1(preds, labels) == pytest.approx(ref_macro_f1(preds, labels), abs=1e-12)
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(ref_mcc(preds, labels), abs=1e-12)
    # The same scores from tensors and arrays as from lists.
    assert M.matthews_corrcoef(torch.tensor(preds), np.array(labels)) == pytest.approx(
        M.matthews_corrcoef(preds, labels), abs=0
    )


@SETTINGS
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_mcc_of_perfect_predictions_is_one(labels: list[int]) -> None:
    expected = 1.0 if len(set(labels)) > 1 else 0.0  # one class only: undefined, reported 0
    assert M.matthews_corrcoef(labels, labels) == expected
    assert M.macro_f1(labels, labels) == 1.0 and M.accuracy(labels, labels) == 1.0


@SETTINGS
@given(st.lists(st.integers(0, 1), min_size=2, max_size=40).filter(lambda v: len(set(v)) == 2))
def test_mcc_of_inverted_binary_predictions_is_minus_one(labels: list[int]) -> None:
    assert M.matthews_corrcoef([1 - v for v in labels], labels) == -1.0


@SETTINGS
@given(label_pairs, st.permutations(range(5)))
def test_mcc_ignores_the_names_of_classes(pair, renaming) -> None:
    """Renaming the classes (the same way in both vectors) changes no score."""
    preds, labels = pair
    renamed = ([renaming[v] for v in preds], [renaming[v] for v in labels])
    assert M.matthews_corrcoef(*renamed) == pytest.approx(M.matthews_corrcoef(preds, labels))
    assert M.macro_f1(*renamed) == pytest.approx(M.macro_f1(preds, labels))


# -- regression -------------------------------------------------------------------------------


def test_hand_worked_correlations() -> None:
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9), abs=1e-15)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == -1.0
    # Ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5).
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert M.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert M.average_ranks([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]
    assert M.spearman([1, 5, 2, 9], [10, 200, 30, 1000]) == 1.0  # monotone: rho 1, r below
    assert M.pearson([1, 5, 2, 9], [10, 200, 30, 1000]) < 0.99


def test_undefined_correlations_are_nan() -> None:
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))  # constant
    assert math.isnan(M.spearman([4, 4], [1, 2]))
    assert math.isnan(M.pearson([1], [2]))  # one value
    assert math.isnan(M.spearman([1, float("nan"), 3], [1, 2, 3]))


@SETTINGS
@given(real_pairs)
def test_correlations_match_the_references(pair: tuple[list[float], list[float]]) -> None:
    x, y = pair
    rx, ry = ref_ranks(x), ref_ranks(y)
    assert M.average_ranks(x).tolist() == rx
    if np.std(x) < 1e-6 or np.std(y) < 1e-6:
        return
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    if np.std(rx) > 0 and np.std(ry) > 0:
        assert M.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-9)


@SETTINGS
@given(real_pairs, st.floats(0.01, 100), st.floats(-1e3, 1e3), st.booleans())
def test_pearson_is_invariant_to_affine_maps(pair, scale, shift, flip) -> None:
    """r(a x + b, y) = sign(a) r(x, y)."""
    x, y = (np.array(v) for v in pair)
    if np.std(x) < 1e-2 or np.std(y) < 1e-2:
        return
    a = -scale if flip else scale
    expected = M.pearson(x, y) * (-1 if flip else 1)
    assert M.pearson(a * x + shift, y) == pytest.approx(expected, abs=1e-7)


@SETTINGS
@given(
    st.integers(2, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(-20, 20), min_size=n, max_size=n),  # small range: many ties
            st.lists(st.integers(-20, 20), min_size=n, max_size=n),
        )
    )
)
def test_spearman_is_invariant_to_monotone_maps_ties_included(pair) -> None:
    x, y = (np.array(v, dtype=np.float64) for v in pair)
    rho = M.spearman(x, y)
    if math.isnan(rho):
        assert len(set(x.tolist())) == 1 or len(set(y.tolist())) == 1
        return
    increasing = [np.exp(x / 5), x**3 + x, np.arctan(x) * 7 - 3]
    for fx in increasing:
        assert M.spearman(fx, y) == pytest.approx(rho, abs=1e-12)
    assert M.spearman(-(x**3), y) == pytest.approx(-rho, abs=1e-12)  # decreasing: sign flips


# -- language modelling -----------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_token_loss() -> None:
    assert M.perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)
    # Over tokens, not rows: a 3-token row and a 1-token row, masks picking them out.
    losses = torch.tensor([[1.0, 1.0, 1.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert M.perplexity(losses.flatten(), mask.flatten()) == pytest.approx(math.exp(7 / 4))
    assert M.perplexity([0.0]) == 1.0
    assert M.perplexity([800.0]) == math.inf
    assert math.isnan(M.perplexity([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError, match="mask of 1 values for 2"):
        M.perplexity([1.0, 2.0], [1])


def test_exp_loss_is_perplexity_of_a_mean_loss() -> None:
    assert M.exp_loss(1.0) == math.e and M.exp_loss(0.0) == 1.0
    assert M.exp_loss(800.0) == math.inf and math.isnan(M.exp_loss(math.nan))
    assert M.perplexity([0.5, 1.5]) == M.exp_loss(1.0)
