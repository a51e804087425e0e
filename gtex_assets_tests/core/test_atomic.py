import pandas as pd
import pytest

from gtex_assets.core.atomic import atomic_dir, atomic_open, params_hash, write_parquet


def test_failed_write_keeps_previous_file(tmp_path):
    dest = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"a": [1]}), dest)
    before = dest.read_bytes()
    with pytest.raises(RuntimeError), atomic_open(dest) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp left behind


def test_atomic_dir_replaces_whole(tmp_path):
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError), atomic_dir(d) as tmp:
        (tmp / "y").write_text("2")
        raise ValueError
    assert sorted(p.name for p in d.iterdir()) == ["x"]
    with atomic_dir(d) as tmp:
        (tmp / "z").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["z"]


def test_params_hash_stable_and_sensitive():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
