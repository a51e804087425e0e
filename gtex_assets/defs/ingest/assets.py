"""Ingest: GTEx annotations, the slide selection, and the raw slides (group ``ingest``).
Science in ``lib/ingest`` (portal CSV, selection) and ``lib/slides`` (fetch, inspect, MPP)."""

import dagster as dg
import polars as pl
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.defs import automation as auto
from gtex_assets.defs import settings
from gtex_assets.defs.metadata import counts_md, input_failure, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.defs.table_specs import table_spec, table_spec_metadata
from gtex_assets.lib.ingest.portal_csv import (
    ANNOTATIONS_SCHEMA,
    REJECTED_SCHEMA,
    PortalCSVError,
    read_portal_csv,
    tissue_lookup,
)
from gtex_assets.lib.ingest.sample_attributes import (
    COLUMNS as ATTRIBUTE_COLUMNS,
)
from gtex_assets.lib.ingest.sample_attributes import (
    attributes_from_gct_header,
    parse_sample_attributes,
)
from gtex_assets.lib.ingest.selection import select_slides
from gtex_assets.lib.ingest.sources import Kind, SourceError
from gtex_assets.lib.slides.mpp import DEFAULT_OVERRIDES_FILE, MppPolicy, load_overrides
from gtex_assets.lib.slides.raw import RAW_SLIDE_SCHEMA, inspect_slides, rows_to_table
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "ingest"


@dg.multi_asset(
    name="histology_annotations",
    group_name=GROUP,
    retry_policy=auto.DOWNLOAD_RETRY,
    specs=[
        table_spec(
            "histology_annotations", ANNOTATIONS_SCHEMA, kinds={"python", "parquet"},
            description="The GTEx Portal histology CSV, parsed: one row per tissue sample with "
            "its tissue, donor, sex, age bracket, Hardy scale and pathology notes.",
        ),
        table_spec(
            "histology_rejected_rows", REJECTED_SCHEMA, kinds={"python", "parquet"},
            description="Rows of GTEx Portal.csv left out (malformed or repeated id, empty "
            "tissue, donor mismatch): line number, raw id and reason.",
        ),
    ],
)  # fmt: skip
def gtex_histology_annotations(
    context: dg.AssetExecutionContext, lake: DataLakeResource, gtex_source: GTExSourceResource
):
    """The portal CSV's valid rows, and its rejected rows with line and reason (a bad row never
    stops the others)."""
    lk, src = lake.lake(), gtex_source.spec()
    csv_path = src.fetch(Kind.HISTOLOGY, lk.raw)
    try:
        parsed = read_portal_csv(csv_path)
    except PortalCSVError as e:
        raise input_failure(e) from None
    ann, rejected = parsed.annotations, parsed.rejected
    out = write_parquet(ann.to_arrow(), lk.table("histology_annotations"))
    rej = write_parquet(rejected.to_arrow(), lk.table("histology_rejected_rows"))
    if rejected.height:
        context.log.warning(f"{csv_path}: {parsed.rejection_summary()}")
    context.log.info(f"{ann.height} samples, {ann['tissue'].n_unique()} tissues from {csv_path}")
    version = dg.DataVersion(src.version(Kind.HISTOLOGY, raw_dir=lk.raw))
    yield dg.MaterializeResult(
        asset_key="histology_annotations",
        metadata={
            **table_metadata(ann, out),
            "rejected_rows": dg.MetadataValue.int(rejected.height),
            "tissues": dg.MetadataValue.int(ann["tissue"].n_unique()),
            "donors": dg.MetadataValue.int(ann["subject_id"].n_unique()),
            "samples_per_tissue": counts_md(ann["tissue"], "samples"),
            "source": dg.MetadataValue.text(str(csv_path)),
        },
        data_version=version,
    )
    yield dg.MaterializeResult(
        asset_key="histology_rejected_rows",
        metadata=table_metadata(rejected, rej),
        data_version=version,
    )


@dg.asset(
    name="sample_attributes",
    group_name=GROUP,
    retry_policy=auto.DOWNLOAD_RETRY,
    kinds={"python", "parquet"},
    metadata=table_spec_metadata("sample_attributes", dict.fromkeys(ATTRIBUTE_COLUMNS, pl.String)),
)
def gtex_sample_attributes(
    context: dg.AssetExecutionContext, lake: DataLakeResource, gtex_source: GTExSourceResource
) -> dg.MaterializeResult:
    """RNA-seq samples: aliquot id -> tissue sample id (the slide's id), with GTEx's SMTS/SMTSD
    tissue labels. From the SampleAttributesDS file, or the GCT header when a mirror lacks it."""
    lk, src = lake.lake(), gtex_source.spec()
    try:
        path = src.fetch(Kind.ATTRIBUTES, lk.raw)
        df, origin = parse_sample_attributes(path), str(path)
        version = src.version(Kind.ATTRIBUTES, raw_dir=lk.raw)
    except SourceError as e:
        context.log.warning(f"sample attributes unavailable ({e}); using the GCT header")
        path = src.fetch(Kind.GCT, lk.raw)
        df, origin = attributes_from_gct_header(path), f"{path} (header)"
        # As gtex_sample_attributes_file records an absent file: one that appears later is a
        # new version, so this re-runs from the file.
        version = "absent"
    out = write_parquet(df, lk.table("sample_attributes"))
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, out),
            "rna_tissue_samples": dg.MetadataValue.int(df["tissue_sample_id"].n_unique()),
            "origin": dg.MetadataValue.text(origin),
        },
        data_version=dg.DataVersion(version),
    )


class SelectionConfig(dg.Config):
    """SPEC §1."""

    slides_per_tissue: int = Field(default=50, description="Slides per tissue (all if fewer)")
    tissues: list[str] = Field(default=[], description="Tissues to use; empty = every tissue")
    prefer_rna: bool = Field(default=True, description="Prefer samples that have RNA-seq")
    seed: int = Field(default=0, description="Seed of the tie-breaking order")


SELECTED_SCHEMA = {**ANNOTATIONS_SCHEMA, "has_rna": pl.Boolean, "rank_in_tissue": pl.Int64}


@dg.asset(
    group_name=GROUP,
    kinds={"python", "parquet"},
    deps=["histology_annotations", "sample_attributes"],
    metadata=table_spec_metadata("selected_slides", SELECTED_SCHEMA),
)
def selected_slides(
    context: dg.AssetExecutionContext, config: SelectionConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §1: N slides per tissue (50 default), preferring samples with expression; tissues
    with fewer slides take all. Adds each chosen sample id as a `slides` partition."""
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    ann = pl.read_parquet(lk.table("histology_annotations"))
    rna = pl.read_parquet(lk.table("sample_attributes"), columns=["tissue_sample_id"])
    sel = select_slides(
        ann,
        set(rna["tissue_sample_id"].drop_nulls().to_list()),
        slides_per_tissue=config.slides_per_tissue,
        tissues=config.tissues or None,
        prefer_rna=config.prefer_rna,
        seed=config.seed,
    )
    out = write_parquet(sel.to_arrow(), lk.table("selected_slides"))
    existing = set(context.instance.get_dynamic_partitions(slide_partitions.name))
    new = [s for s in sel["tissue_sample_id"].to_list() if s not in existing]
    if new:
        context.instance.add_dynamic_partitions(slide_partitions.name, new)
    context.log.info(f"selected {sel.height} slides; {len(new)} new slide partitions")
    return dg.MaterializeResult(
        metadata={
            **table_metadata(sel, out),
            "with_rna": dg.MetadataValue.int(int(sel["has_rna"].sum())),
            "new_partitions": dg.MetadataValue.int(len(new)),
            "slides_per_tissue": counts_md(sel["tissue"], "slides"),
        }
    )


class RawSlidesConfig(dg.Config):
    """Fetching, and the MPP policy of ``lib/slides/mpp.py``: description, else override
    table, else fallback (off)."""

    workers: int = Field(default=4, description="Parallel downloads/inspections within a run")
    mpp_overrides: str = Field(
        default=MppPolicy.overrides_path,
        description="Per-slide MPP table (CSV/Parquet: tissue_sample_id,mpp) for slides whose "
        f"description has none; relative to the data root (default {DEFAULT_OVERRIDES_FILE})",
    )
    fallback_mpp: float | None = Field(
        default=MppPolicy.fallback_mpp,
        description="MPP assumed for a slide with neither (e.g. 0.5 for GTEx 20x); unset = "
        "such a slide is quarantined",
    )

    def policy(self) -> MppPolicy:
        return MppPolicy(overrides_path=self.mpp_overrides, fallback_mpp=self.fallback_mpp)


@dg.asset(
    group_name=GROUP,
    kinds={"python", "svs"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    deps=[selected_slides],
    code_version="2",
    metadata=table_spec_metadata("raw_slides", RAW_SLIDE_SCHEMA),
    retry_policy=auto.DOWNLOAD_RETRY,
)
def raw_slides(
    context: dg.AssetExecutionContext,
    config: RawSlidesConfig,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
) -> dg.MaterializeResult:
    """Each selected slide fetched (downloaded resumably, or used in place from a local mirror),
    verified and opened: dimensions, MPP (with its source), magnification, pyramid levels. A
    slide that will not open, or has no MPP, is quarantined with the reason (status column),
    not a failed run. One row per slide in `tables/raw_slides/<id>.parquet`."""
    config = settings.resolve(context, config, lake)
    lk, src, policy = lake.lake(), gtex_source.spec(), config.policy()
    overrides = load_overrides(policy.overrides_file(lk.root))
    for problem in overrides.problems:
        context.log.warning(f"MPP override left out: {problem}")
    results = inspect_slides(
        src, list(context.partition_keys), lk, tissue_lookup(lk.table("histology_annotations")),
        overrides=overrides, policy=policy, workers=config.workers,
    )  # fmt: skip
    for row, changed in results:
        sid = row["tissue_sample_id"]
        if changed:
            write_parquet(rows_to_table([row]), lk.partition_table("raw_slides", sid))
        if row["status"] != "ok":
            context.log.warning(f"slide {sid} quarantined: {row['reason']}")
        context.add_asset_metadata(_slide_metadata(row), partition_key=sid)
    n_ok = sum(r["status"] == "ok" for r, _ in results)
    context.log.info(f"{n_ok} of {len(results)} slides ok")
    return dg.MaterializeResult()


def _slide_metadata(row: dict) -> dict[str, dg.MetadataValue]:
    md = {
        "status": dg.MetadataValue.text(row["status"]),
        "reason": dg.MetadataValue.text(row.get("reason") or ""),
        "mpp_source": dg.MetadataValue.text(row.get("mpp_source") or "none"),
    }
    if row["status"] == "ok":
        md |= {
            "mpp": dg.MetadataValue.float(float(row["mpp_x"])),
            "size_px": dg.MetadataValue.text(f"{row['width']}x{row['height']}"),
            "file_bytes": dg.MetadataValue.int(int(row["file_bytes"])),
        }
    return md
