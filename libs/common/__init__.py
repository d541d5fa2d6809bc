"""Mechanisms shared by every ChatFLOW service: settings, events, bus, outbox, storage, ops."""
