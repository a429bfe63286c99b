"""The store: `orders.raw` and `signals` -> Postgres, exactly once in effect.

Group `store` reads both streams in batches (`STORE_BATCH_MAX` entries, `STORE_BLOCK_MS` block),
validates every entry against the shared contract (`OrderFill`, `Signal`), writes the valid ones in
one transaction keyed on their deterministic ids (`order_key`, `signal_id`), dead-letters the rest
(`orders.dead` / `signals.dead`, with the reason), and only then XACKs the batch. A crash at any
point replays entries; the keys absorb the replay. An entry for a stored key changes the row's
status (`pending`, `confirmed`, `retracted`) when it is newer in the stream than every entry
applied to the row, so a redelivered old entry never undoes a newer status.

Postgres outages: the batch in hand is retried with exponential backoff (`STORE_RETRY_MIN_S`
doubling to `STORE_RETRY_MAX_S`), never acked meanwhile and never dropped; /health is 503 with the
last error class until Postgres answers again, then the backlog in the stream is worked off.
Entries left pending by a consumer that died are taken over after `STORE_CLAIM_IDLE_MS`.

The same process serves the history API and the tracked wallets over HTTP (`api*.py`; OpenAPI at
/docs) on the ops port, next to /health and /metrics. See docs/store.md.

Modules, top-down:
- `main.py`: wiring, startup order, graceful stop, /health; one consumer group per stream
  (`shared/consumer.py`: reads, acks, reclaims, dead-letters, drains) with `batches.py` as handler.
- `settings.py`: every setting with its env name and default.
- `batches.py`: one batch: validate, write, dead-letter; the caller acks after it.
- `rows.py`: pure: entries -> typed rows for `orders` and `signals`.
- `database.py`: the write (COPY + INSERT ... ON CONFLICT DO UPDATE of the status, chosen by
  measurement), row-by-row fallback for bad rows, retry and pool rebuild on outages.
- `schema.py` + `migrations/NNN_*.sql`: versioned schema under an advisory lock.
- `api.py`: the FastAPI app: `create_app` wires the routers, the token guards (auth lives here),
  the error handlers and the middlewares; the names `main.py` and the tests import.
  - `api_context.py`: `ApiContext` (what endpoints get) and the errors routers declare.
  - `api_history.py`: `GET /signals`, `GET /orders`: filters, JSON pages, CSV pages.
  - `api_export.py`: streamed CSV exports (`Exports`: how many at once, for how long).
  - `api_wallets.py`: `GET`, `PUT`, `DELETE /wallets`.
  - `api_inputs.py`: input types: times, addresses, printable text.
  - `api_middleware.py`: body limit (413), Host check (400), request metrics.
- `queries.py`: pure: filters -> SQL, keyset cursors, rows -> JSON/CSV.
- `wallets.py`: tracked wallets in Postgres and the shared registry, kept in step.
- `metrics.py`: `betterbot_store_*` Prometheus metrics.

Run: `python -m services.store` (port 8081: the API, /docs, /health, /metrics).
"""
