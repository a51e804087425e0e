"""Embeddings: tile and slide embeddings, stored in Parquet and LanceDB (group ``embeddings``;
SPEC §7 first half, and §8's off-the-shelf encoders). Science in ``lib/embeddings``: the run of
`tile_embeddings` in ``tile_job``, that of `slide_embeddings` in ``slide_job``, models in
``embed`` (timm encoders: ``lib/model/backbones``), storage in ``vector_store``.

Write path (why two steps): each `tile_embeddings` partition (slide) writes its own Parquet,
``tables/tile_embeddings/<sample id>.parquet`` with the rows of every model, atomically, so
batches of slides run in parallel without a database lock. The single writer `slide_embeddings`
(pool ``lancedb_writer``) then bulk-loads the changed slides into the LanceDB table
`tile_embedding_store` stands for, and writes slide means + clusters (`slide_embeddings`,
Parquet and LanceDB) and the model table `embedding_models`.

Adding a pathology foundation model (UNI, Virchow2, H-optimus-0 ...): list it in
`tile_embeddings`' config ``encoders`` (e.g. ``["uni", "virchow2"]``, ``["hf-hub:org/repo"]``,
or ``["vit_large_patch16_224?init_values=1e-5&dynamic_img_size=true@/models/uni.bin"]`` for a
local weights file; see ``backbones.parse_encoder``). Gated hub models need the terms accepted
on huggingface.co and ``huggingface-cli login`` / ``HF_TOKEN``; the weights are cached under
``$HF_HOME``. Each arm gets its own model id (``uni-hub``), input size and normalisation from
timm's data config, and flows into gene_r2 / feature_comparison like the other models.
"""

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.tables import CATALOG_DATABASE
from gtex_assets.defs import settings
from gtex_assets.defs.execution import GPU_OP_TAGS, GPU_POOL
from gtex_assets.defs.metadata import column_schema, counts_md, input_failure, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.embeddings import slide_job as S
from gtex_assets.lib.embeddings import tile_job as T
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.model.backbones import resolve_device
from gtex_assets.resources import DataLakeResource

GROUP = "embeddings"
TILE_STORE_KEY = "tile_embedding_store"  # the LanceDB copy of tile_embeddings (vector search)
_DEFAULT_OPTS = E.InferenceOptions()


def _spec_metadata(name: str, schema: pa.Schema) -> dict:
    """A table's ``dagster/table_name`` + ``dagster/column_schema`` (registry descriptions)."""
    empty = pl.from_arrow(schema.empty_table())
    return {"dagster/table_name": f"{CATALOG_DATABASE}.main.{name}",
            "dagster/column_schema": column_schema(name, empty)}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# tile_embeddings
# ----------------------------------------------------------------------------------------------


class TileEmbeddingsConfig(dg.Config):
    """Which models embed which tiles, and how fast."""

    checkpoints: str = Field(
        default="latest_run",
        description="Classifier checkpoints to embed with: 'latest_run' (every kept checkpoint of "
        "the latest training run), 'selected', 'all' or 'none'",
    )
    epochs: list[int] = Field(
        default=[],
        description="Only checkpoints of these epochs (e.g. [5, 10, 20, 30]); empty = all",
    )
    off_the_shelf: bool = Field(
        default=True, description="Also embed with the backbone as pretrained (no fine-tuning)"
    )
    off_the_shelf_weights: str = Field(
        default="",
        description="Weights of the off-the-shelf model; empty = the classifier card's setting "
        "(else 'imagenet'; random init, tagged '-random', when unavailable)",
    )
    backbone: str = Field(
        default="efficientnet_b0",
        description="Off-the-shelf backbone when there are no classifier checkpoints",
    )
    encoders: list[str] = Field(
        default=[],
        description="Further off-the-shelf arms through timm: 'uni', 'uni2-h', 'virchow2', "
        "'h-optimus-0', 'h-optimus-1', 'prov-gigapath', 'hf-hub:<org>/<repo>', or "
        "'<timm arch>?<kwargs>@<local weights file>' (backbones.parse_encoder)",
    )
    all_filtered_tiles: bool = Field(
        default=False,
        description="Also embed every filtered 'kept' tile of the slide, not only the balanced "
        "sample (rows get sampled=false; spatial maps then cover the whole slide)",
    )
    batch_size: int = Field(default=_DEFAULT_OPTS.batch_size, description="Tiles per forward pass")
    precision: str = Field(
        default=_DEFAULT_OPTS.precision,
        description="'auto' (bf16 where native and cosine >= min_cosine to fp32, else fp32), "
        "'fp32' or 'bf16'",
    )
    min_cosine: float = Field(
        default=_DEFAULT_OPTS.min_cosine, description="bf16 accuracy bar (auto precision)"
    )
    engine: str = Field(
        default=_DEFAULT_OPTS.engine,
        description="'auto' (ONNX Runtime fp32 on CPU, torch on GPU), 'onnxruntime' or 'torch'",
    )
    decode_workers: int = Field(
        default=_DEFAULT_OPTS.decode_workers,
        description="Threads decoding JPEGs ahead of the model",
    )
    device: str = Field(default="auto", description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")

    def options(self) -> E.InferenceOptions:
        return E.InferenceOptions(batch_size=self.batch_size, precision=self.precision,
                                  decode_workers=self.decode_workers, min_cosine=self.min_cosine,
                                  engine=self.engine)  # fmt: skip


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    # the weights, the checkpoint table naming them, the tiles (+ every kept tile, optionally)
    deps=["tissue_classifier", "classifier_checkpoints", "balanced_tile_sample", "filtered_tiles"],
    pool=GPU_POOL,  # one inference job on the accelerator (or the CPU cores) at a time
    op_tags=GPU_OP_TAGS,
    code_version=E.EMBEDDING_VERSION,
    metadata=_spec_metadata("tile_embeddings", V.tile_schema(1)),
)
def tile_embeddings(
    context: dg.AssetExecutionContext, config: TileEmbeddingsConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §7: the pooled features of every tile of the balanced sample (optionally every
    filtered 'kept' tile) for each chosen classifier checkpoint, the off-the-shelf backbone and
    each timm encoder, tagged with the model id; one Parquet per slide; unchanged slides are
    skipped."""
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    keys = list(context.partition_keys)
    try:
        sample = T.read_sample(lk, keys)
        specs = E.select_models(
            T.read_checkpoints(lk), which=config.checkpoints, epochs=config.epochs,
            off_the_shelf=config.off_the_shelf, backbone=config.backbone,
            weights=config.off_the_shelf_weights or None, encoders=config.encoders,
        )  # fmt: skip
        S.write_model_cards(lk, specs)
    except (FileNotFoundError, ValueError, E.M.WeightsUnavailable) as e:
        raise input_failure(e) from e
    device = resolve_device(config.device)
    run = T.embed_slides(
        lk, keys, sample, specs, all_filtered=config.all_filtered_tiles,
        make_embedder=lambda s: E.TileEmbedder(E.load_model(s, device), s.input_size,
                                               config.options(), device),
    )  # fmt: skip
    for o in run.slides:  # each slide's own numbers on its own partition
        for w in o.warnings:
            context.log.warning(w)
        context.add_asset_metadata({"status": o.status, "tile_embeddings_computed": o.tiles,
                                    "undecodable_tiles": o.failed,
                                    "models_reused": ", ".join(o.models_reused) or "none"},
                                   partition_key=o.sample_id)  # fmt: skip
    # What every slide of the batch shares: the models, the device, the table's columns.
    return dg.MaterializeResult(
        metadata={
            "vector_width": run.width,
            "device": str(device),
            "tiles_per_second_batch": T.tiles_per_second(run),
            "models": dg.MetadataValue.md(run.models_table(specs).to_markdown(index=False)),
            **_spec_metadata("tile_embeddings", V.tile_schema(run.width)),
            "table": dg.MetadataValue.path(str(lk.partition_dir(T.TILE_DIR))),
        }  # fmt: skip
    )


# ----------------------------------------------------------------------------------------------
# slide_embeddings (+ embedding_models, the LanceDB tile store)
# ----------------------------------------------------------------------------------------------

_SP = S.SlideParams()


class SlideEmbeddingsConfig(dg.Config):
    mean_over: str = Field(
        default=_SP.mean_over,
        description="Tiles averaged into a slide embedding: 'sampled' (the balanced sample) or "
        "'all' (every embedded tile)",
    )
    n_clusters: int = Field(
        default=_SP.n_clusters,
        description="k-means clusters of slide embeddings per model; 0 = # tissues",
    )
    kmeans_seed: int = Field(default=_SP.kmeans_seed, description="k-means random_state")
    index_min_rows: int = Field(
        default=_SP.index_min_rows,
        description="Build the tile vector index once the table has this many rows",
    )
    index_type: str = Field(default=_SP.index_type, description="LanceDB vector index type")
    load_batch_slides: int = Field(
        default=_SP.load_batch_slides,
        description="Slides per LanceDB merge (one atomic commit each)",
    )

    def params(self) -> S.SlideParams:
        return S.SlideParams(**self.model_dump())


_MODELS_SCHEMA = pa.schema([pa.field(n, pa.string()) for n in E.ModelSpec.__dataclass_fields__])


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "slide_embeddings",
            group_name=GROUP,
            kinds={"lancedb", "parquet"},
            deps=[tile_embeddings],
            code_version=E.EMBEDDING_VERSION,
            metadata=_spec_metadata("slide_embeddings", V.slide_schema(1)),
            description="SPEC §7: per model and slide, the mean of its tiles' embeddings and "
            "its k-means cluster (Parquet + LanceDB slide_embeddings)",
        ),
        dg.AssetSpec(
            "embedding_models",
            group_name=GROUP,
            kinds={"parquet"},
            deps=[tile_embeddings],
            code_version=E.EMBEDDING_VERSION,
            metadata=_spec_metadata("embedding_models", _MODELS_SCHEMA),
            description="The models the embeddings were made with: kind (checkpoint | "
            "off_the_shelf), backbone or timm encoder, width, input size, normalisation",
        ),
        dg.AssetSpec(
            TILE_STORE_KEY,
            group_name=GROUP,
            kinds={"lancedb"},
            deps=[tile_embeddings],
            code_version=E.EMBEDDING_VERSION,
            description="LanceDB `tile_embeddings`: the tile rows for vector search",
        ),
    ],  # fmt: skip
    pool="lancedb_writer",  # the single LanceDB writer (dagster.yaml: every pool is exclusive)
    name="slide_embeddings",
)
def slide_embeddings(
    context: dg.AssetExecutionContext, config: SlideEmbeddingsConfig, lake: DataLakeResource
):
    """SPEC §7: each slide's embedding = the mean of its tiles' embeddings, per model, with a
    k-means cluster per slide (Parquet + LanceDB `slide_embeddings`); bulk-loads the changed
    tile rows into LanceDB `tile_embeddings` (idempotent merges) and indexes it when large."""
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    store = V.VectorStore(lk.lancedb)
    try:
        sids = S.current_slides(lk, context.instance.get_dynamic_partitions(slide_partitions.name))
        run = S.update_slide_embeddings(lk, store, sids, config.params())
    except (FileNotFoundError, ValueError) as e:
        raise input_failure(e) from e
    out = write_parquet(run.table, lk.table(S.SLIDE_TABLE_FILE))
    store.overwrite(V.SLIDE_TABLE, run.table)
    store.optimize(V.SLIDE_TABLE)  # drop data files of old versions (older than an hour)
    models = S.models_table(lk, sorted(run.meta["model_id"].unique()))
    models_out = write_parquet(models, lk.table(S.MODELS_TABLE))
    index_state = store.ensure_index(V.TILE_TABLE, min_rows=config.index_min_rows,
                                     index_type=config.index_type)  # fmt: skip
    yield dg.MaterializeResult(asset_key="slide_embeddings", metadata={
        **table_metadata(run.meta, out), "dim": run.width,
        **_spec_metadata("slide_embeddings", run.table.schema),
        "slides": int(run.meta["tissue_sample_id"].nunique()),
        "slide_means_recomputed": run.recomputed,
        "clusters": dg.MetadataValue.md(run.cluster_summary.to_markdown(index=False)),
        "slides_per_tissue": counts_md(run.meta.drop_duplicates("tissue_sample_id")["tissue"], "slides"),
    })  # fmt: skip
    yield dg.MaterializeResult(asset_key="embedding_models", metadata={
        **table_metadata(models, models_out),
        "models": dg.MetadataValue.md(models.to_markdown(index=False)),
    })  # fmt: skip
    yield dg.MaterializeResult(asset_key=TILE_STORE_KEY, metadata={
        "lancedb": dg.MetadataValue.path(str(lk.lancedb)), "tile_rows": store.count(V.TILE_TABLE),
        "slides_loaded": len(run.loaded), "slides_removed": len(run.removed),
        "rows_inserted": run.rows["inserted"], "rows_updated": run.rows["updated"],
        "rows_deleted": run.rows["deleted"], "rebuilt_at_new_width": run.rebuilt_store,
        "tile_index": index_state,
    })  # fmt: skip


@dg.asset_check(
    asset=dg.AssetKey("slide_embeddings"), description="LanceDB holds exactly the Parquet rows"
)
def embeddings_store_matches_parquet(
    context: dg.AssetCheckExecutionContext, lake: DataLakeResource
) -> dg.AssetCheckResult:
    """The LanceDB tables hold exactly the rows of the Parquet files (no duplicates, none
    missing): tile rows per slide = the slide's file, slide rows = slide_embeddings.parquet."""
    lk = lake.lake()
    store = V.VectorStore(lk.lancedb)
    sids = S.current_slides(lk, context.instance.get_dynamic_partitions(slide_partitions.name))
    want = {s: pq.ParquetFile(lk.partition_table(T.TILE_DIR, s)).metadata.num_rows for s in sids}
    ids = store.read(V.TILE_TABLE, ["row_id", "tissue_sample_id"]).to_pandas()
    have = ids.groupby("tissue_sample_id").size().to_dict()
    dup = int(ids["row_id"].duplicated().sum())
    wrong = sorted(s for s in set(want) | set(have) if want.get(s, 0) != have.get(s, 0))
    slide_pq = pq.ParquetFile(lk.table(S.SLIDE_TABLE_FILE)).metadata.num_rows
    slide_lance = store.count(V.SLIDE_TABLE)
    return dg.AssetCheckResult(
        passed=not dup and not wrong and slide_pq == slide_lance,
        metadata={
            "tile_rows_lancedb": len(ids),
            "tile_rows_parquet": sum(want.values()),
            "duplicate_row_ids": dup,
            "slides_mismatched": ", ".join(wrong[:20]) or "none",
            "slide_rows_lancedb": slide_lance,
            "slide_rows_parquet": slide_pq,
        },  # fmt: skip
    )
