-- The large values of a send -- the command (its html), the signed message and what was sent
-- (text and html), and the events that carry a sent message -- are compressed with lz4 rather
-- than pglz: several times cheaper to compress and to read back, for about the same size (each
-- is written once and read once or twice). Values already stored keep their pglz form.
ALTER TABLE sends
    ALTER COLUMN command SET COMPRESSION lz4,
    ALTER COLUMN mime SET COMPRESSION lz4,
    ALTER COLUMN sent_message SET COMPRESSION lz4;
ALTER TABLE outbox ALTER COLUMN envelope SET COMPRESSION lz4;
