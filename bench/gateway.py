"""The gateway's added latency per request: one API call through the gateway and straight to the
threader, the same number of times, on keep-alive connections.

``python -m bench.gateway --gateway https://127.0.0.1:<port> --direct https://127.0.0.1:<threader>
--token-file F --ca var/certs/ca.pem --n 2000`` prints one JSON object; ``measure`` returns it
(``bench/run.py`` calls that). Requests are sequential (latency, not throughput) and the two
paths alternate, starting with a different one each round, so drift on the shared machine (CPU
frequency, PostgreSQL's caches, other processes) lands on both paths alike. ``added_ms`` is the
difference of the two distributions' percentiles, not of single pairs.

The gateway counts these requests against its rate limits (600 per user and 1,200 per IP a
minute by default): run the stack with ``CHATFLOW_GATEWAY_RATE_LIMIT_PER_USER`` and ``..._PER_IP``
raised well above ``n`` (the limiter's Redis round trip then still counts, as in production).
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

PATH = "/api/conversations?limit=1"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (as ``bench.run``)."""
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def _summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(seconds) * 1000, 3),
        "p99": round(pct(seconds, 99) * 1000, 3),
    }


def _client(base: str, ctx: ssl.SSLContext, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=base,
        verify=ctx,
        http1=True,
        http2=False,
        trust_env=False,
        timeout=30.0,
        headers={"Authorization": f"Bearer {token}"},
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def _timed(client: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    r = client.get(path)
    elapsed = time.perf_counter() - started  # httpx reads the whole body before returning
    if r.status_code != 200:
        hint = " (raise the gateway's rate limits for the bench)" if r.status_code == 429 else ""
        raise RuntimeError(f"GET {client.base_url}{path} -> {r.status_code}{hint}: {r.text[:300]}")
    return elapsed


def measure(
    gateway_url: str,
    direct_url: str,
    token: str,
    ca: str | Path,
    n: int,
    warmup: int = 200,
    path: str = PATH,
) -> dict[str, Any]:
    """``n`` timed requests on each path after ``warmup`` untimed ones; times in milliseconds."""
    if n < 1:
        raise ValueError("n must be at least 1")
    ctx = ssl.create_default_context(cafile=str(ca))
    with _client(gateway_url, ctx, token) as gw, _client(direct_url, ctx, token) as direct:
        for _ in range(warmup):
            _timed(gw, path)
            _timed(direct, path)
        through: list[float] = []
        straight: list[float] = []
        for i in range(n):
            if i % 2:
                straight.append(_timed(direct, path))
                through.append(_timed(gw, path))
            else:
                through.append(_timed(gw, path))
                straight.append(_timed(direct, path))
    t, d = _summary(through), _summary(straight)
    return {
        "through_gateway_ms": t,
        "direct_ms": d,
        "added_ms": {k: round(t[k] - d[k], 3) for k in ("p50", "p99")},
        "requests": n,
    }


def read_token(path: str | Path) -> str:
    """The first token of a ``bench-agents`` file (JSON lines with a "token" key)."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return str(json.loads(line)["token"])
    raise ValueError(f"no token in {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gateway")
    p.add_argument("--gateway", required=True, help="public base URL of the gateway")
    p.add_argument("--direct", required=True, help="base URL of the threader")
    p.add_argument("--token-file", required=True, help="JSON lines with a 'token' key")
    p.add_argument("--ca", required=True, help="CA certificate that signed both servers'")
    p.add_argument("--n", type=int, default=2000, help="timed requests per path")
    p.add_argument("--warmup", type=int, default=200, help="untimed requests per path first")
    p.add_argument("--path", default=PATH)
    a = p.parse_args(argv)
    result = measure(a.gateway, a.direct, read_token(a.token_file), a.ca, a.n, a.warmup, a.path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
