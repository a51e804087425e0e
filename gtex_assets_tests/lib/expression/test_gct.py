"""The streaming GCT parser: values, block boundaries, and every kind of bad input."""

import gzip
import re

import numpy as np
import pytest

from gtex_assets.lib.expression.gct import GCTError, GCTReader, read_gct, read_gct_header

SAMPLES = ["GTEX-1117F-0226-SM-5GZZ7", "GTEX-1117F-0426-SM-5EGHI", "GTEX-111CU-0126-SM-5GZWZ"]


def gct_text(rows: list[str], samples=SAMPLES, n_genes: int | None = None, dims: str | None = None):
    n = len(rows) if n_genes is None else n_genes
    dims = dims or f"{n}\t{len(samples)}"
    head = f"#1.2\n{dims}\nName\tDescription\t" + "\t".join(samples)
    return head + "\n" + "".join(r + "\n" for r in rows)


def write(tmp_path, text: str, gz: bool = False, name: str = "x.gct"):
    p = tmp_path / (name + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return p


ROWS = [
    "ENSG00000223972.5\tDDX11L1\t0\t0.02865\t1",
    "ENSG00000227232.5\tWASH7P\t10.41\t12.32\t1.5e3",
    "ENSG00000243485.5\tRP11-34P13.3\t.5\t5.\t+2",
    "ENSG00000237613.2\tFAM138A\t1E-2\t0.0001\t123456789012345678901234.5",
]
EXPECTED = np.array(
    [
        [0, 0.02865, 1],
        [10.41, 12.32, 1500],
        [0.5, 5, 2],
        [0.01, 0.0001, 1.234567890123456789e23],
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize("gz", [False, True])
def test_parses_values_ids_symbols_plain_and_gzip(tmp_path, gz):
    p = write(tmp_path, gct_text(ROWS), gz=gz)
    header, ids, syms, values = read_gct(p)
    assert header.sample_ids == SAMPLES and header.n_genes == 4 and header.n_samples == 3
    assert ids == [r.split("\t")[0] for r in ROWS]
    assert syms == ["DDX11L1", "WASH7P", "RP11-34P13.3", "FAM138A"]
    assert values.dtype == np.float32 and values.shape == (4, 3)
    np.testing.assert_array_equal(values, EXPECTED)  # correctly rounded to float32
    assert read_gct_header(p).sample_ids == SAMPLES


def _many_rows(n: int, ns: int = 3) -> list[str]:
    rng = np.random.default_rng(1)
    vals = np.where(rng.random((n, ns)) < 0.5, 0, np.round(rng.exponential(50, (n, ns)), 3))
    return [
        f"ENSG{i:011d}.1\tG{i}\t" + "\t".join(f"{v:g}" for v in row) for i, row in enumerate(vals)
    ]


@pytest.mark.parametrize("block_bytes,workers", [(7, 1), (300, 3), (1 << 20, 2)])
def test_block_boundaries_and_workers_do_not_change_the_result(tmp_path, block_bytes, workers):
    rows = _many_rows(500)
    p = write(tmp_path, gct_text(rows), gz=True)
    _, ids, _, values = read_gct(p, block_bytes=block_bytes, workers=workers)
    expect = np.array([[float(x) for x in r.split("\t")[2:]] for r in rows], dtype=np.float32)
    assert ids == [r.split("\t")[0] for r in rows]
    np.testing.assert_array_equal(values, expect)


def test_blocks_stream_in_file_order_with_line_numbers(tmp_path):
    p = write(tmp_path, gct_text(_many_rows(50)))
    with GCTReader(p, block_bytes=200, workers=3) as r:
        firsts = [(b.first_line, len(b)) for b in r.blocks()]
    assert firsts[0][0] == 4 and sum(n for _, n in firsts) == 50
    assert all(a + n == b for (a, n), (b, _) in zip(firsts, firsts[1:], strict=False))


def test_crlf_line_endings_no_final_newline_and_concatenated_gzip(tmp_path):
    text = gct_text(ROWS)
    p = write(tmp_path, text.replace("\n", "\r\n").rstrip())
    _, ids, _, values = read_gct(p)
    assert len(ids) == 4
    np.testing.assert_array_equal(values, EXPECTED)
    half = text.index("ENSG00000243485.5")
    multi = tmp_path / "multi.gct.gz"
    multi.write_bytes(gzip.compress(text[:half].encode()) + gzip.compress(text[half:].encode()))
    np.testing.assert_array_equal(read_gct(multi, block_bytes=16)[3], EXPECTED)


# ----------------------------------------------------------------------------- bad input


def _error(tmp_path, text, gz=False, **kw) -> GCTError:
    p = write(tmp_path, text, gz=gz)
    with pytest.raises(GCTError) as ei:
        read_gct(p, **kw)
    assert str(p) in str(ei.value)
    return ei.value


@pytest.mark.parametrize(
    "row,line_col,what",
    [
        ("G\tX\t1\t2", None, r"line 5: 4 fields, expected 5"),
        ("G\tX\t1\t2\t3\t4", None, r"line 5: 6 fields, expected 5"),
        ("G\tX", None, r"line 5: 2 fields, expected 5"),
        (
            "G\tX\t1\tabc\t3",
            (5, 4),
            r"column 4 \(sample GTEX-1117F-0426-SM-5EGHI\): non-numeric value 'abc'",
        ),
        (
            "G\tX\t1\t2\t1.5x",
            (5, 5),
            r"column 5 \(sample GTEX-111CU-0126-SM-5GZWZ\): non-numeric value '1.5x'",
        ),
        ("G\tX\tNA\t2\t3", (5, 3), r"non-numeric value 'NA'"),
        ("G\tX\tnan\t2\t3", (5, 3), r"non-numeric value 'nan'"),
        ("G\tX\tinf\t2\t3", (5, 3), r"non-numeric value 'inf'"),
        ("G\tX\t1\t\t3", (5, 4), r"column 4 .*: empty value"),
        ("G\tX\t1\t-0.5\t3", (5, 4), r"negative value '-0.5'"),
        ("G\tX\t1\t2\t1e40", (5, 5), r"value '1e40' is out of float32 range"),
        ("\tX\t1\t2\t3", (5, 1), r"column 1: empty gene id"),
        ("", None, r"line 5: empty line"),
    ],
)
def test_bad_rows_name_line_and_column(tmp_path, row, line_col, what):
    rows = [ROWS[0], row, ROWS[1]]
    e = _error(tmp_path, gct_text(rows, n_genes=3), gz=True, workers=2, block_bytes=30)
    assert re.search(what, str(e)), str(e)
    assert e.line == 5
    if line_col:
        assert f"line {line_col[0]}, column {line_col[1]}" in str(e)
        assert e.column == line_col[1]


def test_error_in_a_late_block_names_the_right_line(tmp_path):
    rows = _many_rows(400)
    rows[357] = rows[357].rsplit("\t", 1)[0] + "\tfoo"
    e = _error(tmp_path, gct_text(rows), gz=True, workers=3, block_bytes=1000)
    assert f"line {357 + 4}, column 5" in str(e) and "'foo'" in str(e)


def test_negative_zero_is_zero(tmp_path):
    p = write(tmp_path, gct_text(["G\tX\t-0\t0.0\t0e5"]))
    np.testing.assert_array_equal(read_gct(p)[3], [[0, 0, 0]])


def test_dimension_line_disagrees_with_header(tmp_path):
    e = _error(tmp_path, gct_text(ROWS, dims="4\t5"))
    assert "line 2: declares 5 samples but the header on line 3 has 3 sample columns" in str(e)
    assert e.line == 2


def test_dimension_line_disagrees_with_body(tmp_path):
    e = _error(tmp_path, gct_text(ROWS, n_genes=6))
    assert "line 2: declares 6 genes but the body has 4 gene rows (lines 4-7)" in str(e)
    e = _error(tmp_path, gct_text(ROWS, n_genes=2), block_bytes=10)
    assert "line 2: declares 2 genes but the body has more (line 6 is gene 3)" in str(e)


@pytest.mark.parametrize(
    "text,what",
    [
        ("", "empty file"),
        ("#1.3\n1\t3\n", "line 1: expected '#1.2'"),
        ("#1.2\n1 3\nName\tDescription\tA\n", "line 2: expected '<n_genes>\\t<n_samples>'"),
        ("#1.2\n1\t1\nId\tDescription\tA\n", "line 3: header must start with 'Name\\tDescription'"),
        ("#1.2\n0\t0\nName\tDescription\n", "line 3: the header has no sample columns"),
    ],
)
def test_bad_header_lines(tmp_path, text, what):
    assert what in str(_error(tmp_path, text))


def test_duplicate_sample_ids_name_the_id_and_both_columns(tmp_path):
    samples = [SAMPLES[0], SAMPLES[1], SAMPLES[0]]
    e = _error(tmp_path, gct_text(["G\tX\t1\t2\t3"], samples=samples))
    assert f"line 3: duplicate sample id '{SAMPLES[0]}' in columns 3 and 5" in str(e)
    assert e.line == 3 and e.column == 5


def test_duplicate_gene_id(tmp_path):
    rows = _many_rows(30)
    rows[20] = rows[3].split("\t", 1)[0] + "\t" + rows[20].split("\t", 1)[1]
    e = _error(tmp_path, gct_text(rows), block_bytes=100, workers=2)
    assert "line 24: gene id 'ENSG00000000003.1' repeats line 7" in str(e)


def test_truncated_gzip_names_file_and_last_complete_line(tmp_path):
    rows = _many_rows(3000)
    raw = gzip.compress(gct_text(rows).encode())
    p = tmp_path / "cut.gct.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GCTError) as ei:
        read_gct(p, block_bytes=4096, workers=2)
    msg = str(ei.value)
    m = re.search(
        r"truncated gzip stream .*the last complete line is (\d+) \(gene (\S+)\); line (\d+) is cut off",
        msg,
    )
    assert m and str(p) in msg, msg
    last = int(m.group(1))
    assert m.group(2) == rows[last - 4].split("\t")[0] and int(m.group(3)) == last + 1
    # Everything up to that line is really in the truncated part.
    with gzip.open(p, "rt") as f, pytest.raises(EOFError):
        f.read()
    # Cut exactly after the data (only the gzip trailer missing): all lines complete.
    p.write_bytes(raw[:-4])
    done = r"truncated gzip stream .*last complete line is 3003 \(gene ENSG00000002999.1\)\. Re"
    with pytest.raises(GCTError, match=done):
        read_gct(p)


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path):
    raw = bytearray(gzip.compress(gct_text(_many_rows(3000)).encode()))
    raw[len(raw) // 2] ^= 0xFF
    p = tmp_path / "bad.gct.gz"
    p.write_bytes(bytes(raw))
    with pytest.raises(GCTError) as ei:
        read_gct(p, block_bytes=4096)
    assert str(p) in str(ei.value) and "line" in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(GCTError, match="no such file"):
        read_gct(tmp_path / "nope.gct.gz")


def test_non_utf8_gene_id(tmp_path):
    p = tmp_path / "x.gct"
    p.write_bytes(gct_text(["G\tX\t1\t2\t3"]).encode().replace(b"G\tX", b"G\xff\tX"))
    with pytest.raises(GCTError, match=r"line 4: the gene id is not valid UTF-8"):
        read_gct(p)


def test_plain_zlib_path_when_isal_is_absent(tmp_path, monkeypatch):
    import zlib

    from gtex_assets.lib.expression import gct

    monkeypatch.setattr(gct, "_zlib_impl", zlib)
    rows = _many_rows(3000)
    raw = gzip.compress(gct_text(rows).encode())
    p = write(tmp_path, gct_text(rows), gz=True)
    _, ids, _, values = read_gct(p, block_bytes=4096, workers=2)
    assert len(ids) == 3000 and values.shape == (3000, 3)
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GCTError, match=r"truncated gzip stream .*last complete line is \d+"):
        read_gct(p)


def test_header_only_gct_has_no_genes(tmp_path):
    header, ids, _, values = read_gct(write(tmp_path, gct_text([]), gz=True))
    assert header.n_genes == 0 and ids == [] and values.shape == (0, 3)
