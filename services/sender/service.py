"""Sender: turns ``mail.send`` commands into signed MIME and delivers them through the relay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libs.common import tls
from libs.common.service import Service
from services.sender.delivery import Delivery
from services.sender.settings import SenderSettings
from services.sender.stream import handlers


class SenderService(Service):
    name = "sender"
    settings_cls = SenderSettings
    migrations = Path(__file__).parent / "migrations"
    settings: SenderSettings

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        # Loads the DKIM keys: a key that cannot be used stops the service here, not at send time.
        self.delivery = Delivery(self, tls.client_context(settings.tls_ca))

    async def on_start(self) -> None:
        on_mailbox, on_added, on_send = handlers(self)
        self.consumer(["mailbox.changed"], on_mailbox, group="sender-mailboxes")
        self.consumer(["conversation.message_added"], on_added, group="sender-threads")
        self.consumer(["mail.send"], on_send, group="sender")
        self.background.append(self.delivery.run)

    async def before_stop(self) -> None:
        # Attempts in flight record their outcome before the outbox relay drains and stops.
        await self.delivery.drain(self.settings.shutdown_grace_s)

    async def on_stop(self) -> None:
        await self.delivery.close()
