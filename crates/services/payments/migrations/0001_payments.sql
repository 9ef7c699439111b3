-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- A card number is never stored: only its last four digits and brand.

-- At most one capture per order: the primary key is the idempotency guarantee.
CREATE TABLE payments (
    order_id    TEXT PRIMARY KEY,
    payment_id  TEXT NOT NULL UNIQUE,
    amount      BIGINT NOT NULL CHECK (amount > 0),
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('captured', 'refunded')),
    card_last4  TEXT NOT NULL,
    card_brand  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    refunded_at BIGINT
);

-- Every attempt, declined ones included, for support and fraud checks.
CREATE TABLE payment_attempts (
    id         TEXT PRIMARY KEY,
    order_id   TEXT NOT NULL,
    amount     BIGINT NOT NULL,
    currency   TEXT NOT NULL,
    card_last4 TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX payment_attempts_by_order ON payment_attempts (order_id, created_at);
