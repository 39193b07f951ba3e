"""Shared fixtures: hypothesis profile bounded for CI."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=int(os.environ.get("ASYNCFS_HYPOTHESIS_EXAMPLES", "100")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
