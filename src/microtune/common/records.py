"""The strict record type of everything microtune reads back from JSON (artifact configs and
the state records methods keep beside their tensors): exact types, no NaN, no unknown keys."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

SHA256 = r"^sha256:[0-9a-f]{64}$"
Sha256 = Annotated[str, StringConstraints(pattern=SHA256)]


class Record(BaseModel):
    """Strict: exact types, no NaN or infinity, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
