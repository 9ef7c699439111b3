-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- Money is integer minor units; times are microseconds since the Unix epoch (UTC).
--
-- status: what the customer sees. 'pending' while stock is being reserved; 'rejected' orders
-- (stock or product unavailable) were never placed and are hidden from the customer.
-- step:   the saga step in flight ('idle' when none). Written before each downstream call and
-- cleared after it, so a restarted process knows exactly what to finish.
CREATE TABLE orders (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN
                   ('pending', 'awaiting_payment', 'paid', 'cancelled', 'expired', 'rejected')),
    step       TEXT NOT NULL CHECK (step IN
                   ('idle', 'reserving', 'charging', 'committing', 'cancelling', 'expiring')),
    total      BIGINT NOT NULL CHECK (total >= 0),
    currency   TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    payment_id TEXT,
    card_last4 TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX orders_by_user ON orders (user_id, id);
CREATE INDEX orders_by_step ON orders (step, updated_at);
CREATE INDEX orders_by_expiry ON orders (status, expires_at);

-- Prices as the catalog quoted them when the order was placed.
CREATE TABLE order_lines (
    order_id   TEXT NOT NULL REFERENCES orders (id),
    position   BIGINT NOT NULL,
    product_id TEXT NOT NULL,
    sku        TEXT NOT NULL,
    name       TEXT NOT NULL,
    unit_price BIGINT NOT NULL CHECK (unit_price >= 0),
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, position)
);

-- One per (customer, Idempotency-Key). `response_status` is null while the first request runs.
CREATE TABLE idempotency_keys (
    user_id         TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    order_id        TEXT NOT NULL,
    response_status BIGINT,
    response_body   TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
