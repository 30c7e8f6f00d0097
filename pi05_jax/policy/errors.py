"""The exception the policy layer raises for bad robot input: its message names the key and what was expected."""

from __future__ import annotations

from pi05_jax.observation import ObservationError


class PolicyInputError(ObservationError):
    """A raw observation the policy cannot use (missing key, wrong shape or dtype, NaN, no prompt)."""
