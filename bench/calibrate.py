"""The machine's speed now, by the yardstick the issues' targets were set with.

``../shared/NOTES.md`` measured a bare aiosmtpd server and aiosmtplib client in one process, 20
persistent connections, tiny messages: about 1,900 messages/s on this kind of machine. The same
loop, run here before the benchmarks, says how fast the machine is today (a shared VM's speed
varies by day), so a report's figures can be read against the targets in proportion.
"""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

REFERENCE_MSG_S = 1900  # NOTES.md, "Measured limits here"
MESSAGE = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: hi\r\n\r\nhello\r\n"


class _Accept:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def _bare_smtp(count: int, conns: int) -> float:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(_Accept()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def worker(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        for _ in range(n):
            await client.sendmail("a@b.test", ["c@d.test"], MESSAGE)
        await client.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(count // conns) for _ in range(conns)))
    rate = (count // conns) * conns / (time.perf_counter() - t0)
    server.close()
    await server.wait_closed()
    return rate


def measure(count: int = 4000, conns: int = 20) -> dict[str, float]:
    """Bare SMTP messages/s now (asyncio's loop, as NOTES measured, and uvloop's) and the
    ratio to the reference: 0.5 means the machine runs at half the speed the targets assumed."""
    plain = asyncio.run(_bare_smtp(count, conns))
    fast = uvloop.run(_bare_smtp(count, conns))
    return {
        "bare_smtp_msg_s": round(plain),
        "bare_smtp_msg_s_uvloop": round(fast),
        "reference_msg_s": REFERENCE_MSG_S,
        "speed_vs_reference": round(plain / REFERENCE_MSG_S, 2),
    }


if __name__ == "__main__":
    print(measure())
