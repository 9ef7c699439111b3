-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- A category sorted by price is a keyset walk like the others (issue 9: every list query
-- stays an index range, whatever the size of the catalogue).
CREATE INDEX products_by_category_price ON products (category, price, id);
