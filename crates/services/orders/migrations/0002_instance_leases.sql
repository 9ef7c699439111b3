-- Portable SQL. Which process runs each saga step and each first request of an idempotency key
-- (`owner`), and whether that process is alive: every orders process renews its row's lease
-- every second; one whose lease has run out is dead, and what it owned is taken over at once
-- (a saga step resumed, a key's retry served), while what a live process owns is never touched.
-- Rows written before this (owner null) fall back to the age rules.
CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    lease_until BIGINT NOT NULL
);

ALTER TABLE orders ADD COLUMN owner TEXT;
ALTER TABLE idempotency_keys ADD COLUMN owner TEXT;
