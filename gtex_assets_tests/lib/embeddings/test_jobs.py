"""The decisions of the embedding runs (lib/embeddings/tile_job, slide_job, embed): which
width the files share, that zero-padding changes nothing downstream, reuse vs recompute, slide
means, and timm encoders as model specs."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from gtex_assets.core.lake import Lake
from gtex_assets.lib.analysis.regression import fit_ridge
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.embeddings import slide_job as S
from gtex_assets.lib.embeddings import tile_job as T
from gtex_assets.lib.embeddings import vector_store as V


def test_fit_width_pads_and_trims_and_changes_nothing_downstream():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    P = E.fit_width(X, 6, 10)
    assert P.shape == (40, 10) and np.all(P[:, 6:] == 0) and np.array_equal(P[:, :6], X)
    assert np.array_equal(E.fit_width(P, 6, 8)[:, :6], X)  # a stored padded row, re-fitted
    with pytest.raises(ValueError, match="width 6 do not fit in 4"):
        E.fit_width(X, 6, 4)
    # ridge predictions, cosine distances and the RBF 'scale' gamma are exactly the same
    Y = X[:, :2] @ rng.standard_normal((2, 3)) + 0.1 * rng.standard_normal((40, 3))
    a = fit_ridge(X, Y, 1.0).predict(X)
    b = fit_ridge(P, Y, 1.0).predict(P)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    ka = fit_ridge(X, Y, 1.0, kernel="rbf").predict(X)
    kb = fit_ridge(P, Y, 1.0, kernel="rbf").predict(P)
    np.testing.assert_allclose(ka, kb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(E.cosine_rows(X, X[::-1]), E.cosine_rows(P, P[::-1]))


def _spec(mid: str, dim: int | None) -> E.ModelSpec:
    return E.ModelSpec(model_id=mid, kind="off_the_shelf", backbone="b", weights="none",
                       feature_dim=dim)  # fmt: skip


def test_store_width_is_the_widest_model_and_needs_every_width():
    assert T.store_width([_spec("a", 192), _spec("b", 1280)]) == 1280
    with pytest.raises(ValueError, match=r"without a known feature width: \['b'\]"):
        T.store_width([_spec("a", 192), _spec("b", None)])


class _FakeEmbedder:
    """Features = the tile's x coordinate repeated (deterministic, per-model width)."""

    def __init__(self, dim: int):
        self.dim, self.calls, self.precision = dim, 0, "fp32"
        self.report = E.EmbedReport()

    def embed_paths(self, paths, skip_errors=False):
        self.calls += 1
        ok = np.array(["bad" not in p for p in paths])
        x = np.array([float(p.rsplit("_", 1)[-1]) for p in np.asarray(paths)[ok]])
        self.report.failed += [f"{p}: cannot be decoded" for p in np.asarray(paths)[~ok]]
        return np.repeat(x[:, None], self.dim, 1).astype(np.float32), ok


def _tiles(sid: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"tissue_sample_id": sid, "subject_id": "GTEX-AAAA", "tissue": "Lung",
                         "x": np.arange(n) * 448, "y": 0, "level": 0, "tile_size": 448,
                         "split": "train", "path": [f"/t/{sid}_{i}" for i in range(n)],
                         "tile_id": [f"{sid}_{i * 448}_0" for i in range(n)],
                         "sampled": True})  # fmt: skip


def test_embed_slide_reuses_unchanged_models_and_refits_width(tmp_path):
    lk = Lake.at(tmp_path)
    sid = "GTEX-AAAA-0001"
    tiles = _tiles(sid, 3)
    embs = {"a": _FakeEmbedder(4), "b": _FakeEmbedder(6)}
    specs = [_spec("a", 4)]
    out, _s = T.embed_slide(lk, sid, tiles, specs, lambda s: embs[s.model_id], 4)
    assert out.status == "embedded" and out.tiles == 3
    again, _s = T.embed_slide(lk, sid, tiles, specs, lambda s: embs[s.model_id], 4)
    assert again.status == "unchanged" and embs["a"].calls == 1
    # a wider encoder joins: 'a' is reused but re-padded to the new width, 'b' embedded
    specs = [_spec("a", 4), _spec("b", 6)]
    both, _s = T.embed_slide(lk, sid, tiles, specs, lambda s: embs[s.model_id], 6)
    assert both.status == "embedded" and both.models_reused == ["a"] and embs["a"].calls == 1
    t = pq.read_table(lk.partition_table(T.TILE_DIR, sid))
    vec = V.arrow_to_vectors(t.column("vector"))
    a = vec[np.asarray(t.column("model_id").to_pylist()) == "a"]
    assert vec.shape == (6, 6) and np.all(a[:, 4:] == 0) and np.array_equal(a[:, 0], [0, 1, 2])
    # the encoder dropped again: 'a' trimmed back to its own width
    back, _s = T.embed_slide(lk, sid, tiles, [_spec("a", 4)], lambda s: embs[s.model_id], 4)
    assert back.status == "embedded" and embs["a"].calls == 1
    assert pq.read_schema(lk.partition_table(T.TILE_DIR, sid)).field("vector").type.list_size == 4
    # an undecodable tile is left out and named; no tiles: the file goes
    bad = tiles.assign(path=["/t/x_0", "/t/bad_1", "/t/x_2"])
    o, _s = T.embed_slide(lk, sid, bad, [_spec("a", 4)], lambda s: embs[s.model_id], 4)
    assert o.failed == 1 and "bad_1: cannot be decoded" in o.warnings[0]
    gone, _s = T.embed_slide(
        lk, sid, tiles.iloc[:0], [_spec("a", 4)], lambda s: embs[s.model_id], 4
    )
    assert gone.status == "empty" and not lk.partition_table(T.TILE_DIR, sid).exists()
    bad_id, _s = T.embed_slide(lk, "../etc", tiles, [_spec("a", 4)], lambda s: embs["a"], 4)
    assert bad_id.status == "invalid"


def test_slide_rows_means_over_sampled_tiles_and_hashes():
    tiles = pd.concat([_tiles("GTEX-AAAA-0001", 3), _tiles("GTEX-AAAA-0002", 2)])
    tiles["sampled"] = [True, True, False, False, False]  # slide 2: none sampled -> all
    tiles["model_id"], tiles["row_id"], tiles["precision"] = "m", tiles["tile_id"], "fp32"
    tiles["content_hash"] = "h"
    vec = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    tbl = V.table_from_frame(tiles, vec, V.tile_schema(3))
    meta, means = S.slide_rows(tbl, "sampled")
    assert meta["tissue_sample_id"].tolist() == ["GTEX-AAAA-0001", "GTEX-AAAA-0002"]
    np.testing.assert_allclose(means[:, 0], [0.5, 3.5])
    assert meta["n_tiles"].tolist() == [2, 2] and meta["split"].tolist() == ["train", "train"]
    _m, means_all = S.slide_rows(tbl, "all")
    np.testing.assert_allclose(means_all[:, 0], [1.0, 3.5])
    assert (
        meta["content_hash"].iloc[0] == S.mean_hash(["h"], "sampled") != S.mean_hash(["h"], "all")
    )
    with pytest.raises(ValueError, match="mean_over 'median'"):
        S.SlideParams(mean_over="median")


def test_encoder_spec_from_a_local_timm_file(tmp_path):
    import timm

    import gtex_assets.core.torchvision_compat  # noqa: F401

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    specs = E.select_models(None, which="none", off_the_shelf=False,
                            encoders=[f"vit_tiny_patch16_224?img_size=32@{tmp_path}/w.pth"])  # fmt: skip
    (s,) = specs
    assert s.kind == "off_the_shelf" and s.feature_dim == 192 and s.input_size == 32
    assert s.model_id.startswith("vit_tiny_patch16_224-file-") and s.weights == f"{tmp_path}/w.pth"
    assert s.normalization == "mean=[0.5, 0.5, 0.5] std=[0.5, 0.5, 0.5]"
    assert s.fingerprint == E.file_fingerprint(tmp_path / "w.pth")
    model = E.load_model(s)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
    torch.save({k: v + 1 for k, v in m.state_dict().items()}, tmp_path / "w.pth")
    with pytest.raises(RuntimeError, match="changed since selection"):
        E.load_model(s)
