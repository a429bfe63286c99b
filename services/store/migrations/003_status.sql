-- A fill's and a signal's status (docs/streams.md, "Status"): a status change is a new stream entry
-- with the same key, applied to the stored row (services/store/database.py).
--
-- `status_ms`/`status_seq`: the id of the entry that set the status. `newest_ms`/`newest_seq`: the
-- newest entry applied to the row; an entry older than it changes nothing, so a redelivered old
-- entry never undoes a newer status. 0-0 (no Redis id is that low) marks rows stored before
-- statuses existed: every one of them is confirmed, and any entry is newer.
--
-- Constant defaults: adding these columns rewrites no row, and replicas of the previous version
-- keep inserting (their rows get the defaults).

ALTER TABLE orders
    ADD COLUMN status         text   NOT NULL DEFAULT 'confirmed',
    ADD COLUMN status_reason  text   NOT NULL DEFAULT '',
    ADD COLUMN status_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN status_seq     bigint NOT NULL DEFAULT 0,
    ADD COLUMN newest_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN newest_seq     bigint NOT NULL DEFAULT 0;

ALTER TABLE signals
    ADD COLUMN status         text   NOT NULL DEFAULT 'confirmed',
    ADD COLUMN status_reason  text   NOT NULL DEFAULT '',
    ADD COLUMN status_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN status_seq     bigint NOT NULL DEFAULT 0,
    ADD COLUMN newest_ms      bigint NOT NULL DEFAULT 0,
    ADD COLUMN newest_seq     bigint NOT NULL DEFAULT 0;

-- NOT VALID: every existing row holds the default, which passes, so there is no need to scan the
-- table under the exclusive lock of this migration; new and updated rows are checked all the same.
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('pending', 'confirmed', 'retracted')) NOT VALID;
ALTER TABLE signals ADD CONSTRAINT signals_status_check
    CHECK (status IN ('pending', 'confirmed', 'retracted')) NOT VALID;

-- The listings filtered to what is not confirmed (`status=retracted`, `status=pending`): few rows,
-- which the keyset indexes would have to skip through every confirmed one to find.
CREATE INDEX orders_unconfirmed_time ON orders (exchange_ts DESC, order_key DESC)
    WHERE status <> 'confirmed';
CREATE INDEX signals_unconfirmed_time ON signals (detected_at DESC, signal_id DESC)
    WHERE status <> 'confirmed';
