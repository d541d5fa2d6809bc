"""Fixtures for the whole suite: a database and a Redis prefix for this test run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from libs.common import testing
from libs.common.bus import Bus, connect


@pytest.fixture(scope="session")
def run_id() -> str:
    return testing.new_run_id()


@pytest.fixture(scope="session")
async def database_url(run_id: str) -> AsyncIterator[str]:
    name = f"chatflow_t_{run_id}"
    url = await testing.create_database(name)
    yield url
    await testing.drop_database(name)


@pytest.fixture(scope="session")
async def stream_prefix(run_id: str) -> AsyncIterator[str]:
    prefix = f"t{run_id}:"
    yield prefix
    await testing.drop_prefix(prefix)


@pytest.fixture
async def bus(stream_prefix: str, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A bus under a prefix of this test's own, so tests don't see each other's streams."""
    redis = connect(testing.REDIS_URL)
    prefix = f"{stream_prefix}{testing.new_run_id()}:"
    yield Bus(redis, prefix)
    await testing.drop_prefix(prefix)
    await redis.aclose()
