CREATE TABLE effects (
    event_id text NOT NULL,
    handled_by text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
