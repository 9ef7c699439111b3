-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- Who the customers are, from `user.registered` events (event-carried state).
CREATE TABLE customers (
    user_id TEXT PRIMARY KEY,
    email   TEXT NOT NULL,
    name    TEXT NOT NULL
);

-- One row per message sent: the event it answers is the key, so there is never a second.
CREATE TABLE notifications (
    event_id   TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    subject    TEXT NOT NULL,
    file       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX notifications_newest ON notifications (created_at);
