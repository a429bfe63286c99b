-- Does it pay? Each signal's markouts at 5 min, 1 h and 24 h and, once its market has resolved,
-- its settlement: one row per (signal, horizon), written by the store's validator
-- (services/store/validator.py; the definitions are in docs/signals.md, "Does it pay? Validation").
--
-- `price`: the token's price at `target_at` (the last price point at or before it), or for the
-- settlement what a share paid (0, 0.5 or 1); null when no price was found, and then
-- `markout_cents` is null too and the row only records that the horizon was tried.
-- `markout_cents`: what copying the signal made per share, in cents, net of `fee_cents`.
-- A new table only: nothing existing is rewritten, and a store of the previous version ignores it.

CREATE TABLE signal_validation (
    signal_id      text NOT NULL REFERENCES signals (signal_id) ON DELETE CASCADE,
    horizon        text NOT NULL CHECK (horizon IN ('5m', '1h', '24h', 'settlement')),
    target_at      timestamptz,
    price          double precision,
    price_at       timestamptz,
    markout_cents  double precision,
    fee_cents      double precision NOT NULL DEFAULT 0,
    source         text NOT NULL DEFAULT '',
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (signal_id, horizon)
);
