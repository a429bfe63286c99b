"""`betterbot`: the operator's command-line tool (`python -m cli`, or the `betterbot` script).

    betterbot signals tail [--kind K] [--wallet 0x..] [--min-confidence X] [--from ID] [--json]
    betterbot wallets list | add 0x.. [--label L] [--score S] | remove 0x..
    betterbot lag [--consumers] [--json]
    betterbot dead list orders.dead | dead replay orders.dead (--id ID ... | --all)
    betterbot replay-tape data/polymarket_trades_nobel2025.json

It talks to Redis (REDIS_URL, STREAM_NAMESPACE) and, for the wallet commands, to Postgres
(DATABASE_URL), with the same settings as the services. Modules: `main` (arguments and wiring),
`settings`, one module per command group (`signals`, `wallets`, `lag`, `dead`, `tape`), and
`docs_gen` (the AsyncAPI contract, `make docs`).
"""
