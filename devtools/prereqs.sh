#!/usr/bin/env bash
# What `make test` and `make run` need from outside PyPI and npm, installed from Debian's packages.
#
#   devtools/prereqs.sh test   servers + the Compose parser + Chromium (the suite drives both)
#   devtools/prereqs.sh run    servers only
#
# Only the system package manager has these, so the script runs apt-get itself when it can (root,
# apt-get present, APT_INSTALL not "no"); otherwise it prints the one command to run, says why, and
# stops. Playwright drives Debian's Chromium: its own browser download is blocked on many machines.
set -euo pipefail

purpose="${1:-test}"
missing=()
reasons=()

want() {  # want <package> <reason>: queue a Debian package
  missing+=("$1")
  reasons+=("$1: $2")
}

answers() {  # answers <port>: something listens on 127.0.0.1:<port>
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pg_binaries() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

# A server is needed only when neither a URL nor a local one answers (devtools/servers.py order).
if [[ -z "${REDIS_URL:-}" ]] && ! answers 6379 && ! command -v redis-server >/dev/null 2>&1; then
  want redis-server "no Redis answers on 127.0.0.1:6379 and REDIS_URL is unset"
fi
if [[ -z "${DATABASE_URL:-}" ]] && ! answers 5432 && ! pg_binaries; then
  want postgresql "no PostgreSQL answers on 127.0.0.1:5432 and DATABASE_URL is unset"
fi
if [[ "$purpose" == test ]]; then
  # Whatever Redis the tests use, the cluster tests start their own nodes (devtools/cluster.py).
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    [[ " ${missing[*]-} " == *" redis-server "* ]] ||
      want redis-server "tests start a real Redis Cluster from redis-server and redis-cli"
  fi
  command -v docker-compose >/dev/null 2>&1 ||
    want docker-compose "tests/test_compose.py validates docker-compose.yml with a real Compose parser"
  [[ -x /usr/bin/chromium ]] ||
    want chromium "the dashboard tests drive a real browser (Playwright, no browser download)"
fi

[[ ${#missing[@]} -eq 0 ]] && exit 0

printf 'prereqs: missing %s\n' "${reasons[@]}" >&2
if [[ "${APT_INSTALL:-yes}" != no && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "prereqs: apt-get install ${missing[*]} (first time only, about 1-2 minutes)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "prereqs: run 'sudo apt-get install -y ${missing[*]}', then 'make $purpose' again." >&2
if [[ "$purpose" == run ]]; then
  echo "prereqs: or run the pipeline in containers with 'docker compose up' (README, Run it)." >&2
fi
exit 1
