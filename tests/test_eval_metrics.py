"""AA, BWT, FWT and forgetting on hand-computed matrices, including the sign conventions."""

from __future__ import annotations

import pytest

from llmcl.eval import metrics as M

A = [[0.9, 0.1, 0.0],
     [0.5, 0.8, 0.2],
     [0.3, 0.4, 0.7]]
BASE = [0.1, 0.0, 0.1]


def test_final_metrics_by_hand():
    s = M.summary(A, BASE)
    assert s["AA"] == pytest.approx((0.3 + 0.4 + 0.7) / 3)
    assert s["BWT"] == pytest.approx(((0.3 - 0.9) + (0.4 - 0.8)) / 2)  # -0.5: forgetting is negative BWT
    assert s["FWT"] == pytest.approx(((0.1 - 0.0) + (0.2 - 0.1)) / 2)  # +0.1
    assert s["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.4)) / 2)  # +0.5: forgetting is positive


def test_metrics_after_an_intermediate_stage():
    s = M.summary(A, BASE, k=1)
    assert s["AA"] == pytest.approx(0.65)
    assert s["BWT"] == pytest.approx(-0.4)
    assert s["FWT"] == pytest.approx(0.1)
    assert s["forgetting"] == pytest.approx(0.4)
    first = M.summary(A, BASE, k=0)
    assert first == {"AA": pytest.approx(0.9), "BWT": None, "FWT": None, "forgetting": None}


def test_improving_earlier_tasks_gives_positive_bwt_and_negative_forgetting():
    improving = [[0.5, 0.0], [0.7, 0.9]]
    s = M.summary(improving, [0.0, 0.0])
    assert s["BWT"] == pytest.approx(0.2)
    assert s["forgetting"] == pytest.approx(-0.2)


def test_forgetting_uses_the_best_earlier_score_not_the_diagonal():
    # task 0 peaks after stage 1 (0.95), not at its own stage (0.6)
    m = [[0.6, 0.0, 0.0], [0.95, 0.7, 0.0], [0.5, 0.7, 0.8]]
    assert M.forgetting(m, 2) == pytest.approx(((0.95 - 0.5) + (0.7 - 0.7)) / 2)
    assert M.backward_transfer(m, 2) == pytest.approx(((0.5 - 0.6) + (0.7 - 0.7)) / 2)


def test_forgetting_ignores_scores_from_before_a_task_was_learned():
    # task 1 scored 0.9 before stage 1 trained it (transfer), 0.6 after: only 0.6 can be forgotten
    m = [[0.8, 0.9, 0.1], [0.8, 0.6, 0.1], [0.8, 0.5, 0.7]]
    assert M.forgetting(m, 2) == pytest.approx(((0.8 - 0.8) + (0.6 - 0.5)) / 2)


def test_lower_is_better_metrics_enter_negated():
    bpb = [[1.0, 3.0], [1.5, 1.2]]  # bits per byte: stage 2 made task 0 worse (1.0 -> 1.5)
    scores = [[M.oriented(v, higher_is_better=False) for v in row] for row in bpb]
    s = M.summary(scores, [M.oriented(v, False) for v in (2.0, 3.2)])
    assert s["BWT"] == pytest.approx(-0.5)  # worse perplexity = negative transfer
    assert s["forgetting"] == pytest.approx(0.5)
    assert s["FWT"] == pytest.approx(-3.0 + 3.2)  # stage 1 lowered task 1's bpb from 3.2 to 3.0: positive


def test_missing_cells_are_skipped():
    m = [[0.9, None], [0.3, 0.8]]
    assert M.summary(m, None) == {"AA": pytest.approx(0.55), "BWT": pytest.approx(-0.6), "FWT": None,
                                  "forgetting": pytest.approx(0.6)}


def test_a_task_with_several_filters_reports_its_first_filter_and_keeps_the_others_by_name():
    """gsm8k-style results (strict-match first, then flexible-extract): the matrix's value is the first filter's,
    the task's default, not whichever came last; the other filter's value stays in the row, named."""
    from llmcl.eval.harness import _parse

    results = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.30,
                                 "exact_match_stderr,strict-match": 0.02, "exact_match,flexible-extract": 0.45,
                                 "exact_match_stderr,flexible-extract": 0.03}},
               "n-samples": {"t": {"original": 100, "effective": 100}},
               "higher_is_better": {"t": {"exact_match": True}}, "versions": {"t": 3}}
    r = _parse("t", results)
    assert (r.metric, r.value, r.stderr, r.n) == ("exact_match", 0.30, 0.02, 100)
    assert r.metrics == {"exact_match": 0.30, "exact_match,flexible-extract": 0.45}
