"""Settings read from the environment (the node timings of agents and controller)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from virtshift.errors import VirtshiftError


def positive_seconds(env: Mapping[str, str], name: str, default: float,
                     error: type[VirtshiftError] = VirtshiftError) -> float:
    """``env[name]`` as a positive finite number of seconds, ``default`` when unset; anything
    else raises ``error`` naming the variable."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name}={raw!r}: not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise error(f"{name}={raw!r}: must be a positive number of seconds")
    return value
