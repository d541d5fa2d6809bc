-- The assignee and ticket number are part of the state a ``conversation.updated`` frame shows:
-- stored so that an event repeating the state already sent (the threader announces a new
-- message as ``conversation.message_added`` and ``conversation.updated``) sends no second frame.
ALTER TABLE conversations ADD COLUMN assignee text;
ALTER TABLE conversations ADD COLUMN number integer;
