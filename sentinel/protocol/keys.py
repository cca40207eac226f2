"""The DHT key layout: every record key of a run, in one place.

Each role reads and writes records under these keys (each peer under its own subkey); the record
schemas and their validator live in :mod:`sentinel.protocol.records`.
"""

from __future__ import annotations

from sentinel.protocol.records import record_key

# The bootstrap's signed run manifest: one key for every run a bootstrap serves.
MANIFEST_KEY = "sentinel/manifest"


def stage_key(run: str, stage: int) -> str:
    return record_key(run, "stage", stage)


def verifiers_key(run: str) -> str:
    return record_key(run, "verifiers")


def progress_key(run: str) -> str:
    return record_key(run, "progress")


def ban_key(run: str, target: str) -> str:
    return record_key(run, "ban", target)
