"""The differentially private profile embedding: topic ``profiles.embeddings``, key = user_id.

Analytics may read these vectors; they are the only user-derived vectors that leave the trust
boundary. Each is one release of the Gaussian mechanism of ``inference.privacy``: the user's
profile embedding clipped to ``clip_norm`` plus N(0, σ²) noise per coordinate, (``epsilon``,
``delta``)-DP against any change of the user's profile. The vector is not renormalised: averaged
over many users, releases estimate the users' mean profile without bias.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import Id

__all__ = ["ProfileEmbedding"]


class ProfileEmbedding(BaseModel):
    """One (ε, δ)-DP release of a user's profile embedding."""

    model_config: ClassVar[ConfigDict] = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False
    )

    schema_version: Literal[1] = 1
    user_id: Id
    profile_version: Annotated[int, Field(ge=1)] = Field(
        description="The stored profile version the vector was computed from (one release each)."
    )
    vector: Annotated[list[float], Field(min_length=1, max_length=4096)] = Field(
        description="Clipped profile embedding plus Gaussian noise (not unit length)."
    )
    epsilon: Annotated[float, Field(gt=0)] = Field(description="ε of this release.")
    delta: Annotated[float, Field(gt=0, lt=1)] = Field(description="δ of this release.")
    clip_norm: Annotated[float, Field(gt=0)] = Field(
        description="L2 clip C; the sensitivity is 2C (user-level replace-one)."
    )
    sigma: Annotated[float, Field(gt=0)] = Field(description="Noise standard deviation.")
    mechanism: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="How the noise was calibrated and accounted (analytic-gaussian/zcdp)."
    )
    generated_at: AwareDatetime
