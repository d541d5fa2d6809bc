-- Each mailbox's count of committed placement transactions, bumped under its placement lock.
-- A batch reads ahead of its turn, without the lock (placement.prefetch), and notes the count
-- its snapshot saw; under the lock the bump tells whether anything was placed since (the read
-- stands), or only the batch before it of the same process (whose effects it holds), or more
-- (it reads again).
CREATE TABLE placement_seq (
    mailbox_id text PRIMARY KEY,
    seq bigint NOT NULL
);
