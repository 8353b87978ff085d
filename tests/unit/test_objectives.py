import numpy as np
import pytest

from weightrelay.objectives import parse_objective


@pytest.mark.parametrize(
    "spec, name",
    [("identity", "identity"), ("swap:1,7", "swap:1,7"), ("SWAP: 7 , 1", "swap:1,7"),
     ("perm:0,1,2,3,4,5,6,7,8,9", "identity"), ("perm:1,0,2,3,4,5,6,7,8,9", "swap:0,1"),
     ("perm:9,8,7,6,5,4,3,2,1,0", "perm:9,8,7,6,5,4,3,2,1,0")],
)
def test_parse_and_canonical_name(spec, name):
    objective = parse_objective(spec)
    assert objective.name == name
    assert parse_objective(objective.name) == objective


def test_swap_maps_labels_both_ways_and_leaves_the_rest():
    labels = np.array([0, 1, 7, 3, 1, 9, 7], dtype=np.int64)
    trained = parse_objective("swap:1,7").apply(labels)
    assert trained.tolist() == [0, 7, 1, 3, 7, 9, 1]
    assert trained.dtype == labels.dtype


def test_permutation_maps_label_i_to_p_i():
    objective = parse_objective("perm:9,8,7,6,5,4,3,2,1,0")
    assert objective.apply(np.arange(10)).tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize(
    "spec, message",
    [("rotate:1", "unknown objective kind"), ("swap:1", "exactly two labels"), ("swap:3,3", "two different"),
     ("swap:1,12", "out of range"), ("swap:a,b", "is not a label"), ("perm:0,1,2", "exactly once"),
     ("perm:0,0,2,3,4,5,6,7,8,9", "exactly once"), ("mirror", "unknown objective")],
)
def test_bad_objectives_say_what_to_write(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_objective(spec)


def test_objectives_over_another_class_count():
    assert parse_objective("swap:0,4", num_classes=5).mapping == (4, 1, 2, 3, 0)
    assert parse_objective("identity", num_classes=3).mapping == (0, 1, 2)
    with pytest.raises(ValueError, match="out of range 0-4"):
        parse_objective("swap:1,7", num_classes=5)
