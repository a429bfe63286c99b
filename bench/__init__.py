"""`make bench`: how fast BetterBot is on this machine, stage by stage, against its own ceilings.

The benchmark runs the real services as separate processes (`python -m services.<name>`) on real
Redis and Postgres, with the simulator as the feed, and measures:

- `ceilings`: what one Python process gets from Redis and Postgres with no service code at all:
  pipelined XADD, XREADGROUP (COUNT 500) + XACK, asyncpg COPY. Every throughput figure is printed
  as a ratio of the relevant ceiling, since absolute numbers on a shared machine drift.
- `latency`: the simulator sends R orders/s of tracked wallets for a fixed time, with rule settings
  that make every order a signal; a WebSocket subscriber on the notifier records when each signal
  arrives. Joined with the simulator's ground truth (`emitted_at` per trade, by order_key):
  p50/p99/p99.9/max of send -> receipt, and how many orders got their signal.
- `pipeline`: the rate is stepped up until the whole pipeline (ingested, signalled, stored in
  Postgres, delivered) stops keeping up, i.e. some stage's backlog grows.
- `stages`: each stage alone from a pre-filled stream: the ingestor's parse+dedupe+publish, the
  detector with 1, 2 and 4 replicas, the store.
- `memory`: resident memory of every service process, at steady state and at peak.
- `cluster`: the detector stage and the pipeline again, on a private single Redis and on a private
  Redis Cluster (3 masters + 3 replicas) with 1 and 4 partitions: orders/s and CPU per order, the
  Redis CPU node by node, as ratios to the single node.

Modules: `main` (the command line, the run), `environment` (servers, throwaway database, machine
facts), `processes` (service processes, health, memory), `fixtures` (pre-built orders, signals
and frames), `probes` (stream lengths, group lag), `subscriber` (the WebSocket receiver),
`pipeline` (the running pipeline with a restartable feed), `ceilings`, `latency`, `throughput`,
`stages`, `cluster`, `stats`, `report` (table and JSON), `profiling` (py-spy).
"""
