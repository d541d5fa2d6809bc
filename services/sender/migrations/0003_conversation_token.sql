-- The conversation's signed token (from conversation.message_added), carried in our Message-IDs
-- and Reply-To addresses so answers that lost their References still find the conversation.
ALTER TABLE thread_messages ADD COLUMN token text;
