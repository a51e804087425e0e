"""Tiles: tissue tiling, the three quality filters and the balanced donor-split sample
(group ``tiles``; SPEC §2-§4). Science in ``lib/tiling``, ``lib/tile_quality``, ``lib/sampling``."""

import os
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from gtex_assets.core.atomic import params_hash, write_parquet
from gtex_assets.core.ids import InvalidSampleIdError, subject_of
from gtex_assets.defs.ingest.assets import raw_slides, selected_slides
from gtex_assets.defs.metadata import counts_md, plot_metadata, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.lib.tiles.plots import filter_montage, pick_examples
from gtex_assets.lib.tiles.quality import (
    DEFAULT_DIRT_RULE,
    DEFAULT_MIN_CHANNEL_STD,
    DEFAULT_MIN_JPEG_BYTES,
    DEFAULT_MIN_PIECE_STD,
    QualityThresholds,
    apply_filters,
    verdict_counts,
    verdict_sql,
)
from gtex_assets.lib.tiles.sampling import (
    SAMPLE_COLUMNS,
    assign_split,
    balanced_sample,
    donor_split,
    donor_split_table,
    donors_on_both_sides,
)
from gtex_assets.lib.tiles.tiling import (
    TILER_VERSION,
    SlideJob,
    TilingParams,
    record_outcome,
    tile_slides,
)
from gtex_assets.resources import DataLakeResource

GROUP = "tiles"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _md(df: pd.DataFrame, empty: str = "none") -> dg.MetadataValue:
    return dg.MetadataValue.md(df.to_markdown(index=False) if len(df) else empty)


# ----------------------------------------------------------------------------------------------
# slide_tiles
# ----------------------------------------------------------------------------------------------


class SlideTilesConfig(dg.Config):
    """SPEC §2 tiling parameters (a change re-tiles the slides it touches)."""

    tile_size: int = Field(default=448, description="Tile side in level-0 pixels")
    jpeg_quality: int = Field(default=90, description="JPEG quality of the written tiles")
    min_tissue_fraction: float = Field(
        default=0.25, description="Keep a grid tile when this fraction of it is tissue (mask)"
    )
    piece_grid: int = Field(
        default=4, description="Pieces per side measured for the half-empty filter (4 = 4x4)"
    )
    mask_downsample: float = Field(default=16.0, description="Level-0 pixels per tissue-mask pixel")
    workers: int = Field(
        default=0, description="Worker processes within the run; 0 = all available cores"
    )
    force: bool = Field(
        default=False, description="Re-tile slides already done with the same parameters"
    )

    def params(self) -> TilingParams:
        return TilingParams(
            tile_size=self.tile_size,
            jpeg_quality=self.jpeg_quality,
            min_tissue_fraction=self.min_tissue_fraction,
            piece_grid=self.piece_grid,
            mask_downsample=self.mask_downsample,
        )


def _raw_row(lk, sample_id: str) -> dict | None:
    path = lk.partition_table("raw_slides", sample_id)
    if not path.is_file():
        return None
    return pd.read_parquet(path).iloc[0].to_dict()


def _tissue_lookup(lk) -> dict[str, str]:
    path = lk.table("histology_annotations")
    if not path.is_file():
        return {}
    ann = pd.read_parquet(path, columns=["tissue_sample_id", "tissue"])
    return dict(zip(ann["tissue_sample_id"], ann["tissue"], strict=True))


@dg.asset(
    group_name=GROUP,
    kinds={"python", "jpeg", "parquet"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    deps=[raw_slides],
    code_version=TILER_VERSION,
)
def slide_tiles(
    context: dg.AssetExecutionContext, config: SlideTilesConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §2: each `ok` raw slide cut at level 0 into non-overlapping 448 x 448 JPEG tiles over
    tissue only (mask from a low-resolution level, so background is never read at full
    resolution), written under `tiles/<sample id>/<x>_<y>.jpg`. Per slide: a tile index
    `tables/slide_tiles/<id>.parquet` (coordinates, path, JPEG bytes and the quality statistics
    measured in memory) and an outcome row `tables/tiling_status/<id>.parquet` (ok / no_tissue /
    too_small / unreadable / quarantined, with the reason). Resumable after a kill; a slide done
    with the same parameters is skipped."""
    lk = lake.lake()
    params = config.params()
    tissue_of = _tissue_lookup(lk)
    jobs: list[SlideJob] = []
    outcomes: list[dict] = []
    for sid in context.partition_keys:
        try:
            tiles_dir = lk.slide_tiles(sid)
        except InvalidSampleIdError as e:
            outcomes.append({"tissue_sample_id": sid, "status": "invalid_id", "reason": str(e)})
            continue
        raw = _raw_row(lk, sid)
        tissue = (raw or {}).get("tissue") or tissue_of.get(sid) or ""
        job = SlideJob(
            sample_id=sid,
            tissue=tissue,
            slide_path=str((raw or {}).get("path") or ""),
            tiles_dir=tiles_dir,
            index_path=lk.partition_table("slide_tiles", sid),
            status_path=lk.partition_table("tiling_status", sid),
            slide_version=str((raw or {}).get("source_version") or ""),
        )
        if raw is None:
            out = record_outcome(job, "missing", "no raw_slides row: materialise raw_slides first")
            outcomes.append(out.status)
        elif raw.get("status") != "ok":
            reason = f"raw slide quarantined: {raw.get('reason')}"
            outcomes.append(record_outcome(job, "quarantined", reason).status)
        else:
            jobs.append(job)
    workers = config.workers or _cores()
    started = time.perf_counter()
    new_tiles = 0
    skipped = 0
    per_tissue: list[pd.DataFrame] = []
    for job, out in tile_slides(jobs, params, workers=workers, force=config.force):
        st = out.status
        outcomes.append(st)
        per_tissue.append(out.index[["tissue", "status"]])
        if out.skipped:
            skipped += 1
        else:
            new_tiles += int(st.get("n_tiles") or 0)
            context.log.info(
                f"{job.sample_id}: {st['status']} {st.get('n_tiles', 0)} tiles"
                + (f" ({st['reason']})" if st.get("reason") else "")
                + f" in {st.get('seconds', 0):.1f}s"
            )
        if st["status"] not in ("ok",):
            context.log.warning(f"slide {job.sample_id}: {st['status']}: {st.get('reason')}")
    elapsed = time.perf_counter() - started
    table = pd.DataFrame(outcomes)
    tiles = (
        pd.concat(per_tissue, ignore_index=True)
        if per_tissue
        else pd.DataFrame(columns=["tissue", "status"])
    )
    ok_tiles = tiles[tiles["status"] == "ok"]
    not_ok = table[table["status"] != "ok"] if len(table) else table
    return dg.MaterializeResult(
        metadata={
            "slides": dg.MetadataValue.int(len(table)),
            "skipped_already_done": dg.MetadataValue.int(skipped),
            "outcomes": counts_md(table["status"], "slides") if len(table) else _md(table),
            "not_tiled": _md(not_ok[["tissue_sample_id", "status", "reason"]])
            if len(not_ok)
            else _md(not_ok),
            "tiles": dg.MetadataValue.int(len(ok_tiles)),
            "error_tiles": dg.MetadataValue.int(int((tiles["status"] == "error").sum())),
            "tiles_per_tissue": counts_md(ok_tiles["tissue"], "tiles")
            if len(ok_tiles)
            else _md(ok_tiles),
            "new_tiles_per_s": dg.MetadataValue.float(
                round(new_tiles / elapsed, 1) if elapsed > 0 else 0.0
            ),
            "workers": dg.MetadataValue.int(workers),
            "params_hash": dg.MetadataValue.text(params.hash()),
            "index": dg.MetadataValue.path(str(lk.partition_dir("slide_tiles"))),
            "status_table": dg.MetadataValue.path(str(lk.partition_dir("tiling_status"))),
        }
    )


# ----------------------------------------------------------------------------------------------
# filtered_tiles
# ----------------------------------------------------------------------------------------------


class TileFilterConfig(dg.Config):
    """SPEC §3 thresholds. Re-running with new values re-judges stored measurements only."""

    min_jpeg_bytes: int = Field(
        default=DEFAULT_MIN_JPEG_BYTES,
        description="Filter 1: JPEG bytes below which a tile is mostly blank (default for tissues "
        "not in min_jpeg_bytes_by_tissue)",
    )
    min_jpeg_bytes_by_tissue: dict[str, int] = Field(
        default={}, description="Filter 1: per-tissue JPEG size thresholds (tissue -> bytes)"
    )
    min_piece_std: float = Field(
        default=DEFAULT_MIN_PIECE_STD,
        description="Filter 2 (half-empty): drop when any grid piece's pixel std is below this",
    )
    min_channel_std: float = Field(
        default=DEFAULT_MIN_CHANNEL_STD,
        description="Filter 3 (dirt): drop when a colour channel's std over the tile is below this",
    )
    dirt_rule: str = Field(
        default=DEFAULT_DIRT_RULE,
        description="Filter 3: drop when 'all' channels are below the threshold, or 'any' channel",
    )
    montage_examples: int = Field(default=6, description="Example tiles per verdict in the montage")

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(
            min_jpeg_bytes=self.min_jpeg_bytes,
            min_jpeg_bytes_by_tissue=self.min_jpeg_bytes_by_tissue,
            min_piece_std=self.min_piece_std,
            min_channel_std=self.min_channel_std,
            dirt_rule=self.dirt_rule,
        )


def _filter_metadata(filtered: pd.DataFrame, png, thresholds: QualityThresholds) -> dict:
    counts = verdict_counts(filtered)
    return {
        "verdicts": _md(counts),
        "verdicts_per_tissue": _md(verdict_counts(filtered, by="tissue")),
        "kept": dg.MetadataValue.int(int((filtered["verdict"] == "kept").sum())),
        "montage": plot_metadata(png) if png is not None else dg.MetadataValue.text("no tiles"),
        "thresholds": dg.MetadataValue.json(thresholds.as_dict()),
        "retune_sql": dg.MetadataValue.md(f"```sql\n{verdict_sql(thresholds)}\n```"),
    }


def _montage(lk, filtered: pd.DataFrame, name: str, per_verdict: int, title: str, thresholds=None):
    ok = filtered[filtered["status"] == "ok"]
    if ok.empty:
        return None
    counts = filtered["verdict"].value_counts().to_dict()
    examples = pick_examples(filtered, per_verdict=per_verdict, seed=0, thresholds=thresholds)
    return filter_montage(
        examples, lk.plot(name), counts=counts, per_verdict=per_verdict, title=title
    )


@dg.asset(
    group_name=GROUP,
    kinds={"python", "parquet"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    deps=[slide_tiles],
    code_version="1",
)
def filtered_tiles(
    context: dg.AssetExecutionContext, config: TileFilterConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §3: every tile of a slide judged by the three filters in order — JPEG size below its
    tissue's threshold (`small_file`), any 4x4 piece nearly flat (`half_empty`), a colour
    channel nearly flat over the tile (`dirt`) — else `kept` (`error` = unreadable pixels).
    Reads the measurements stored by `slide_tiles` (no pixels are re-read), so thresholds can be
    re-tuned cheaply, or in SQL over the `slide_tiles` view (see the `retune_sql` metadata).
    Writes `tables/filtered_tiles/<id>.parquet` and a montage of example tiles per verdict."""
    lk = lake.lake()
    thresholds = config.thresholds()
    fhash = params_hash(thresholds.as_dict())
    parts, missing = [], []
    for sid in context.partition_keys:
        try:
            index_path = lk.partition_table("slide_tiles", sid)
        except InvalidSampleIdError as e:
            missing.append({"tissue_sample_id": sid, "reason": str(e)})
            continue
        if not index_path.is_file():
            missing.append({"tissue_sample_id": sid, "reason": "no tile index (slide not tiled)"})
            continue
        out = apply_filters(pd.read_parquet(index_path), thresholds)
        out["filter_hash"] = fhash
        write_parquet(out, lk.partition_table("filtered_tiles", sid))
        parts.append(out)
    for m in missing:
        context.log.warning(f"slide {m['tissue_sample_id']}: {m['reason']}")
    filtered = pd.concat(parts, ignore_index=True) if parts else None
    if filtered is None or filtered.empty:
        return dg.MaterializeResult(
            metadata={
                "tiles": dg.MetadataValue.int(0),
                "slides_without_index": _md(pd.DataFrame(missing)),
            }
        )
    keys = list(context.partition_keys)
    name = (
        f"tile_filter_montage_{keys[0]}.png"
        if len(keys) == 1
        else f"tile_filter_montage_{keys[0]}_{len(keys)}.png"
    )
    png = _montage(
        lk, filtered, name, config.montage_examples, f"Tile filters: {len(parts)} slide(s)",
        thresholds,
    )  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "tiles": dg.MetadataValue.int(len(filtered)),
            **_filter_metadata(filtered, png, thresholds),
            "slides_without_index": _md(pd.DataFrame(missing)),
            "table": dg.MetadataValue.path(str(lk.partition_dir("filtered_tiles"))),
        }
    )


# ----------------------------------------------------------------------------------------------
# balanced_tile_sample
# ----------------------------------------------------------------------------------------------


class BalancedSampleConfig(dg.Config):
    """SPEC §4 sampling and the donor split."""

    tiles_per_slide: int = Field(default=100, description="Tiles drawn per slide")
    tissue_target: int = Field(
        default=5000,
        description="Tiles per tissue to reach: tissues with few slides take more per slide",
    )
    redistribute_shortfall: bool = Field(
        default=True,
        description="A slide with too few kept tiles passes its shortfall to its tissue's others",
    )
    seed: int = Field(default=0, description="Seed of the draws and of the donor split")
    test_fraction: float = Field(
        default=0.2, description="Fraction of each tissue's slides whose donors go to test"
    )
    montage_examples: int = Field(default=6, description="Example tiles per verdict in the montage")


def _read_filtered(lk) -> pd.DataFrame:
    d = lk.partition_dir("filtered_tiles")
    files = sorted(d.glob("*.parquet")) if d.is_dir() else []
    if not files:
        raise dg.Failure(
            description=f"no filtered tiles under {d}: materialise slide_tiles and filtered_tiles first"
        )
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@dg.asset(
    group_name=GROUP,
    kinds={"python", "parquet"},
    deps=[filtered_tiles, selected_slides],
    code_version="1",
)
def balanced_tile_sample(
    context: dg.AssetExecutionContext, config: BalancedSampleConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §4: 100 kept tiles per slide (tissues with few slides take more per slide toward
    5,000 per tissue), drawn with a fixed seed, with a train/test split by donor (no donor on
    both sides; every tissue with >= 2 donors has test slides). Writes
    `tables/balanced_tile_sample.parquet` (absolute JPEG paths; the classifier's input) and the
    split `tables/donor_split.parquet`, reused by every later stage."""
    lk = lake.lake()
    filtered = _read_filtered(lk)
    sel_path = lk.table("selected_slides")
    if sel_path.is_file():
        sel = pd.read_parquet(sel_path, columns=["tissue_sample_id", "subject_id", "tissue"])
        stale = sorted(set(filtered["tissue_sample_id"]) - set(sel["tissue_sample_id"]))
        if stale:
            context.log.info(f"{len(stale)} tiled slides are no longer selected; left out")
        filtered = filtered[filtered["tissue_sample_id"].isin(sel["tissue_sample_id"])]
        subject = dict(zip(sel["tissue_sample_id"], sel["subject_id"], strict=True))
    else:
        subject = {}
    filtered = filtered.assign(
        subject_id=[subject.get(s) or subject_of(s) for s in filtered["tissue_sample_id"]]
    )
    slides = filtered.drop_duplicates("tissue_sample_id")[
        ["tissue_sample_id", "subject_id", "tissue"]
    ]
    kept = filtered[filtered["verdict"] == "kept"]
    with_tiles = slides[slides["tissue_sample_id"].isin(kept["tissue_sample_id"])]
    split = donor_split(with_tiles, test_fraction=config.test_fraction, seed=config.seed)
    # Donors whose slides have no kept tile still get a side (train) so the split covers all.
    others = sorted(set(slides["subject_id"]) - set(split["subject_id"]))
    split = pd.concat(
        [split, pd.DataFrame({"subject_id": others, "split": "train"})], ignore_index=True
    )
    sample = balanced_sample(
        kept,
        tiles_per_slide=config.tiles_per_slide,
        tissue_target=config.tissue_target,
        seed=config.seed,
        redistribute=config.redistribute_shortfall,
        slides=slides,
    )
    sample = assign_split(sample, split)
    sample["tile_id"] = (
        sample["tissue_sample_id"] + "_" + sample["x"].astype(str) + "_" + sample["y"].astype(str)
    )
    sample = sample[SAMPLE_COLUMNS]
    both = donors_on_both_sides(sample)
    if both:  # impossible by construction; never write a leaky split
        raise dg.Failure(description=f"donors on both sides of the split: {both[:10]}")
    split_table = donor_split_table(split, slides, sample)
    out = write_parquet(sample, lk.table("balanced_tile_sample"))
    write_parquet(split_table, lk.table("donor_split"))

    per_tissue = (
        sample.groupby(["tissue", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=["train", "test"], fill_value=0)
    )
    per_tissue["tiles"] = per_tissue.sum(axis=1)
    per_tissue["slides"] = sample.groupby("tissue")["tissue_sample_id"].nunique()
    per_tissue["target"] = [
        max(config.tissue_target, config.tiles_per_slide * int((slides["tissue"] == t).sum()))
        for t in per_tissue.index
    ]
    short = per_tissue[per_tissue["tiles"] < per_tissue["target"]]
    png = _montage(
        lk, filtered, "tile_filter_montage.png", config.montage_examples,
        f"Tile filters: {filtered['tissue_sample_id'].nunique()} slides",
    )  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            **table_metadata(sample, out),
            "tiles_per_tissue_and_split": _md(per_tissue.reset_index()),
            "tissues_below_target": _md(short.reset_index(), "none"),
            "donors": _md(
                split_table.groupby("split")
                .agg(
                    donors=("subject_id", "size"),
                    slides=("n_slides", "sum"),
                    tiles=("n_tiles", "sum"),
                )
                .reset_index()
            ),
            "donors_on_both_sides": dg.MetadataValue.int(len(both)),
            "test_tile_fraction": dg.MetadataValue.float(
                round(float((sample["split"] == "test").mean()), 4) if len(sample) else 0.0
            ),
            "all_tiles_verdicts": _md(verdict_counts(filtered)),
            "verdicts_per_tissue": _md(verdict_counts(filtered, by="tissue")),
            "montage": plot_metadata(png) if png is not None else dg.MetadataValue.text("no tiles"),
            "donor_split": dg.MetadataValue.path(str(lk.table("donor_split"))),
        }
    )


@dg.asset_check(asset=balanced_tile_sample, blocking=True)
def balanced_sample_split_is_clean(lake: DataLakeResource) -> dg.AssetCheckResult:
    """No donor on both sides, every tile's JPEG exists, each (slide, x, y) at most once."""
    lk = lake.lake()
    sample = pd.read_parquet(lk.table("balanced_tile_sample"))
    both = donors_on_both_sides(sample)
    missing = [p for p in sample["path"] if not os.path.isfile(p)]
    dups = int(sample.duplicated(["tissue_sample_id", "x", "y"]).sum())
    return dg.AssetCheckResult(
        passed=not both and not missing and dups == 0,
        metadata={
            "donors_on_both_sides": dg.MetadataValue.int(len(both)),
            "missing_jpegs": dg.MetadataValue.int(len(missing)),
            "duplicate_tiles": dg.MetadataValue.int(dups),
            "example_missing": dg.MetadataValue.text(", ".join(missing[:3]) or "none"),
        },
    )
