-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- Units are integers; times are microseconds since the Unix epoch (UTC).
--
-- on_hand:  units in the warehouse (reserved ones included, sold ones not).
-- reserved: units held for unpaid orders.           available = on_hand - reserved >= 0
-- added / removed / sold: running totals, so that   added - removed = available + reserved + sold
-- can be checked at any quiet moment.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    on_hand    BIGINT NOT NULL CHECK (on_hand >= 0),
    reserved   BIGINT NOT NULL CHECK (reserved >= 0),
    added      BIGINT NOT NULL CHECK (added >= 0),
    removed    BIGINT NOT NULL CHECK (removed >= 0),
    sold       BIGINT NOT NULL CHECK (sold >= 0),
    updated_at BIGINT NOT NULL,
    -- The last line of defence against overselling: the database refuses it.
    CHECK (reserved <= on_hand)
);

-- One per order id: 'held' (stock reserved), 'committed' (sold), 'released' (given back, or a
-- tombstone for an order released before it ever reserved).
CREATE TABLE reservations (
    order_id   TEXT PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released')),
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX reservations_held_by_expiry ON reservations (state, expires_at);

CREATE TABLE reservation_lines (
    order_id   TEXT NOT NULL REFERENCES reservations (order_id),
    product_id TEXT NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
