"""The analysis stage's decisions: models, the reported model, folds, tissues left out."""

import numpy as np
import polars as pl
import pytest

from gtex_assets.core.errors import InputError
from gtex_assets.lib.analysis.selection import (
    best_model,
    fold_plan,
    model_label,
    model_table,
    pick_models,
    tissues_to_keep,
)

IDS = ["ots", "run-e01", "run-e05"]
CARDS = pl.DataFrame(
    {"model_id": IDS, "kind": ["off_the_shelf", "checkpoint", "checkpoint"],
     "epoch": [None, 1, 5], "selected": [False, False, True]}
)  # fmt: skip


def test_model_table_from_cards_and_inferred():
    m = model_table(IDS, CARDS, None)
    assert m["selected"].to_list() == [False, False, True] and m["epoch"].to_list() == [None, 1, 5]
    # no cards: an id with an epoch recorded elsewhere is unknown -> off the shelf; the
    # checkpoints table decides the selection
    ck = pl.DataFrame({"model_id": ["run-e01"], "selected": [True]})
    bare = model_table(IDS, None, ck)
    assert bare["kind"].to_list() == ["off_the_shelf"] * 3
    assert bare["selected"].to_list() == [False, True, False]
    partial = model_table(IDS, CARDS.select("model_id", "epoch"), None)
    assert partial["kind"].to_list() == ["off_the_shelf", "checkpoint", "checkpoint"]


def test_pick_models_order_of_precedence():
    m = model_table(IDS, CARDS, None)
    c = pick_models(m)
    assert (c.selected, c.off_the_shelf, c.how) == ("run-e05", "ots", "selected checkpoint")
    assert pick_models(m, "run-e01").how == "config"
    none_sel = m.with_columns(pl.lit(False).alias("selected"))
    assert pick_models(none_sel).selected == "run-e05"  # the latest epoch
    only_ots = m.filter(pl.col("model_id") == "ots")
    assert pick_models(only_ots).selected == "ots" and "off-the-shelf" in pick_models(only_ots).how
    with pytest.raises(InputError, match="'nope' is not embedded"):
        pick_models(m, "nope")
    with pytest.raises(InputError, match="has no models"):
        pick_models(m.filter(pl.col("kind") == "x"))
    assert model_label(m, "run-e05") == ("epoch 5", 5)
    assert model_label(m, "ots") == ("off-the-shelf", None)


def test_best_model_is_most_variance_explained_first_on_ties():
    assert best_model({"a": 1.0, "b": 3.0, "c": 3.0}) == "b"
    with pytest.raises(ValueError):
        best_model({})


def test_fold_plan_lowers_folds_for_few_donors():
    groups = np.repeat([f"D{i}" for i in range(4)], 3)
    p = fold_plan(groups, 5, 4, 0)
    assert (p.n_splits, p.inner_splits, p.n_donors, p.lowered) == (4, 3, 4, True)
    # every donor's slides in one fold
    assert all(len(set(p.folds[groups == d])) == 1 for d in set(groups))
    many = fold_plan(np.repeat(np.arange(20), 2), 5, 4, 0)
    assert (many.n_splits, many.inner_splits, many.lowered) == (5, 4, False)
    with pytest.raises(InputError, match="3 donor"):
        fold_plan(np.array(["a", "b", "c"]), 5, 4, 0)


def test_tissues_with_fewer_than_three_donors_are_left_out():
    subjects = np.array(["a", "b", "c", "a", "b", "a"])
    tissues = np.array(["Lung"] * 3 + ["Liver"] * 2 + ["Skin"])
    keep, small = tissues_to_keep(subjects, tissues)
    assert small == ["Liver", "Skin"] and keep.tolist() == [True] * 3 + [False] * 3
