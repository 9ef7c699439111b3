-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- ids are hyphenated UUID text; money is integer minor units; times are microseconds (UTC).
CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    sku         TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    price       BIGINT NOT NULL CHECK (price >= 0),
    currency    TEXT NOT NULL,
    category    TEXT NOT NULL,
    image_url   TEXT,
    active      BIGINT NOT NULL CHECK (active IN (0, 1)),  -- 0/1: sqlx Any cannot decode SQLite booleans
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    -- Deleted products stay, so past orders keep naming them; they are hidden everywhere else.
    deleted_at  BIGINT
);

CREATE INDEX products_by_category_name ON products (category, name, id);
CREATE INDEX products_by_name ON products (name, id);
CREATE INDEX products_by_price ON products (price, id);
