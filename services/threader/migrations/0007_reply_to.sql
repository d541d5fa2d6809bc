-- Where the sender of a message asked replies to go (its Reply-To): a web form mails from
-- noreply@ with the customer in Reply-To, and a reply must reach the customer (RFC 5322 3.6.2).
ALTER TABLE messages ADD COLUMN reply_to jsonb NOT NULL DEFAULT '[]';
