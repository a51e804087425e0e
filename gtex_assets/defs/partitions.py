"""Partitions shared across domains."""

import dagster as dg

# One partition per whole-slide image; keys are GTEx Tissue Sample IDs, added by
# `selected_slides` when it chooses them.
slide_partitions = dg.DynamicPartitionsDefinition(name="slides")

# Per-slide assets run in batches: a backfill of 2,000 slides becomes ~40 runs, each using all
# cores, instead of 2,000 runs each paying process start-up.
SLIDE_BATCH = dg.BackfillPolicy.multi_run(max_partitions_per_run=50)
