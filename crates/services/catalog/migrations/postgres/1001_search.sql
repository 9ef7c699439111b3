-- PostgreSQL only (the portable migrations are in the folder above). Search text is matched as
-- a case-insensitive substring (`lower(name) LIKE '%text%'`); pg_trgm's GIN indexes answer
-- such patterns of three characters or more from the index instead of a scan (issue 9).
-- pg_trgm ships with PostgreSQL (contrib) and is a trusted extension: a database owner may
-- create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX products_name_trigrams ON products USING gin (lower(name) gin_trgm_ops);
CREATE INDEX products_description_trigrams ON products USING gin (lower(description) gin_trgm_ops);
