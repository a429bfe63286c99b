-- The tracked wallets, and the indexes of the history API.

-- One row per wallet ever tracked. A wallet that is no longer tracked keeps its row with
-- `removed_at` set (a tombstone), so an older change replayed from the control stream cannot bring
-- it back. `control_ms`/`control_seq` is the id of the last `wallets.control` entry applied to the
-- row (NULL when the row was seeded without one): changes older than it are ignored.
CREATE TABLE tracked_wallets (
    address      text PRIMARY KEY CHECK (address ~ '^0x[0-9a-f]{40}$'),
    label        text             NOT NULL DEFAULT '',
    score        double precision CHECK (score BETWEEN 0 AND 1),
    added_at     timestamptz      NOT NULL DEFAULT now(),
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    removed_at   timestamptz,
    control_ms   bigint,
    control_seq  bigint
);

-- The API pages by keyset on (time, key), newest first: each index ends with both so that a page
-- is one index range scan whatever the filter. The tie-breaker key replaces the indexes of 001
-- (same names) that ordered by time alone.
DROP INDEX signals_wallet_time;
DROP INDEX signals_market_time;
DROP INDEX signals_kind_time;
DROP INDEX signals_time;
CREATE INDEX signals_time ON signals (detected_at DESC, signal_id DESC);
CREATE INDEX signals_wallet_time ON signals (wallet, detected_at DESC, signal_id DESC);
CREATE INDEX signals_market_time ON signals (market_slug, detected_at DESC, signal_id DESC);
CREATE INDEX signals_condition_time ON signals (condition_id, detected_at DESC, signal_id DESC);
CREATE INDEX signals_token_time ON signals (token_id, detected_at DESC, signal_id DESC);
CREATE INDEX signals_kind_time ON signals (kind, detected_at DESC, signal_id DESC);

DROP INDEX orders_wallet_time;
DROP INDEX orders_market_time;
DROP INDEX orders_condition_time;
DROP INDEX orders_time;
CREATE INDEX orders_time ON orders (exchange_ts DESC, order_key DESC);
CREATE INDEX orders_wallet_time ON orders (wallet, exchange_ts DESC, order_key DESC);
CREATE INDEX orders_market_time ON orders (market_slug, exchange_ts DESC, order_key DESC);
CREATE INDEX orders_condition_time ON orders (condition_id, exchange_ts DESC, order_key DESC);
CREATE INDEX orders_token_time ON orders (token_id, exchange_ts DESC, order_key DESC);
