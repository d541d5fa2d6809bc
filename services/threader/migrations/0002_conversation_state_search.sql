-- Conversation state (assignee), full-text search, and the activity history behind stable cursors.
--
-- Search: `unaccent` cannot be created by the service role (a trusted extension still needs
-- CREATE on the database, which the role does not have), so accents are folded in Python
-- (services.threader.storage.fold) before text reaches to_tsvector / the query functions.
-- `search` holds stripped lexemes ('simple' + 'portuguese' + 'english') of the subject, every
-- message's participants and body; the application appends to it as messages arrive.
ALTER TABLE conversations
    ADD COLUMN assignee     text,
    ADD COLUMN search       tsvector NOT NULL DEFAULT ''::tsvector,
    ADD COLUMN activity_seq bigint NOT NULL DEFAULT 0;

CREATE INDEX conversations_search ON conversations USING gin (search);
CREATE INDEX conversations_assignee ON conversations (mailbox_id, assignee) WHERE merged_into IS NULL;
-- Conversations whose list position changed after a walk's snapshot are found by this index.
CREATE INDEX conversations_activity ON conversations (mailbox_id, activity_seq)
    WHERE merged_into IS NULL;

-- Every change of a conversation's list position: `seq` orders changes across the schema, and
-- `last_message_at` is the sort key the conversation had from that change on.  A cursor carries
-- the seq its walk started at, so later pages place each conversation where it was back then.
CREATE SEQUENCE activity_seq;
CREATE TABLE activity (
    seq             bigint PRIMARY KEY,
    id_conversa     uuid NOT NULL REFERENCES conversations (id_conversa),
    last_message_at timestamptz NOT NULL
);
CREATE INDEX activity_conversation ON activity (id_conversa, seq DESC);

-- Existing data: one activity row per live conversation, and its search document.
WITH ordered AS (
    SELECT id_conversa, last_message_at, nextval('activity_seq') AS seq
    FROM (SELECT id_conversa, last_message_at FROM conversations
          ORDER BY last_message_at, id_conversa) o
), ins AS (
    INSERT INTO activity (seq, id_conversa, last_message_at)
    SELECT seq, id_conversa, last_message_at FROM ordered RETURNING seq, id_conversa
)
UPDATE conversations c SET activity_seq = ins.seq FROM ins WHERE ins.id_conversa = c.id_conversa;

-- Existing rows: accents folded with translate() (Latin letters only; new mail goes through
-- Python's NFKD folding, which covers the rest).
UPDATE conversations c SET search = strip(
    to_tsvector('simple', d.doc) || to_tsvector('portuguese', d.doc)
    || to_tsvector('english', d.doc))
FROM (SELECT m.id_conversa,
             translate(lower(left(max(c2.subject) || ' ' || string_agg(
                 left(m.sender::text || ' ' || m.to_addrs::text || ' ' || m.cc_addrs::text
                      || ' ' || m.text_body, 50000), ' '), 100000)),
                       'áàâãäåçéèêëíìîïñóòôõöúùûüýÿ', 'aaaaaaceeeeiiiinooooouuuuyy') AS doc
      FROM messages m JOIN conversations c2 USING (id_conversa) GROUP BY m.id_conversa) d
WHERE d.id_conversa = c.id_conversa;
