"""The in-process threader fixtures of test_conversations, shared with test_placement."""

from services.threader.tests.test_conversations import env, migrated, signing_key

__all__ = ["env", "migrated", "signing_key"]
