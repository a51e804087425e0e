"""Analysis (SPEC §7-§8): views of embeddings and expression, image → expression regression,
cluster-average transcriptomes and the off-the-shelf vs fine-tuned comparison."""
