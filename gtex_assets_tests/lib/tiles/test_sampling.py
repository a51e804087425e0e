"""SPEC §4: balanced sample counts (with the small-tissue top-up) and the donor split."""

import numpy as np
import pandas as pd
import pytest

from gtex_assets.lib.tiles.sampling import (
    assign_split,
    balanced_sample,
    donor_split,
    donors_on_both_sides,
    slide_quotas,
)


def kept_tiles(slides: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """Kept tiles: {sample id: (tissue, n tiles)} on a 30-column grid."""
    rows = []
    for sid, (tissue, n) in slides.items():
        for i in range(n):
            rows.append(
                {
                    "tissue_sample_id": sid,
                    "tissue": tissue,
                    "x": (i % 30) * 448,
                    "y": (i // 30) * 448,
                }
            )
    return pd.DataFrame(rows)


def sid(donor: int, site: int) -> str:
    return f"GTEX-{donor:05d}-{site:04d}"


def test_quotas_follow_spec():
    # 50 slides with plenty of tiles: 100 each = 5,000.
    q = slide_quotas({sid(i, 1): 500 for i in range(50)})
    assert set(q.values()) == {100} and sum(q.values()) == 5000
    # Kidney - Medulla: 4 slides -> 1,250 each.
    q = slide_quotas({sid(i, 1): 2000 for i in range(4)})
    assert set(q.values()) == {1250}
    # 3 slides: 5,000 split exactly (1,667 + 1,667 + 1,666).
    assert sum(slide_quotas({sid(i, 1): 4000 for i in range(3)}).values()) == 5000
    # More slides than target/100: 100 per slide still.
    assert sum(slide_quotas({sid(i, 1): 500 for i in range(60)}).values()) == 6000


def test_shortfall_is_redistributed_within_the_tissue():
    avail = {sid(1, 1): 300, sid(2, 1): 5000, sid(3, 1): 5000, sid(4, 1): 5000}
    q = slide_quotas(avail)
    assert q[sid(1, 1)] == 300  # all it has
    assert sum(q.values()) == 5000  # the other three make up the difference
    assert sorted(q.values())[1:] == [1566, 1567, 1567]
    # Without redistribution the capped slide's shortfall is simply missing.
    q = slide_quotas(avail, redistribute=False)
    assert q[sid(1, 1)] == 300 and sum(q.values()) == 300 + 3 * 1250
    # Not enough tiles anywhere: everything is taken.
    assert slide_quotas({sid(1, 1): 10, sid(2, 1): 20}) == {sid(1, 1): 10, sid(2, 1): 20}


def test_balanced_sample_counts_with_small_tissue_top_up():
    slides = {sid(i, 1): ("Lung", 400) for i in range(50)}
    slides |= {sid(100 + i, 2): ("Kidney - Medulla", 1500) for i in range(4)}
    slides |= {
        sid(200, 3): ("Cervix - Ectocervix", 700),
        sid(201, 3): ("Cervix - Ectocervix", 3000),
    }
    s = balanced_sample(kept_tiles(slides), tiles_per_slide=100, tissue_target=5000, seed=0)
    per_slide = s.groupby("tissue_sample_id").size()
    per_tissue = s.groupby("tissue").size()
    assert per_tissue["Lung"] == 5000 and (per_slide[[sid(i, 1) for i in range(50)]] == 100).all()
    assert per_tissue["Kidney - Medulla"] == 5000
    assert (per_slide[[sid(100 + i, 2) for i in range(4)]] == 1250).all()
    assert per_slide[sid(200, 3)] == 700 and per_slide[sid(201, 3)] == 3000  # capped: all tiles
    assert not s.duplicated(["tissue_sample_id", "x", "y"]).any()


def test_slides_without_kept_tiles_count_toward_the_tissue_target():
    slides = {sid(i, 1): ("Lung", 400) for i in range(40)}
    kept = kept_tiles(slides)
    all_slides = pd.DataFrame(
        {"tissue_sample_id": [sid(i, 1) for i in range(50)], "tissue": "Lung"}
    )  # 10 slides had no usable tile
    s = balanced_sample(kept, tiles_per_slide=100, tissue_target=5000, slides=all_slides)
    assert len(s) == 5000 and set(s.groupby("tissue_sample_id").size()) == {125}
    assert len(balanced_sample(kept, tiles_per_slide=100, tissue_target=0)) == 4000  # 40 x 100


def test_sample_is_seeded_and_per_slide_independent():
    slides = {sid(i, 1): ("Lung", 300) for i in range(6)}
    kept = kept_tiles(slides)
    a = balanced_sample(kept, tiles_per_slide=50, tissue_target=0, seed=1)
    b = balanced_sample(
        kept.sample(frac=1, random_state=3), tiles_per_slide=50, tissue_target=0, seed=1
    )
    pd.testing.assert_frame_equal(a, b)  # input order does not matter
    c = balanced_sample(kept, tiles_per_slide=50, tissue_target=0, seed=2)
    assert not a[["x", "y"]].equals(c[["x", "y"]])
    # Dropping another slide does not change this slide's draw.
    d = balanced_sample(
        kept[kept["tissue_sample_id"] != sid(5, 1)], tiles_per_slide=50, tissue_target=0, seed=1
    )
    first = sid(0, 1)
    pd.testing.assert_frame_equal(
        a[a["tissue_sample_id"] == first].reset_index(drop=True),
        d[d["tissue_sample_id"] == first].reset_index(drop=True),
    )


def gtex_like_slides(n_tissues=8, slides_per_tissue=12, n_donors=40, seed=0) -> pd.DataFrame:
    """Donors contribute slides to several tissues, at most one slide per tissue (as in GTEx)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tissues):
        donors = rng.choice(n_donors, size=slides_per_tissue, replace=False)
        for d in donors:
            rows.append(
                {
                    "tissue_sample_id": sid(d, 100 + t),
                    "subject_id": f"GTEX-{d:05d}",
                    "tissue": f"T{t}",
                }
            )
    # A rare tissue with 2 donors and one with a single donor.
    rows.append({"tissue_sample_id": sid(1, 900), "subject_id": "GTEX-00001", "tissue": "Rare"})
    rows.append({"tissue_sample_id": sid(2, 900), "subject_id": "GTEX-00002", "tissue": "Rare"})
    rows.append({"tissue_sample_id": sid(3, 901), "subject_id": "GTEX-00003", "tissue": "Single"})
    return pd.DataFrame(rows)


def test_donor_split_is_stratified_and_never_leaks():
    slides = gtex_like_slides()
    split = donor_split(slides, test_fraction=0.2, seed=0)
    assert set(split["subject_id"]) == set(slides["subject_id"])
    side = dict(zip(split["subject_id"], split["split"], strict=True))
    slides = slides.assign(split=slides["subject_id"].map(side))
    per_tissue = slides.groupby("tissue")["split"].value_counts().unstack(fill_value=0)
    for tissue, row in per_tissue.iterrows():
        if tissue == "Single":
            assert row.get("test", 0) == 0  # one donor: train only
        else:
            assert row["test"] >= 1 and row["train"] >= 1, tissue
    assert per_tissue.loc["Rare", "test"] == 1 and per_tissue.loc["Rare", "train"] == 1
    frac = (slides["split"] == "test").mean()
    assert 0.15 <= frac <= 0.35, frac
    # Tiles inherit their donor's side: no donor on both sides.
    tiles = slides.loc[slides.index.repeat(3)].drop(columns="split")
    tiles = assign_split(tiles, split)
    assert donors_on_both_sides(tiles) == []


def test_donor_split_is_deterministic_and_seeded():
    slides = gtex_like_slides()
    a = donor_split(slides, seed=0)
    pd.testing.assert_frame_equal(a, donor_split(slides.sample(frac=1, random_state=1), seed=0))
    assert not a["split"].equals(donor_split(slides, seed=5)["split"])


def test_leaks_are_detected_and_missing_donors_refused():
    tiles = pd.DataFrame({"subject_id": ["A", "A", "B"], "split": ["train", "test", "test"]})
    assert donors_on_both_sides(tiles) == ["A"]
    with pytest.raises(ValueError, match="without a train/test assignment"):
        assign_split(
            pd.DataFrame({"subject_id": ["C"]}),
            pd.DataFrame({"subject_id": ["A"], "split": ["train"]}),
        )


def _filtered(tmp_path, slides: dict[str, tuple[str, int, int]]):
    """Per-slide filtered_tiles files: {sid: (tissue, kept tiles, dropped tiles)}."""
    d = tmp_path / "filtered_tiles"
    d.mkdir()
    for s, (tissue, kept, dropped) in slides.items():
        df = kept_tiles({s: (tissue, kept + dropped)})
        df["verdict"] = ["kept"] * kept + ["dirt"] * dropped
        df["status"] = "ok"
        df["level"], df["tile_size"] = 0, 448
        df["path"] = [f"/tiles/{s}/{x}_{y}.jpg" for x, y in zip(df["x"], df["y"], strict=True)]
        df.to_parquet(d / f"{s}.parquet")
    return d


def test_read_filtered_and_build_sample(tmp_path):
    from gtex_assets.lib.tiles.sampling import SAMPLE_COLUMNS, build_sample, read_filtered

    slides = {sid(d, 126): ("Lung", 30, 5) for d in range(1, 6)}
    slides[sid(9, 126)] = ("Liver", 10, 0)
    d = _filtered(tmp_path, slides)
    chosen = sorted(slides)[:5] + [sid(9, 126)]
    filtered = read_filtered(d, selected=chosen[1:])
    assert set(filtered["tissue_sample_id"]) == set(chosen[1:])
    sel = pd.DataFrame(
        {"tissue_sample_id": chosen[1:], "subject_id": [c[:10] for c in chosen[1:]],
         "tissue": [slides[c][0] for c in chosen[1:]]}
    )  # fmt: skip
    res = build_sample(
        read_filtered(d), sel, tiles_per_slide=5, tissue_target=10, test_fraction=0.25
    )
    assert res.left_out == [chosen[0]]
    assert list(res.sample.columns) == SAMPLE_COLUMNS
    # Lung: 4 slides x 5 = 20 (above the target 10); Liver: 1 slide takes its 10 kept tiles.
    assert res.sample.groupby("tissue").size().to_dict() == {"Liver": 10, "Lung": 20}
    assert set(res.sample["tile_id"].str.count("_")) == {2}
    assert not donors_on_both_sides(res.sample)
    assert set(res.split_table["subject_id"]) == set(sel["subject_id"])
    lung = res.per_tissue.set_index("tissue").loc["Lung"]
    assert (lung["tiles"], lung["slides"], lung["target"], lung["test"] > 0) == (20, 4, 20, True)
    with pytest.raises(FileNotFoundError, match="no filtered tiles"):
        read_filtered(tmp_path / "empty")


def test_judge_slide_drops_a_slide_not_tiled_ok():
    from gtex_assets.lib.tiles.quality import STAT_COLUMNS, QualityThresholds, judge_slide

    index = kept_tiles({sid(1, 126): ("Lung", 3)})
    index["status"] = ["ok", "ok", "error"]
    index["jpeg_bytes"] = 50_000
    for c in STAT_COLUMNS:
        index[c] = 50.0
    ok = judge_slide(index, "ok", QualityThresholds())
    assert ok["verdict"].tolist() == ["kept", "kept", "error"] and ok["filter_hash"].nunique() == 1
    assert judge_slide(index, "quarantined", QualityThresholds()).empty
