-- Purging keys past their retention finds them by age, a batch at a time, instead of
-- scanning every key (crates/services/orders/src/store.rs, purge_keys).
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
