-- The gateway keeps no state of its own yet: this migration exists so the schema (and the shared
-- outbox / processed_events tables that come with every schema) is created like any other.
SELECT 1;
