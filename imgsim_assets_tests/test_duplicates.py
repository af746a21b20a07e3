"""Grouping rules and the B-cubed measure that chooses between them."""

import numpy as np
import pytest

from imgsim_assets.core import duplicates


def _pairs(*edges):
    a, b, s = zip(*edges)
    return np.array(a), np.array(b), np.array(s, dtype=np.float32)


def test_connected_groups_number_the_largest_first():
    groups = duplicates.connected_groups(np.array([1, 2, 10, 20, 30, 40]), np.array([2, 3, 11, 30, 40, 50]))
    assert groups == {20: 0, 30: 0, 40: 0, 50: 0, 1: 1, 2: 1, 3: 1, 10: 2, 11: 2}
    assert duplicates.connected_groups(np.zeros(0, np.int64), np.zeros(0, np.int64)) == {}


def test_a_chain_is_one_connected_group_but_not_one_representative_group():
    # Two tight groups {1,2,3} and {7,8,9}, joined by one bridge 3–7.
    a, b, s = _pairs((1, 2, 0.99), (1, 3, 0.98), (2, 3, 0.98), (7, 8, 0.99), (7, 9, 0.98), (8, 9, 0.97), (3, 7, 0.9))
    assert set(duplicates.connected_groups(a, b, s).values()) == {0}
    groups = duplicates.representative_groups(a, b, s)
    assert groups[1] == groups[2] and groups[7] == groups[8] == groups[9] and groups[1] != groups[7]
    assert groups[3] in (groups[1], groups[7])  # with one side or the other, never joining them


def test_representatives_are_paired_with_every_member():
    # A star around 5 plus a tail: 4 is paired with 5 only through 6.
    a, b, s = _pairs((5, 1, 0.9), (5, 2, 0.9), (5, 3, 0.9), (5, 6, 0.9), (6, 4, 0.95))
    groups = duplicates.representative_groups(a, b, s)
    assert {i for i, g in groups.items() if g == groups[5]} == {1, 2, 3, 5, 6}
    assert 4 not in groups  # its only partner was grouped around 5 first
    assert duplicates.representative_groups(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)) == {}


def test_bcubed_purity_and_completeness():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert duplicates.bcubed(truth, truth) == (1.0, 1.0)
    one_group = np.zeros(8)
    assert duplicates.bcubed(one_group, truth) == (0.5, 1.0)
    singletons = np.arange(8)
    assert duplicates.bcubed(singletons, truth) == (1.0, 0.25)
    halves = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert duplicates.bcubed(halves, truth) == (1.0, 0.5)
    assert duplicates.f1(1.0, 0.5) == pytest.approx(2 / 3)


def test_group_labels_give_ungrouped_items_labels_of_their_own():
    labels = duplicates.group_labels(np.array([10, 11, 12, 13]), {10: 0, 12: 0})
    assert labels[0] == labels[2] == 0 and len(set(labels.tolist())) == 3
