-- The store's first schema: every raw order fill and every signal, keyed by their deterministic ids
-- so that a replayed stream entry is absorbed by ON CONFLICT DO NOTHING.

CREATE TABLE orders (
    order_key          text PRIMARY KEY,
    -- `user` in the Dome payload; renamed because USER is a reserved word in SQL.
    wallet             text             NOT NULL,
    token_id           text             NOT NULL,
    token_label        text             NOT NULL DEFAULT '',
    side               text             NOT NULL CHECK (side IN ('BUY', 'SELL')),
    market_slug        text             NOT NULL DEFAULT '',
    condition_id       text             NOT NULL DEFAULT '',
    title              text             NOT NULL DEFAULT '',
    -- Raw on-chain units (6 decimals); numeric because it can exceed what a double holds exactly.
    shares             numeric,
    shares_normalized  double precision NOT NULL,
    price              double precision NOT NULL,
    notional_usd       double precision NOT NULL,
    tx_hash            text             NOT NULL,
    order_hash         text,
    taker              text,
    block_number       bigint,
    log_index          integer,
    exchange_ts        timestamptz      NOT NULL,
    received_at        timestamptz      NOT NULL,
    source             text             NOT NULL,
    v                  smallint         NOT NULL,
    stored_at          timestamptz      NOT NULL DEFAULT now(),
    -- The entry as it arrived, unknown fields included, so nothing a newer producer sends is lost.
    payload            jsonb            NOT NULL
);

CREATE INDEX orders_wallet_time ON orders (wallet, exchange_ts DESC);
CREATE INDEX orders_market_time ON orders (market_slug, exchange_ts DESC);
CREATE INDEX orders_condition_time ON orders (condition_id, exchange_ts DESC);
CREATE INDEX orders_time ON orders (exchange_ts DESC);

CREATE TABLE signals (
    signal_id     text PRIMARY KEY,
    kind          text             NOT NULL,
    wallet        text             NOT NULL,
    wallet_label  text             NOT NULL DEFAULT '',
    market_slug   text             NOT NULL DEFAULT '',
    title         text             NOT NULL DEFAULT '',
    condition_id  text             NOT NULL DEFAULT '',
    token_id      text             NOT NULL,
    token_label   text             NOT NULL DEFAULT '',
    side          text             NOT NULL CHECK (side IN ('BUY', 'SELL')),
    price         double precision NOT NULL,
    shares        double precision NOT NULL,
    notional_usd  double precision NOT NULL,
    confidence    double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    reasons       text[]           NOT NULL DEFAULT '{}',
    order_keys    text[]           NOT NULL DEFAULT '{}',
    source        text             NOT NULL,
    exchange_ts   timestamptz      NOT NULL,
    received_at   timestamptz      NOT NULL,
    detected_at   timestamptz      NOT NULL,
    -- Id of the entry in the `signals` stream the first time it was stored (a replay keeps the first).
    stream_id     text             NOT NULL,
    v             smallint         NOT NULL,
    stored_at     timestamptz      NOT NULL DEFAULT now(),
    payload       jsonb            NOT NULL
);

CREATE INDEX signals_wallet_time ON signals (wallet, detected_at DESC);
CREATE INDEX signals_market_time ON signals (market_slug, detected_at DESC);
CREATE INDEX signals_kind_time ON signals (kind, detected_at DESC);
CREATE INDEX signals_time ON signals (detected_at DESC);
-- Lets a reader find the signals caused by one order.
CREATE INDEX signals_order_keys ON signals USING gin (order_keys);
