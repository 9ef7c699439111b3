-- Portable SQL: runs unchanged on SQLite and PostgreSQL (see shopmesh-db).
-- ids are hyphenated UUID text; times are microseconds since the Unix epoch (UTC).
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('customer', 'admin')),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- Ed25519 signing keys for access tokens. The oldest key signs; all are published in the JWKS.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    private_key TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
