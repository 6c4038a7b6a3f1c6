"""Fusion of dense and lexical scores (pure logic)."""

from __future__ import annotations

import pytest

from campus_search.retrieval.fusion import FusionConfig, fuse


def test_convex_minmax_weights() -> None:
    cos, bm = [0.9, 0.5, 0.7], [0.0, 10.0, 5.0]
    rel = fuse(cos, bm, [True, True, True], [False, True, True], FusionConfig("convex", alpha=0.5))
    assert rel == pytest.approx([0.5, 0.5, 0.5])
    rel = fuse(cos, bm, [True] * 3, [True] * 3, FusionConfig("convex", alpha=1.0))
    assert rel == pytest.approx([1.0, 0.0, 0.5])
    rel = fuse(cos, bm, [True] * 3, [True] * 3, FusionConfig("convex", alpha=0.0))
    assert rel == pytest.approx([0.0, 1.0, 0.5])


def test_rrf_ranks_and_scale() -> None:
    cos, bm = [0.9, 0.8, 0.1], [1.0, 3.0, 2.0]
    rel = fuse(cos, bm, [True, True, False], [True, True, True], FusionConfig("rrf", rrf_k=60))
    # first in both lists would score 1; doc 1 is 2nd dense, 1st lexical
    assert rel[1] == pytest.approx(((1 / 62) + (1 / 61)) * 61 / 2)
    assert rel[2] == pytest.approx((1 / 62) * 61 / 2)  # not in the dense list: lexical share only
    assert max(rel) <= 1.0


def test_single_list_methods_and_edge_cases() -> None:
    assert fuse([], [], [], [], FusionConfig()) == []
    assert fuse([0.3, 0.6], [1, 2], [True, True], [True, True], FusionConfig("dense")) == [0.3, 0.6]
    assert fuse([0.3, 0.6], [4, 2], [True, True], [True, True], FusionConfig("lexical")) == [1.0, 0.0]
    # all-equal scores do not divide by zero
    assert fuse([0.5, 0.5], [0, 0], [True, True], [False, False], FusionConfig(alpha=0.5)) == pytest.approx([0.5, 0.5])
