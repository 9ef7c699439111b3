-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- Units available per product, from the inventory's `stock.changed` events (the latest by
-- position wins), so product lists show availability without a call per product.
CREATE TABLE availability (
    product_id TEXT PRIMARY KEY,
    available  BIGINT NOT NULL,
    position   BIGINT NOT NULL
);
