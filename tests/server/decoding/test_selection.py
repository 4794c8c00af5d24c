"""stable_top_k equals the first k columns of a stable descending sort, ties and -inf included."""

import numpy as np
import pytest

from server.decoding.selection import stable_top_k


@pytest.mark.parametrize("width, k", [(7, 2), (7, 7), (40, 3), (400, 8), (5, 9)])
def test_matches_a_stable_descending_sort(width, k):
    rng = np.random.default_rng(width * 31 + k)
    # Few distinct values, so ties straddle the k-th place; some rows are mostly -inf.
    values = rng.integers(-4, 0, (20, width)).astype(np.float64)
    values[rng.random((20, width)) < 0.3] = -np.inf
    values[0] = -np.inf
    indices, top = stable_top_k(values, k)
    expected = np.argsort(-values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(top, np.take_along_axis(values, expected, axis=1))


def test_empty_inputs():
    indices, top = stable_top_k(np.zeros((0, 10)), 3)
    assert indices.shape == (0, 3) and top.shape == (0, 3)
