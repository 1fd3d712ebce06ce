"""Settings of the operator tools (``recstream replay profiles | regen | compare``).

The tools' own fields start with ``replay_`` and read ``RECSTREAM_REPLAY_<SETTING>`` (e.g.
``RECSTREAM_REPLAY_BATCH_SIZE``), the rule of every service's settings (recstream/settings.py);
command-line flags, generated from these fields, override them. The fold itself uses the stream
processor's settings (:class:`streams.settings.StreamsSettings`: weights, half-life, thresholds),
so a rebuild folds exactly as the live agent does.
"""

from __future__ import annotations

from pydantic import Field

from recstream.settings import CommonSettings

__all__ = ["OpsSettings"]


class OpsSettings(CommonSettings):
    """Replays of topic history: profile rebuilds, regeneration re-runs, output comparisons."""

    replay_batch_size: int = Field(
        2000, ge=1, description="Records folded per Redis call while rebuilding profiles."
    )
    replay_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A replay fails when Kafka delivers nothing for this long before the end "
        "offsets are reached.",
    )
    replay_regen_batch_size: int = Field(
        64, ge=1, description="Users per model call when re-running regeneration."
    )
    replay_variant: str = Field(
        "replay", min_length=1, max_length=64, description="Variant written on replayed lists."
    )
    replay_k: int = Field(10, ge=1, le=200, description="Items per list (and k of overlap@k).")
    replay_dataset: str = Field(
        "ml-100k",
        description="Dataset whose co-occurrence model a regeneration replay uses when no "
        "artifact is given.",
    )
