#!/bin/sh
# Several agents on this machine with one command: a throwaway PostgreSQL 15 and three mistryd
# agents (a1, a2, a3 on 127.0.0.1:8462, :8463, :8464) sharing it, with the example projects of
# examples/ (offline, from the busybox base image), as scripts/example.sh runs one.
#
#   scripts/cluster-example.sh           (Ctrl-C stops the agents and PostgreSQL)
#
# Everything lives in target/cluster-example/: pg/ (the database cluster, on 127.0.0.1 and a
# Unix socket there, on a free port, trust authentication for the user `mistry`), a1/ a2/ a3/
# (each agent's config.json, builds/ and mistryd.log). A second run starts from them again:
# jobs, builds and the database are kept; remove the directory to start afresh.
#
# PostgreSQL refuses to run as root: as root, it runs as the user MISTRY_PG_USER (default
# mistry-test, made by scripts/setup.sh), the agents as root. MISTRY_PG_BIN: PostgreSQL's
# binaries (default /usr/lib/postgresql/15/bin, Debian's postgresql-15).
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then scripts/setup.sh; fi
cargo build --release --quiet -p mistry -p mistry-client --bin mistryd --bin mistry

pgbin=${MISTRY_PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$pgbin/initdb" ] || { echo "cluster-example.sh: no PostgreSQL in $pgbin (scripts/setup.sh installs it)" >&2; exit 1; }
dir=$PWD/target/cluster-example
pg=$dir/pg
mkdir -p "$dir"

# PostgreSQL's tools, as the unprivileged user when we are root.
if [ "$(id -u)" = 0 ]; then
    pguser=${MISTRY_PG_USER:-mistry-test}
    id "$pguser" >/dev/null 2>&1 || { echo "cluster-example.sh: no user $pguser (scripts/setup.sh makes it; or set MISTRY_PG_USER)" >&2; exit 1; }
    as_pg() { runuser -u "$pguser" -- "$@"; }
else
    as_pg() { "$@"; }
fi

# A TCP port nobody listens on (from 54320 up).
listening() { ss -Hltn "sport = :$1" | grep -q .; }
for port in $(seq 54320 54420); do
    listening "$port" || break
done
for a in 8462 8463 8464; do
    if listening "$a"; then
        echo "cluster-example.sh: port $a is taken (another mistryd? scripts/example.sh?)" >&2
        exit 1
    fi
done

if [ ! -f "$pg/data/PG_VERSION" ]; then
    mkdir -p "$pg"
    [ "$(id -u)" != 0 ] || chown "$pguser:" "$pg"
    echo "initdb in $pg/data"
    as_pg "$pgbin/initdb" -D "$pg/data" -U mistry --auth=trust -E UTF8 --no-locale -N >"$pg/initdb.log" 2>&1 ||
        { cat "$pg/initdb.log" >&2; exit 1; }
fi

pids=""
cleanup() {
    trap - INT TERM EXIT
    echo
    echo "stopping the agents and PostgreSQL (target/cluster-example/ is kept)"
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $pids; do wait "$pid" 2>/dev/null || true; done
    as_pg "$pgbin/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_pg "$pgbin/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $pg" start >/dev/null ||
    { tail -20 "$pg/postgres.log" >&2; exit 1; }
url="postgres://mistry@127.0.0.1:$port/mistry"
if [ "$("$pgbin/psql" -h 127.0.0.1 -p "$port" -U mistry -d postgres -AtX \
        -c "SELECT count(*) FROM pg_database WHERE datname = 'mistry'")" = 0 ]; then
    "$pgbin/createdb" -h 127.0.0.1 -p "$port" -U mistry mistry
fi
echo "PostgreSQL 15 on 127.0.0.1:$port (database_url $url)"

n=0
for a in a1 a2 a3; do
    addr=127.0.0.1:$((8462 + n))
    n=$((n + 1))
    mkdir -p "$dir/$a/builds"
    cat > "$dir/$a/config.json" <<JSON
{
  "projects_path": "$PWD/examples",
  "build_path": "$dir/$a/builds",
  "images_path": "$PWD/target/images",
  "network": "none",
  "database_url": "$url",
  "agent_name": "$a",
  "advertise_url": "http://$addr"
}
JSON
    target/release/mistryd --config "$dir/$a/config.json" --addr "$addr" >"$dir/$a/mistryd.log" 2>&1 &
    pids="$pids $!"
done
for a in a1 a2 a3; do
    i=0
    until grep -q '^mistryd: listening on ' "$dir/$a/mistryd.log"; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then
            echo "cluster-example.sh: agent $a did not start:" >&2
            tail -20 "$dir/$a/mistryd.log" >&2
            exit 1
        fi
        sleep 0.1
    done
done

cat <<EOF
Three agents, one database:
  a1  http://127.0.0.1:8462   log: target/cluster-example/a1/mistryd.log
  a2  http://127.0.0.1:8463   log: target/cluster-example/a2/mistryd.log
  a3  http://127.0.0.1:8464   log: target/cluster-example/a3/mistryd.log

Try, from another terminal:
  curl -X POST -d '{"project": "hello", "params": {"name": "cluster"}}' http://127.0.0.1:8462/jobs
      runs the job once (on a1: it has a free slot), "Cached": false
  curl -X POST -d '{"project": "hello", "params": {"name": "cluster"}}' http://127.0.0.1:8463/jobs
      the same job on a2: "Cached": true, fetched from a1 into a2's builds ("Path")
  curl -so artifacts.tar http://127.0.0.1:8464/artifacts/hello/<id>
      a3 fetches the build from a1 first, then serves its artifacts
  http://127.0.0.1:8462/agents   the agents (alive, running, capacity, last heartbeat)
  http://127.0.0.1:8463/         the jobs, with the agent that ran each one (filter by agent)
  curl -s http://127.0.0.1:8464/metrics | grep mistry_cluster_
  $pgbin/psql -h 127.0.0.1 -p $port -U mistry mistry -c 'SELECT project, id, state, agent FROM jobs'
Ctrl-C stops everything.
EOF
# Until Ctrl-C (or an agent exits).
wait
