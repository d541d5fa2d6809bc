-- A bounce (mail.bounced from ingest) names the Message-ID of one of our sent messages: the send
-- is found by it and moves from 'sent' to 'failed' (services/sender/bounces.py).
ALTER TABLE sends ADD COLUMN bounced_at timestamptz;
CREATE INDEX sends_message_id ON sends (message_id) WHERE message_id IS NOT NULL;
