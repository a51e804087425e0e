"""Expression: the GTEx TPM matrix as a filtered log2(1+TPM) matrix (SPEC §5)."""
