import pytest

from gtex_assets.core.batching import contiguous_batches


def test_contiguous_batches_split_on_gaps_and_size():
    keys = [f"k{i}" for i in range(10)]
    wanted = {"k1", "k2", "k3", "k5", "k6", "k7", "k8", "k9"}
    assert contiguous_batches(keys, wanted, max_size=3) == [
        ["k1", "k2", "k3"], ["k5", "k6", "k7"], ["k8", "k9"],
    ]  # fmt: skip
    assert contiguous_batches(keys, set(), 3) == []
    assert contiguous_batches(keys, {"k0"}, 50) == [["k0"]]
    with pytest.raises(ValueError):
        contiguous_batches(keys, wanted, 0)
