"""Seeding helpers: every random stream is keyed by (seed, names) so that one slide's pixels do
not depend on which other slides were generated, or in what order."""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A Generator determined by ``seed`` and the string/int ``keys`` (stable across runs).

    Python's ``hash()`` is salted per process, so the keys are hashed with SHA-256 instead.
    """
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))
