"""Tiles: tissue tiling, the three quality filters and the balanced donor-split sample
(group ``tiles``; SPEC §2-§4). Science in ``lib/tiles`` (tiling, quality, sampling)."""

import os

import dagster as dg
import pandas as pd
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.defs import settings
from gtex_assets.defs.ingest.assets import raw_slides, selected_slides
from gtex_assets.defs.metadata import plot_metadata, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.defs.table_specs import table_spec
from gtex_assets.lib.ingest.portal_csv import tissue_lookup
from gtex_assets.lib.slides.raw import previous_row
from gtex_assets.lib.tiles.plots import filter_montage, pick_examples
from gtex_assets.lib.tiles.quality import (
    DEFAULT_DIRT_RULE,
    DEFAULT_MIN_CHANNEL_STD,
    DEFAULT_MIN_JPEG_BYTES,
    DEFAULT_MIN_PIECE_STD,
    VERDICTS,
    QualityThresholds,
    judge_slide,
    verdict_counts,
    verdict_sql,
)
from gtex_assets.lib.tiles.sampling import (
    DONOR_SPLIT_SCHEMA,
    SAMPLE_SCHEMA,
    build_sample,
    donors_on_both_sides,
    read_filtered,
)
from gtex_assets.lib.tiles.tiling import (
    TILE_INDEX_SCHEMA,
    TILER_VERSION,
    TILING_STATUS_SCHEMA,
    TilingParams,
    plan_jobs,
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
# slide_tiles (+ tiling_status)
# ----------------------------------------------------------------------------------------------

_TP = TilingParams()


class SlideTilesConfig(dg.Config):
    """SPEC §2 tiling parameters (a change re-tiles the slides it touches); defaults from
    ``lib.tiles.tiling.TilingParams``."""

    tile_size: int = Field(default=_TP.tile_size, description="Tile side in output pixels")
    target_mpp: float = Field(
        default=_TP.target_mpp,
        description="µm per tile pixel: a tile covers tile_size x target_mpp µm whatever the "
        "scan (a 40x slide reads twice the pixels, from a matching level or resized)",
    )
    mpp_tolerance: float = Field(
        default=_TP.mpp_tolerance,
        description="Relative MPP difference within which a pyramid level is read as is",
    )
    max_corrupt_share: float = Field(
        default=_TP.max_corrupt_share,
        description="Quarantine a slide when more than this share of its tissue tiles is "
        "unreadable (per-tile errors are always recorded)",
    )
    jpeg_quality: int = Field(default=_TP.jpeg_quality, description="JPEG quality of the tiles")
    min_tissue_fraction: float = Field(
        default=_TP.min_tissue_fraction,
        description="Keep a grid tile when this fraction of it is tissue (mask)",
    )
    piece_grid: int = Field(
        default=_TP.piece_grid,
        description="Pieces per side measured for the half-empty filter (4 = 4x4)",
    )
    mask_downsample: float = Field(
        default=_TP.mask_downsample, description="Level-0 pixels per tissue-mask pixel"
    )
    workers: int = Field(
        default=0, description="Worker processes within the run; 0 = all available cores"
    )
    force: bool = Field(
        default=False, description="Re-tile slides already done with the same parameters"
    )

    def params(self) -> TilingParams:
        return TilingParams(
            tile_size=self.tile_size, jpeg_quality=self.jpeg_quality,
            min_tissue_fraction=self.min_tissue_fraction, piece_grid=self.piece_grid,
            mask_downsample=self.mask_downsample, target_mpp=self.target_mpp,
            mpp_tolerance=self.mpp_tolerance, max_corrupt_share=self.max_corrupt_share,
        )  # fmt: skip


@dg.multi_asset(
    name="slide_tiles",
    group_name=GROUP,
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    code_version=TILER_VERSION,
    specs=[
        table_spec(
            "slide_tiles", TILE_INDEX_SCHEMA, deps=[raw_slides], kinds={"python", "jpeg", "parquet"},
            description="SPEC §2: each ok raw slide cut into non-overlapping 448 px JPEG tiles of "
            "224 µm (target_mpp 0.5) over tissue only, under tiles/<id>/<x>_<y>.jpg; per tile its "
            "level-0 x, y, read level and size, MPP, JPEG bytes and quality statistics.",
        ),
        table_spec(
            "tiling_status", TILING_STATUS_SCHEMA, deps=[raw_slides], kinds={"python", "parquet"},
            description="One row per slide: ok / no_tissue / too_small / quarantined (raw slide "
            "or too many unreadable tiles) / unreadable / failed, with the reason and counts.",
        ),
    ],
)  # fmt: skip
def slide_tiles(
    context: dg.AssetExecutionContext, config: SlideTilesConfig, lake: DataLakeResource
):
    """Tiles over tissue only (mask from a low-resolution level, so background is never read at
    full resolution), resumable after a kill; a slide done with the same parameters is skipped."""
    config = settings.resolve(context, config, lake)
    lk, params = lake.lake(), config.params()
    jobs, outcomes = plan_jobs(
        list(context.partition_keys), lk, tissue_lookup(lk.table("histology_annotations"))
    )
    workers = config.workers or _cores()
    skipped: set[str] = set()
    for job, out in tile_slides(jobs, params, workers=workers, force=config.force):
        outcomes.append(out.status)
        if out.skipped:
            skipped.add(job.sample_id)
        elif out.status["status"] != "ok":
            context.log.warning(
                f"slide {job.sample_id}: {out.status['status']}: {out.status['reason']}"
            )
    for st in outcomes:
        if st["tissue_sample_id"] in context.partition_keys:
            md = {**_tiling_metadata(st), "skipped_already_done": st["tissue_sample_id"] in skipped}
            context.add_asset_metadata(
                md, asset_key="slide_tiles", partition_key=st["tissue_sample_id"]
            )
            context.add_asset_metadata(
                md, asset_key="tiling_status", partition_key=st["tissue_sample_id"]
            )
    context.log.info(
        f"{len(outcomes)} slides, {sum(int(o.get('n_tiles') or 0) for o in outcomes)} tiles"
    )
    yield dg.MaterializeResult(asset_key="slide_tiles", metadata={"params_hash": params.hash()})
    yield dg.MaterializeResult(asset_key="tiling_status")


def _tiling_metadata(st: dict) -> dict:
    md = {
        "status": dg.MetadataValue.text(str(st["status"])),
        "reason": dg.MetadataValue.text(str(st.get("reason") or "")),
        "tiles": dg.MetadataValue.int(int(st.get("n_tiles") or 0)),
        "error_tiles": dg.MetadataValue.int(int(st.get("n_errors") or 0)),
    }
    if st.get("mpp") is not None:
        md["mpp"] = dg.MetadataValue.float(float(st["mpp"]))
        md["read"] = dg.MetadataValue.text(
            f"level {st.get('read_level')}: {st.get('read_px')} px -> {st.get('footprint_px')} level-0 px"
        )
    return md


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
    deps=["slide_tiles", "tiling_status"],
    code_version="2",
    metadata={"dagster/table_name": "filtered_tiles"},
)
def filtered_tiles(
    context: dg.AssetExecutionContext, config: TileFilterConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §3: every tile of a slide judged by the three filters in order — JPEG size below its
    tissue's threshold (`small_file`), any 4x4 piece nearly flat (`half_empty`), a colour
    channel nearly flat over the tile (`dirt`) — else `kept` (`error` = unreadable pixels).
    Reads the measurements stored by `slide_tiles` (no pixels are re-read), so thresholds can be
    re-tuned cheaply, or in SQL over the `slide_tiles` view (see the `retune_sql` metadata).
    A slide not tiled `ok` contributes no tiles. Writes `tables/filtered_tiles/<id>.parquet`;
    one montage of example tiles per verdict per run (an observation, not per slide)."""
    config = settings.resolve(context, config, lake)
    lk, thresholds = lake.lake(), config.thresholds()
    parts = []
    for sid in context.partition_keys:
        index_path = lk.partition_table("slide_tiles", sid)
        if not index_path.is_file():
            context.log.warning(f"slide {sid}: no tile index (slide not tiled)")
            continue
        status = previous_row(lk.partition_table("tiling_status", sid)) or {}
        out = judge_slide(pd.read_parquet(index_path), status.get("status"), thresholds)
        write_parquet(out, lk.partition_table("filtered_tiles", sid))
        parts.append(out)
        context.add_asset_metadata(_verdict_metadata(out), partition_key=sid)
    filtered = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(filtered):
        keys = list(context.partition_keys)
        png = _montage(
            lk, filtered, f"tile_filter_montage_{keys[0]}_{len(keys)}.png",
            config.montage_examples, f"Tile filters: {len(parts)} slide(s)", thresholds,
        )  # fmt: skip
        md = {
            "verdicts": _md(verdict_counts(filtered)),
            "retune_sql": dg.MetadataValue.md(f"```sql\n{verdict_sql(thresholds)}\n```"),
            **({"montage": plot_metadata(png)} if png is not None else {}),
        }
        context.log_event(dg.AssetObservation(asset_key="filtered_tiles", metadata=md))
    return dg.MaterializeResult(
        metadata={"thresholds": dg.MetadataValue.json(thresholds.as_dict())}
    )


def _verdict_metadata(filtered: pd.DataFrame) -> dict:
    counts = filtered["verdict"].value_counts().to_dict()
    return {"tiles": len(filtered), **{f"verdict_{v}": int(counts.get(v, 0)) for v in VERDICTS}}


# ----------------------------------------------------------------------------------------------
# balanced_tile_sample (+ donor_split)
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


@dg.multi_asset(
    name="balanced_tile_sample",
    group_name=GROUP,
    code_version="1",
    specs=[
        table_spec(
            "balanced_tile_sample", SAMPLE_SCHEMA,
            deps=[filtered_tiles, selected_slides], kinds={"python", "parquet"},
            description="SPEC §4: 100 kept tiles per slide (tissues with few slides take more, "
            "toward 5,000 per tissue), drawn with a fixed seed, split train/test by donor; "
            "absolute JPEG paths (the classifier's input).",
        ),
        table_spec(
            "donor_split", DONOR_SPLIT_SCHEMA,
            deps=[filtered_tiles, selected_slides], kinds={"python", "parquet"},
            description="Train/test side of every donor (no donor on both sides), with its slides, "
            "sampled tiles and tissues; reused by every later stage.",
        ),
    ],
)  # fmt: skip
def balanced_tile_sample(
    context: dg.AssetExecutionContext, config: BalancedSampleConfig, lake: DataLakeResource
):
    """The balanced sample and the donor split (lib.tiles.sampling.build_sample)."""
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    sel_path = lk.table("selected_slides")
    selected = (
        pd.read_parquet(sel_path, columns=["tissue_sample_id", "subject_id", "tissue"])
        if sel_path.is_file()
        else None
    )
    try:
        filtered = read_filtered(lk.partition_dir("filtered_tiles"))
        res = build_sample(
            filtered, selected, tiles_per_slide=config.tiles_per_slide,
            tissue_target=config.tissue_target, seed=config.seed,
            redistribute=config.redistribute_shortfall, test_fraction=config.test_fraction,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from None
    if res.left_out:
        context.log.info(f"{len(res.left_out)} tiled slides are no longer selected; left out")
    out = write_parquet(res.sample, lk.table("balanced_tile_sample"))
    split_out = write_parquet(res.split_table, lk.table("donor_split"))
    png = _montage(
        lk, filtered, "tile_filter_montage.png", config.montage_examples,
        f"Tile filters: {filtered['tissue_sample_id'].nunique()} slides",
    )  # fmt: skip
    yield dg.MaterializeResult(
        asset_key="balanced_tile_sample", metadata=_sample_metadata(res, filtered, png, out)
    )
    yield dg.MaterializeResult(
        asset_key="donor_split", metadata=table_metadata(res.split_table, split_out)
    )


def _sample_metadata(res, filtered: pd.DataFrame, png, path) -> dict:
    short = res.per_tissue[res.per_tissue["tiles"] < res.per_tissue["target"]]
    test = float((res.sample["split"] == "test").mean()) if len(res.sample) else 0.0
    return {
        **table_metadata(res.sample, path),
        "tiles_per_tissue_and_split": _md(res.per_tissue),
        "tissues_below_target": _md(short, "none"),
        "test_tile_fraction": dg.MetadataValue.float(round(test, 4)),
        "all_tiles_verdicts": _md(verdict_counts(filtered)),
        "verdicts_per_tissue": _md(verdict_counts(filtered, by="tissue")),
        "montage": plot_metadata(png) if png is not None else dg.MetadataValue.text("no tiles"),
    }


@dg.asset_check(asset="balanced_tile_sample", blocking=True)
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
