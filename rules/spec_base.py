"""The base of every rules-file model: unknown fields refused, frozen, finite numbers only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    # no NaN or infinity in a rules file: every bound and factor is a finite number (a NaN threshold never
    # compares true, an infinite max_max_norm lets the clip threshold overflow)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
