"""The chaos suite: the real services as processes, real Redis and Postgres, a known tape, faults.

`python -m chaos` (or `make chaos`) replays the bundled tape through the whole pipeline once without
faults and once per fault, then with every fault together, and compares what was stored and
delivered with the simulator's ground truth. `chaos/results/latest.json` keeps the last run's table;
docs/chaos.md explains each column. The short run inside `make test` is `tests/test_chaos_quick.py`.

Modules, read top-down: `main` (command line, the run), `scenario` (one run of the tape with its
faults), `faults` (the injectors), `pipeline` (the processes of one scenario and their wiring),
`truth` (what should have come out), `report` (the table and the JSON), and the instruments:
`processes`, `redis_server` (a throwaway append-only Redis), `failover` (a Redis Cluster failover
that loses acknowledged writes, on devtools/cluster.py), `proxy` (a TCP proxy that cuts
Postgres), `receiver` (a webhook endpoint), `subscriber` (a resuming WebSocket client). `garbage`
holds the hypothesis strategies of bad input that the fuzzing tests (`tests/test_chaos_fuzz_*`)
throw at the parser and at the running services.
"""
