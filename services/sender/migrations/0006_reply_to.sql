-- The Reply-To of each message in our view of a thread: a reply goes there rather than to the
-- From (RFC 5322 3.6.2), as the customer's own mail client would.
ALTER TABLE thread_messages ADD COLUMN reply_to jsonb NOT NULL DEFAULT '[]';
