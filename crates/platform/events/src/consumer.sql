-- A consumer's bookkeeping (shopmesh-events). Portable: SQLite and PostgreSQL.
-- How far it has read each producer's stream.
CREATE TABLE IF NOT EXISTS event_cursors (
    producer TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
-- Events whose effect is committed: a redelivery finds its id here and does nothing.
CREATE TABLE IF NOT EXISTS event_inbox (
    event_id   TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    handled_at BIGINT NOT NULL
);
-- Failed attempts of events not yet handled.
CREATE TABLE IF NOT EXISTS event_failures (
    event_id   TEXT PRIMARY KEY,
    attempts   BIGINT NOT NULL,
    last_error TEXT NOT NULL
);
-- Events set aside after too many failures, until redriven.
CREATE TABLE IF NOT EXISTS event_dead_letters (
    event_id TEXT PRIMARY KEY,
    producer TEXT NOT NULL,
    envelope TEXT NOT NULL,
    error    TEXT NOT NULL,
    dead_at  BIGINT NOT NULL
);
