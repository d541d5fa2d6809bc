"""A whole ChatFLOW stack of this test run's own: its database, stream prefix and ports."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from libs.common import testing
from tools.devstack import Ports, Stack

DEMO_PASSWORD = "correct horse battery staple 42"


@pytest.fixture(scope="session")
def ca_context() -> ssl.SSLContext:
    from libs.common.settings import ROOT

    return ssl.create_default_context(cafile=str(ROOT / "var/certs/ca.pem"))


@pytest.fixture(scope="session")
def stack(
    database_url: str, stream_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("stack")
    st = Stack(
        database_url=database_url,
        redis_url=testing.REDIS_URL,
        stream_prefix=f"{stream_prefix}stack:",
        ports=Ports.free(),
        var=var,
        log_file=var / "stack.log",
        echo=False,
        inherit_env=False,
        extra_env={
            "CHATFLOW_SENDER_RETRY_BASE_S": "0.5",
            "CHATFLOW_CONSUMER_CLAIM_IDLE_MS": "2000",
            "CHATFLOW_CONSUMER_CLAIM_INTERVAL_MS": "500",
            # One IP and one demo agent make every request of the suite (the API fuzz alone
            # sends ~600 a minute): the dev limits would throttle the tests after it, in
            # whatever order they run. The limiter is tested on its own (gateway tests).
            "CHATFLOW_GATEWAY_RATE_LIMIT_PER_IP": "100000",
            "CHATFLOW_GATEWAY_RATE_LIMIT_PER_USER": "100000",
        },
    )
    st.migrate()
    st.seed(DEMO_PASSWORD)
    st.start()
    try:
        st.wait_ready(90)
    except Exception:
        st.stop()
        print(Path(var / "stack.log").read_text()[-8000:])
        raise
    yield st
    st.stop()


@pytest.fixture(scope="session")
async def agent_token(stack: Stack, ca_context: ssl.SSLContext) -> AsyncIterator[str]:
    from tests.oauth_client import login

    tokens = await login(stack.origin, "agent@chatflow.test", DEMO_PASSWORD, ca_context)
    yield str(tokens["access_token"])


def maildir_messages(folder: Path) -> list[bytes]:
    new = folder / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


async def sleep(s: float) -> None:
    await asyncio.sleep(s)
