-- The assignee and ticket number are part of the state a ``conversation.updated`` frame shows:
-- stored so that an event repeating the state already sent (a redelivery, a change that
-- changed nothing, the same state announced twice) sends no second frame.
ALTER TABLE conversations ADD COLUMN assignee text;
ALTER TABLE conversations ADD COLUMN number integer;
