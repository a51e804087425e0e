"""Spatial maps (lib/analysis/maps): the linear map model, tile predictions that average to the
slide's, and a map that follows the generator's planted per-tile pattern."""

import types

import numpy as np
import polars as pl
import pytest

from gtex_assets.lib.analysis import maps as MP
from gtex_assets.lib.analysis.regression import fit_ridge, ridge_gene_r2
from gtex_assets.lib.synth import SlideSpec, render_slide
from gtex_assets.lib.synth.expression import plant_genes, simulate_log_tpm

BREAST = "Breast - Mammary Tissue"
CROP = 224


def _genes(n: int) -> pl.DataFrame:
    return pl.DataFrame({"gene": [f"G{i}" for i in range(n)], "symbol": [f"S{i}" for i in range(n)],
                         "alpha": np.logspace(-1, 2, n), "r2": np.linspace(0.5, 0.1, n)})  # fmt: skip


def test_tile_predictions_average_to_the_slide_prediction(tmp_path):
    rng = np.random.default_rng(0)
    tissues = np.array(["Lung", "Liver"] * 15)
    X = rng.standard_normal((30, 8)) + (tissues == "Lung")[:, None] * 2.0
    Y = X[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((30, 4)) * 0.3
    genes = _genes(4)
    model = MP.fit_map_model(X, Y, tissues, genes, model_id="m")
    # the same model as regression.fit_ridge with tissue strata
    ref = fit_ridge(X, Y, genes["alpha"].to_numpy(), strata=tissues)
    np.testing.assert_allclose(model.predict(X, list(tissues)), ref.predict(X, tissues), rtol=1e-10)
    tiles = rng.standard_normal((12, 8))
    slide = tiles.mean(0, keepdims=True)
    per_tile = model.predict(tiles, "Lung")
    np.testing.assert_allclose(per_tile.mean(0), model.predict(slide, "Lung")[0], rtol=1e-10)
    # round trip through the saved files
    path = MP.save_map_model(model, MP.map_model_path(tmp_path, "m"))
    back = MP.load_map_model(path)
    np.testing.assert_array_equal(back.predict(tiles, "Lung"), per_tile)
    assert back.gene_index("S2") == back.gene_index("G2") == 2
    with pytest.raises(ValueError, match="mapped genes: S0 \\(G0\\)"):
        back.gene_index("NOPE")
    with pytest.raises(ValueError, match="expects 8 features"):
        back.predict(tiles[:, :5], "Lung")
    t = pl.DataFrame({"tissue_sample_id": "GTEX-A-0001", "x": np.arange(12) * 448,
                      "y": np.zeros(12, int), "tile_size": 448, "sampled": True})  # fmt: skip
    long = MP.tile_predictions(back, t, tiles, "Lung")
    assert long.shape[0] == 12 * 4 and set(long["gene"]) == set(back.genes)
    got = long.filter(pl.col("gene") == "G1")["predicted_log_tpm"].to_numpy()
    np.testing.assert_allclose(got, per_tile[:, 1], rtol=1e-6)


def test_choose_map_genes_prefers_within_tissue_r2_and_names_missing_genes():
    t = pl.DataFrame({"gene": ["a", "b", "c"], "symbol": ["A", "B", "C"],
                      "r2_across": [0.9, 0.1, 0.2], "r2_within": [0.1, 0.5, float("nan")],
                      "alpha_within": [1.0, 2.0, 3.0], "alpha": [9.0, 9.0, 9.0]})  # fmt: skip
    top = MP.choose_map_genes(t, MP.MapParams(top_n=2))
    assert top["gene"].to_list() == ["b", "a"] and top["alpha"].to_list() == [2.0, 1.0]
    old = t.drop("r2_within", "alpha_within").rename({"r2_across": "r2"})
    assert MP.choose_map_genes(old, MP.MapParams(top_n=1))["gene"].to_list() == ["a"]
    named = MP.choose_map_genes(t, MP.MapParams(genes=("C", "a")))
    assert sorted(named["gene"]) == ["a", "c"]
    with pytest.raises(ValueError, match=r"\['ZZZ'\] are not in gene_r2"):
        MP.choose_map_genes(t, MP.MapParams(genes=("ZZZ",)))


def test_coverage_note_and_example_slides():
    assert MP.Coverage(100, 100).note() == "100 tiles"
    assert "100 of 400 kept tiles (the balanced sample" in MP.Coverage(100, 400).note()
    s = pl.DataFrame({"tissue_sample_id": ["c", "a", "b", "d"], "tissue": ["X", "X", "X", "Y"]})
    assert MP.example_slides(s, 2) == ["a", "b", "d"]


# ------------------------------------------------------------------ the generator's truth


def _od_features(crop: np.ndarray) -> np.ndarray:
    """A fixed, linear-averaged tile featuriser: mean optical density per channel and the
    background (fat vacuole) fraction. The map machinery does not depend on the encoder."""
    od = -np.log((crop.astype(np.float64) + 1.0) / 256.0)
    return np.concatenate([od.mean((0, 1)), [(od.sum(-1) < 0.3).mean()]])


def _crops(sid: str, z_fat: float, seed: int) -> list[np.ndarray]:
    """The 4 most tissue-covered 224-px crops of a generated breast slide with fat factor z."""
    spec = SlideSpec(sid, BREAST, 448, 448, 0.5, 20,
                     (("nuclear_density", 0.0), ("fat_fraction", z_fat), ("fibrosis", 0.0)), seed)  # fmt: skip
    rgb, info = render_slide(spec)
    a = info["tissue_alpha"]
    pos = [(a[y : y + CROP, x : x + CROP].mean(), x, y)
           for y in range(0, 448 - CROP + 1, CROP // 2) for x in range(0, 448 - CROP + 1, CROP // 2)]  # fmt: skip
    return [rgb[y : y + CROP, x : x + CROP] for _a, x, y in sorted(pos, reverse=True)[:4]]


def test_map_of_the_planted_fat_gene_follows_the_planted_pattern(tmp_path):
    """Train the map on generated slides whose fat fraction is driven by a planted factor z and
    whose image-linked genes follow z (the generator's own expression model); a held-out
    'slide' assembled from regions of four different z (the per-tile truth) gets tile
    predictions that follow z across it."""
    n = 14
    z = np.random.default_rng(0).permutation(np.linspace(-2, 2, n))
    feats = [np.stack([_od_features(c) for c in _crops(f"GTEX-T{i:03d}-0001", z[i], 0)])
             for i in range(n)]  # fmt: skip
    X = np.stack([f.mean(0) for f in feats])  # slide embedding = mean of its tiles
    genes = plant_genes(60, [BREAST], 0)
    samples = [types.SimpleNamespace(tissue=BREAST, factors={"nuclear_density": 0.0,
               "fat_fraction": float(v), "fibrosis": 0.0}) for v in z]  # fmt: skip
    Y_all = simulate_log_tpm(genes, samples, 0).T
    linked = [i for i, (c, f) in enumerate(zip(genes.category, genes.factor, strict=True))
              if c == "image_linked" and f == "fat_fraction"]  # fmt: skip
    Y = Y_all[:, linked]
    cv = ridge_gene_r2(X, Y, np.arange(n).astype(str), n_splits=4, inner_splits=3)
    assert (cv.r2 > 0.3).all()  # the planted genes are recoverable from these slides
    table = pl.DataFrame({"gene": [genes.ids[i] for i in linked],
                          "symbol": [genes.symbols[i] for i in linked],
                          "alpha": cv.alpha, "r2": cv.r2})  # fmt: skip
    model = MP.fit_map_model(X, Y, [BREAST] * n, table, model_id="od")

    # a new slide: 2 x 2 regions of 2 x 2 tiles, each region from a slide of another z
    region_z = [-2.0, -0.7, 0.7, 2.0]
    tiles, truth, rows = [], [], []
    for r, zr in enumerate(region_z):
        for k, crop in enumerate(_crops(f"GTEX-H{r:03d}-0001", zr, 1)):
            x = (r % 2) * 2 * CROP + (k % 2) * CROP
            y = (r // 2) * 2 * CROP + (k // 2) * CROP
            tiles.append(_od_features(crop))
            truth.append(zr)
            rows.append({"tissue_sample_id": "GTEX-NEW-0001", "x": x, "y": y, "tile_size": CROP,
                         "sampled": True, "crop": crop})  # fmt: skip
    pred = MP.tile_predictions(
        model, pl.DataFrame([{k: v for k, v in r.items() if k != "crop"} for r in rows]),
        np.stack(tiles), BREAST,
    )  # fmt: skip
    for gi in linked:
        p = pred.filter(pl.col("gene") == genes.ids[gi])["predicted_log_tpm"].to_numpy()
        r = np.corrcoef(p, truth)[0, 1] * np.sign(genes.effect[gi])
        assert r > 0.75, f"{genes.symbols[gi]}: per-tile prediction vs planted z, r = {r:.2f}"
    # the map PNG: the predicted values coloured over a mosaic of the tiles
    from PIL import Image

    paths = []
    for i, r in enumerate(rows):
        p = tmp_path / f"t{i}.jpg"
        Image.fromarray(r["crop"]).save(p)
        paths.append(str(p))
    t = pl.DataFrame([{k: v for k, v in r.items() if k != "crop"} for r in rows]).with_columns(
        path=pl.Series(paths)
    )
    g0 = genes.ids[linked[0]]
    vals = pred.filter(pl.col("gene") == g0)["predicted_log_tpm"].to_numpy()
    png = MP.heatmap_png(t, vals, tmp_path / "map.png", title="fat gene", note="16 tiles", scale=4)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 10  # drawn, not blank
