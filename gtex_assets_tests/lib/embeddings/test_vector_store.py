"""lib.vector_store: idempotent per-slide writes, the writer lock, index policy, search, export."""

from __future__ import annotations

import threading

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from gtex_assets.lib.embeddings import vector_store as V

DIM = 16


def _tiles(slides: dict[str, int], model: str = "m1", seed: int = 0, dim: int = DIM) -> pa.Table:
    """``slides``: sample id -> number of tiles; tissues by sample-id prefix."""
    rng = np.random.default_rng(seed)
    rows, vecs = [], []
    for sid, n in slides.items():
        centre = rng.normal(size=dim)
        for i in range(n):
            tid = f"{sid}_{i * 448}_0"
            rows.append({"row_id": f"{model}|{tid}", "model_id": model, "tile_id": tid,
                         "tissue_sample_id": sid, "tissue": sid.split("-")[1], "x": i * 448,
                         "y": 0, "sampled": True, "content_hash": f"h{seed}"})  # fmt: skip
            vecs.append(centre + 0.1 * rng.normal(size=dim))
    return V.table_from_frame(pd.DataFrame(rows), np.array(vecs), V.tile_schema(dim))


def test_schema_roundtrip_and_vector_helpers():
    t = _tiles({"GTEX-A-0001": 3})
    assert t.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    v = V.arrow_to_vectors(t.column("vector"))
    assert v.shape == (3, DIM) and v.dtype == np.float32
    np.testing.assert_array_equal(V.arrow_to_vectors(t.column("vector").slice(1, 2)), v[1:])
    with pytest.raises(ValueError, match="2-D"):
        V.vectors_to_arrow(np.zeros(3))
    assert V.in_filter("tissue", ["O'Brien", "x"]) == "tissue IN ('O''Brien', 'x')"


def test_replace_partitions_is_idempotent_and_per_slide(tmp_path):
    store = V.VectorStore(tmp_path / "db")
    data = _tiles({"GTEX-A-0001": 3, "GTEX-B-0001": 2})
    st = store.replace_partitions(V.TILE_TABLE, data)
    assert (st.inserted, st.rows) == (5, 5)
    st = store.replace_partitions(V.TILE_TABLE, data)  # re-run: same rows, no duplicates
    assert (st.inserted, st.deleted, st.rows) == (0, 0, 5)
    # Slide A now has 1 tile: its 2 others go, slide B is untouched.
    st = store.replace_partitions(V.TILE_TABLE, _tiles({"GTEX-A-0001": 1}, seed=5))
    assert (st.inserted, st.updated, st.deleted, st.rows) == (0, 1, 2, 3)
    assert store.count(V.TILE_TABLE, "tissue_sample_id = 'GTEX-B-0001'") == 2
    assert store.partition_hashes(V.TILE_TABLE) == {"GTEX-A-0001": {"h5"}, "GTEX-B-0001": {"h0"}}
    # A slide listed without rows is emptied.
    st = store.replace_partitions(
        V.TILE_TABLE, _tiles({"GTEX-B-0001": 2}), partitions=["GTEX-A-0001", "GTEX-B-0001"]
    )
    assert st.rows == 2 and store.count(V.TILE_TABLE, "tissue_sample_id = 'GTEX-A-0001'") == 0
    assert store.delete_partitions(V.TILE_TABLE, ["GTEX-B-0001"]) == 2
    assert store.count(V.TILE_TABLE) == 0


def test_concurrent_writers_are_serialised(tmp_path):
    errors = []

    def writer(k: int):
        store = V.VectorStore(tmp_path / "db")  # its own connection, like another process
        try:
            for rep in range(3):
                store.replace_partitions(
                    V.TILE_TABLE, _tiles({f"GTEX-W{k}-000{j}": 4 for j in range(2)}, seed=rep)
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert V.VectorStore(tmp_path / "db").count(V.TILE_TABLE) == 3 * 2 * 4


def test_search_exact_self_first_and_model_filter(tmp_path):
    store = V.VectorStore(tmp_path / "db")
    a = _tiles({"GTEX-A-0001": 4, "GTEX-B-0001": 4}, model="m1", seed=1)
    b = _tiles({"GTEX-A-0001": 4, "GTEX-B-0001": 4}, model="m2", seed=2)
    store.replace_partitions(V.TILE_TABLE, pa.concat_tables([a, b]))
    vecs = V.arrow_to_vectors(a.column("vector"))
    hits = store.search(V.TILE_TABLE, vecs[5], k=4, where="model_id = 'm1'", columns=["tile_id"])
    assert hits["tile_id"].iloc[0] == a.column("tile_id")[5].as_py()
    assert hits["distance"].iloc[0] < 1e-5
    assert hits["distance"].is_monotonic_increasing
    # Same slide's tiles are closest (they share a centre).
    assert set(hits["tile_id"].str.startswith("GTEX-B-0001")) == {True}
    full = store.search(V.TILE_TABLE, vecs[5], k=100, where="model_id = 'm2'", columns=["model_id"])
    assert len(full) == 8 and set(full["model_id"]) == {"m2"}


def test_index_policy_threshold_then_ann_search(tmp_path):
    store = V.VectorStore(tmp_path / "db")
    slides = {f"GTEX-T{i % 4}-{i:04d}": 20 for i in range(40)}  # 800 rows
    data = _tiles(slides, dim=32)
    store.replace_partitions(V.TILE_TABLE, data)
    assert store.ensure_index(V.TILE_TABLE, min_rows=10_000) == "none"
    assert store.ensure_index(V.TILE_TABLE, min_rows=500) == "created"
    names = {tuple(ix.columns) for ix in store.open(V.TILE_TABLE).list_indices()}
    assert ("vector",) in names and ("model_id",) in names
    vecs = V.arrow_to_vectors(data.column("vector"))
    ids = data.column("tile_id").to_pylist()
    recall = []
    for i in range(0, 800, 40):
        ann = store.search(V.TILE_TABLE, vecs[i], k=10, columns=["tile_id"])
        exact = store.search(V.TILE_TABLE, vecs[i], k=10, exact=True, columns=["tile_id"])
        assert ann["tile_id"].iloc[0] == ids[i]
        recall.append(len(set(ann["tile_id"]) & set(exact["tile_id"])) / 10)
    assert np.mean(recall) >= 0.9
    # New rows after indexing: still found, then folded into the index.
    store.replace_partitions(V.TILE_TABLE, _tiles({"GTEX-NEW-0001": 5}, seed=9, dim=32))
    new = store.read(
        V.TILE_TABLE, ["tile_id", "vector"], where="tissue_sample_id = 'GTEX-NEW-0001'"
    )
    v0 = V.arrow_to_vectors(new.column("vector"))[0]
    assert store.search(V.TILE_TABLE, v0, k=1, columns=["tile_id"])["tile_id"].iloc[0] == (
        new.column("tile_id")[0].as_py()
    )
    assert store.ensure_index(V.TILE_TABLE, min_rows=500) == "updated"
    assert store.count(V.TILE_TABLE) == 805


def test_export_parquet_for_duckdb(tmp_path):
    store = V.VectorStore(tmp_path / "db")
    store.overwrite(V.SLIDE_TABLE, _tiles({"GTEX-A-0001": 2, "GTEX-B-0001": 3}))
    out = store.export_parquet(V.SLIDE_TABLE, tmp_path / "tables" / "export.parquet")
    rows = duckdb.sql(
        f"SELECT tissue, count(*) AS n FROM read_parquet('{out}') GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("A", 2), ("B", 3)]
    assert duckdb.sql(f"SELECT len(vector) FROM read_parquet('{out}') LIMIT 1").fetchone() == (DIM,)


def test_missing_table_is_a_clear_error(tmp_path):
    store = V.VectorStore(tmp_path / "db")
    assert store.count(V.TILE_TABLE) == 0 and store.partition_hashes(V.TILE_TABLE) == {}
    with pytest.raises(KeyError, match="slide_embeddings"):
        store.open(V.SLIDE_TABLE)


def test_writer_lock_nests_within_a_store(tmp_path):
    store = V.VectorStore(tmp_path / "db", lock_timeout_s=2.0)
    with store.writer(), store.writer():  # a nested writer must not wait for itself
        pass
    other = V.VectorStore(tmp_path / "db", lock_timeout_s=0.2)
    # but another store (another writer) waits for the lock
    with store.writer(), pytest.raises(TimeoutError), other.writer():
        pass
