-- The transactional outbox (shopmesh-events). Portable: SQLite and PostgreSQL.
-- A row is written in the transaction of the change it reports; `position`, what consumers read
-- by, follows the order rows became visible: on SQLite it is set by the INSERT (write
-- transactions commit in the order they run), on PostgreSQL once the row is committed.
CREATE TABLE IF NOT EXISTS outbox (
    id           TEXT PRIMARY KEY,
    position     BIGINT UNIQUE,
    type         TEXT NOT NULL,
    version      BIGINT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    aggregate_id TEXT NOT NULL,
    trace_id     TEXT,
    payload      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_unpositioned ON outbox (id) WHERE position IS NULL;
-- How far the RabbitMQ relay has published (only advanced after the broker confirmed).
CREATE TABLE IF NOT EXISTS outbox_relay (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
-- Who reads the stream over the embedded transport, how far they have acknowledged (the
-- position they asked to read after) and when they last asked: what retention may prune.
CREATE TABLE IF NOT EXISTS outbox_readers (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    seen_at  BIGINT NOT NULL
);
