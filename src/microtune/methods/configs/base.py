"""The fields and checks every method's config shares (no torch: the CLI reads the configs)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from microtune.common.checks import check_seed
from microtune.errors import MicrotuneError


@dataclass
class MethodConfig:
    """Fields every method has."""

    dropout: bool = field(
        default=True,
        metadata={
            "help": (
                "keep the backbone's dropout active while training. SLaSh and JR-WARP default "
                "to off, as in the original code; methods that train backbone weights default "
                "to on."
            )
        },
    )

    def __post_init__(self) -> None:
        self.check_common()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A method's own __post_init__ need not call super(): the checks every config shares
        # run first anyway, so a new method gets them for free (and its own checks never see
        # an inf that, say, int() would choke on).
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_common", False):

            @functools.wraps(own)
            def post_init(self: MethodConfig) -> None:
                self.check_common()
                own(self)

            post_init.checks_common = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init  # type: ignore[method-assign]

    def check_common(self) -> None:
        """Every float option must be finite; every `*seed` option a seed `check_seed` takes."""
        for option in dataclasses.fields(self):
            flag = "--" + option.name.replace("_", "-")
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise MicrotuneError(f"{flag} must be a finite number, got {value}")
            if option.name.endswith("seed") and value is not None:
                check_seed(flag, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MicrotuneError(
                f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}"
            )
        return cls(**values)
