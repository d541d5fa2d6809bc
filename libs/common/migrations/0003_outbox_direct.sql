-- Rows whose writer XADDs them itself once committed (libs.common.outbox.stage): the relay
-- leaves them to it, and publishes them only once they are older than its grace.
ALTER TABLE outbox ADD COLUMN direct boolean NOT NULL DEFAULT false;
