"""Fixtures of the state tests: the scripts run on fakeredis (fast) and on a real redis-server (truth)."""

from __future__ import annotations

import pytest

from .support import fake_with_sha1hex


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.services)])
def either_redis(request):
    """Like ``any_redis``, with fakeredis given ``redis.sha1hex`` so client draws run there too."""
    if request.param == "fakeredis":
        yield fake_with_sha1hex()
    else:
        yield request.getfixturevalue("real_redis")
