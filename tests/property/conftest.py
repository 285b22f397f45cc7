"""Hypothesis settings for the property tests: modest, deterministic, no clock.

``derandomize`` makes every run try the same examples (a failure reproduces on the next run);
no example database, so a past failure cannot change what a later run tries (Hypothesis still
keeps its git-ignored caches in .hypothesis/); no deadline, because a timing threshold would
make the result depend on the machine's load. Set HYPOTHESIS_PROFILE=thorough
for a longer, randomised search.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "hostbus",
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    derandomize=False,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hostbus"))
