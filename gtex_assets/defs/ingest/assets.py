"""Ingest: GTEx annotations, the slide selection, and the raw slides (group ``ingest``)."""

from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.ids import InvalidSampleIdError
from gtex_assets.defs.metadata import counts_md, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.lib.ingest.portal_csv import parse_portal_csv
from gtex_assets.lib.ingest.sample_attributes import (
    attributes_from_gct_header,
    parse_sample_attributes,
)
from gtex_assets.lib.ingest.selection import select_slides
from gtex_assets.lib.ingest.sources import Kind, SourceError
from gtex_assets.lib.slides.raw import RAW_SLIDE_COLUMNS, fetch_and_inspect, rows_to_table
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "ingest"


@dg.asset(group_name=GROUP, kinds={"python", "parquet"})
def gtex_histology_annotations(
    context: dg.AssetExecutionContext, lake: DataLakeResource, gtex_source: GTExSourceResource
) -> dg.MaterializeResult:
    """The GTEx Portal histology CSV, parsed: one row per tissue sample with its tissue,
    donor, sex, age bracket, Hardy scale and pathology notes (columns snake-cased)."""
    lk, src = lake.lake(), gtex_source.spec()
    csv_path = src.fetch(Kind.HISTOLOGY, lk.raw)
    df = parse_portal_csv(csv_path)
    out = write_parquet(df, lk.table("histology_annotations"))
    context.log.info(f"{len(df)} samples, {df['tissue'].nunique()} tissues from {csv_path}")
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, out),
            "tissues": dg.MetadataValue.int(int(df["tissue"].nunique())),
            "donors": dg.MetadataValue.int(int(df["subject_id"].nunique())),
            "samples_per_tissue": counts_md(df["tissue"], "samples"),
            "source": dg.MetadataValue.text(str(csv_path)),
        },
        data_version=dg.DataVersion(src.version(Kind.HISTOLOGY, raw_dir=lk.raw)),
    )


@dg.asset(group_name=GROUP, kinds={"python", "parquet"})
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
        # The source sensor compares this with the attributes file's version: a file that
        # appears later then counts as a change.
        version = "absent"
    out = write_parquet(df, lk.table("sample_attributes"))
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, out),
            "rna_tissue_samples": dg.MetadataValue.int(int(df["tissue_sample_id"].nunique())),
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


@dg.asset(
    group_name=GROUP,
    kinds={"python", "parquet"},
    deps=[gtex_histology_annotations, gtex_sample_attributes],
)
def selected_slides(
    context: dg.AssetExecutionContext, config: SelectionConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §1: N slides per tissue (50 default), preferring samples with expression; tissues
    with fewer slides take all. Adds each chosen sample id as a `slides` partition."""
    lk = lake.lake()
    ann = pd.read_parquet(lk.table("histology_annotations"))
    attrs = pd.read_parquet(lk.table("sample_attributes"))
    sel = select_slides(
        ann,
        set(attrs["tissue_sample_id"].dropna()),
        slides_per_tissue=config.slides_per_tissue,
        tissues=config.tissues or None,
        prefer_rna=config.prefer_rna,
        seed=config.seed,
    )
    out = write_parquet(sel, lk.table("selected_slides"))
    existing = set(context.instance.get_dynamic_partitions(slide_partitions.name))
    new = [s for s in sel["tissue_sample_id"] if s not in existing]
    if new:
        context.instance.add_dynamic_partitions(slide_partitions.name, new)
    context.log.info(f"selected {len(sel)} slides; {len(new)} new slide partitions")
    return dg.MaterializeResult(
        metadata={
            **table_metadata(sel, out),
            "with_rna": dg.MetadataValue.int(int(sel["has_rna"].sum())),
            "new_partitions": dg.MetadataValue.int(len(new)),
            "slides_per_tissue": counts_md(sel["tissue"], "slides"),
        }
    )


class RawSlidesConfig(dg.Config):
    workers: int = Field(default=4, description="Parallel downloads/inspections within a run")


@dg.asset(
    group_name=GROUP,
    kinds={"python", "svs"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    deps=[selected_slides],
    code_version="1",
)
def raw_slides(
    context: dg.AssetExecutionContext,
    config: RawSlidesConfig,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
) -> dg.MaterializeResult:
    """Each selected slide fetched (downloaded resumably, or used in place from a local mirror),
    verified and opened with slideio: dimensions, MPP, magnification, pyramid levels. A slide
    that will not open is quarantined with the reason (status column), not a failed run."""
    lk, src = lake.lake(), gtex_source.spec()
    tissue_of = _tissue_lookup(lk)
    keys = list(context.partition_keys)

    def one(sample_id: str) -> dict:
        try:
            part = lk.partition_table("raw_slides", sample_id)
        except InvalidSampleIdError as e:
            # Never turn a malformed key into a path; report it in the run's metadata.
            return {"tissue_sample_id": sample_id, "status": "quarantined", "reason": str(e)}
        prev = pq.read_table(part).to_pylist()[0] if _safe_is_file(part) else None
        row = fetch_and_inspect(
            src, sample_id, tissue_of.get(sample_id), lk.raw, lk.quarantine, previous=prev
        )
        if row is not prev:
            write_parquet(rows_to_table([row]), part)
        return row

    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        rows = pd.DataFrame(list(pool.map(one, keys)), columns=RAW_SLIDE_COLUMNS)
    bad = rows[rows["status"] != "ok"]
    for _, r in bad.iterrows():
        context.log.warning(f"slide {r['tissue_sample_id']} quarantined: {r['reason']}")
    return dg.MaterializeResult(
        metadata={
            "slides": dg.MetadataValue.int(len(rows)),
            "ok": dg.MetadataValue.int(int((rows["status"] == "ok").sum())),
            "quarantined": dg.MetadataValue.int(len(bad)),
            "quarantine_reasons": dg.MetadataValue.md(
                bad[["tissue_sample_id", "reason"]].to_markdown(index=False) if len(bad) else "none"
            ),
            "table": dg.MetadataValue.path(str(lk.partition_dir("raw_slides"))),
        }
    )


def _safe_is_file(p) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def _tissue_lookup(lk) -> dict[str, str]:
    path = lk.table("histology_annotations")
    if not path.is_file():
        return {}
    ann = pd.read_parquet(path, columns=["tissue_sample_id", "tissue"])
    return dict(zip(ann["tissue_sample_id"], ann["tissue"], strict=True))
