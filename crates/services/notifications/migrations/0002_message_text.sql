-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- Each message's RFC 5322 text, kept with its record (readable through the admin API); `file`
-- now says where else it went: a `.eml` path, `smtp:<Message-ID>`, or '' (only here).
ALTER TABLE notifications ADD COLUMN message TEXT;
