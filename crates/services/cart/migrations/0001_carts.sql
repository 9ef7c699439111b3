-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- One cart per customer: its lines. Prices are never stored here; they are read from the
-- catalog each time the cart is shown.
CREATE TABLE cart_lines (
    user_id    TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    added_at   BIGINT NOT NULL,
    PRIMARY KEY (user_id, product_id)
);
