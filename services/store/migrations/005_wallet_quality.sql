-- Wallet quality from real history: one row per wallet, rewritten by the store's refresher
-- (services/store/wallet_quality_refresh.py; the definitions are in services/store/wallet_quality.py
-- and docs/store.md, "Wallet quality"). Kept for untracked wallets too (a tombstone keeps its row),
-- so tracking a wallet again shows its last figures until the next refresh.
--
-- `win_rate` is not stored: wins / (wins + losses) is served from the two counts.
-- `error`: why the last refresh of this wallet failed (the figures are then those of the last
-- refresh that worked; `refreshed_at` says when that was). Empty when it worked.
-- A new table only: nothing existing is rewritten, and a store of the previous version ignores it.

CREATE TABLE wallet_quality (
    address         text PRIMARY KEY,
    realised_pnl    double precision NOT NULL DEFAULT 0,
    unrealised_pnl  double precision NOT NULL DEFAULT 0,
    wins            integer NOT NULL DEFAULT 0,
    losses          integer NOT NULL DEFAULT 0,
    markets_traded  integer NOT NULL DEFAULT 0,
    trades          integer NOT NULL DEFAULT 0,
    volume_usd      double precision NOT NULL DEFAULT 0,
    market_maker    boolean NOT NULL DEFAULT false,
    bot             boolean NOT NULL DEFAULT false,
    score           double precision CHECK (score BETWEEN 0 AND 1),
    refreshed_at    timestamptz,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    error           text NOT NULL DEFAULT ''
);
