"""The dev outbound relay: a catch-all SMTP server (STARTTLS required) writing a Maildir.

``make run`` points the sender here, so replies can be read in ``var/sink`` instead of leaving
the machine. Tests use it as the far end of outbound mail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mailbox
import signal
import sys
from email import message_from_bytes, policy
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from libs.common.settings import ROOT
from libs.common.tls import server_context


class SinkHandler:
    def __init__(self, maildir: Path) -> None:
        maildir.parent.mkdir(parents=True, exist_ok=True)
        self.box = mailbox.Maildir(str(maildir), create=True)
        for sub in ("tmp", "new", "cur"):  # Maildir(create=True) skips them if the folder exists
            (maildir / sub).mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        key = self.box.add(mailbox.MaildirMessage(raw))
        msg = message_from_bytes(raw, policy=policy.default)
        print(
            json.dumps(
                {
                    "service": "smtp-sink",
                    "msg": "received",
                    "key": key,
                    "from": envelope.mail_from,
                    "to": envelope.rcpt_tos,
                    "subject": str(msg.get("subject", "")),
                }
            ),
            flush=True,
        )
        return "250 2.0.0 Ok: stored in sink"


async def serve(host: str, port: int, maildir: Path, cert: Path, key: Path) -> None:
    ctx = server_context(cert, key)
    handler = SinkHandler(maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler, hostname="sink.chatflow.test", tls_context=ctx, require_starttls=True
        ),
        host=host,
        port=port,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"service": "smtp-sink", "msg": f"listening on {host}:{port}"}), flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2526)
    p.add_argument("--maildir", type=Path, default=ROOT / "var/sink")
    p.add_argument("--cert", type=Path, default=ROOT / "var/certs/server.pem")
    p.add_argument("--key", type=Path, default=ROOT / "var/certs/server.key")
    a = p.parse_args(argv)
    try:
        asyncio.run(serve(a.host, a.port, a.maildir, a.cert, a.key))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
