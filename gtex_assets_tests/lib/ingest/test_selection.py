import polars as pl
import pytest

from gtex_assets.lib.ingest.selection import select_slides


def _ann(counts: dict[str, int]) -> pl.DataFrame:
    rows = []
    d = 0
    for tissue, n in counts.items():
        for i in range(n):
            d += 1
            rows.append({"tissue_sample_id": f"GTEX-D{d:04d}-{i:02d}26", "tissue": tissue})
    return pl.DataFrame(rows)


def _counts(sel: pl.DataFrame) -> dict[str, int]:
    return dict(sel.group_by("tissue").len().iter_rows())


def test_counts_and_small_tissues_take_all():
    ann = _ann({"Lung": 80, "Kidney - Medulla": 4, "Cervix - Ectocervix": 9})
    sel = select_slides(ann, set(), slides_per_tissue=50)
    assert _counts(sel) == {"Lung": 50, "Kidney - Medulla": 4, "Cervix - Ectocervix": 9}
    assert sel["tissue_sample_id"].is_unique().all()
    assert sel.filter(pl.col("tissue") == "Lung")["rank_in_tissue"].to_list() == list(range(50))


def test_prefers_rna_samples_then_fills():
    ann = _ann({"Lung": 20})
    rna = set(ann["tissue_sample_id"].gather([1, 3, 5]).to_list())
    sel = select_slides(ann, rna, slides_per_tissue=5)
    assert rna <= set(sel["tissue_sample_id"].to_list())
    assert sel["has_rna"].sum() == 3 and sel.height == 5
    assert sel["has_rna"].head(3).to_list() == [True, True, True]
    no_pref = select_slides(ann, rna, slides_per_tissue=5, prefer_rna=False)
    assert no_pref.height == 5


def test_deterministic_and_seeded():
    ann = _ann({"Lung": 30, "Liver": 30})
    a = select_slides(ann, set(), slides_per_tissue=10, seed=1)
    b = select_slides(
        ann.sample(fraction=1.0, shuffle=True, seed=3), set(), slides_per_tissue=10, seed=1
    )
    c = select_slides(ann, set(), slides_per_tissue=10, seed=2)
    assert a["tissue_sample_id"].to_list() == b["tissue_sample_id"].to_list()
    assert a["tissue_sample_id"].to_list() != c["tissue_sample_id"].to_list()


def test_tissue_filter_and_unknown_tissue():
    ann = _ann({"Lung": 5, "Liver": 5})
    assert set(select_slides(ann, set(), tissues=["Liver"])["tissue"].to_list()) == {"Liver"}
    with pytest.raises(ValueError, match=r"\['Brain'\] not in the histology annotations"):
        select_slides(ann, set(), tissues=["Brain"])
