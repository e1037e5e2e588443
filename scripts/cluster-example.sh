#!/bin/sh
# Several agents on this machine with one command: a throwaway PostgreSQL 15 and three mistryd
# agents (a1, a2, a3 on 127.0.0.1:8462, :8463, :8464) sharing it, with the example projects of
# examples/ (offline, from the busybox base image), as scripts/example.sh runs one.
#
#   scripts/cluster-example.sh           (Ctrl-C stops the agents and PostgreSQL)
#
# Everything lives in target/cluster-example/: pg/ (the database cluster, on 127.0.0.1 and a
# Unix socket there, on a free port; the user `mistry` logs in with a password (SCRAM-SHA-256),
# made at random on the first run and kept in pg/password, mode 0600), a1/ a2/ a3/ (each agent's
# config.json, builds/ and mistryd.log). The agents get the password in MISTRY_DATABASE_URL, never
# in their config.json, and jobs cannot reach the database (they have no route to the host's
# loopback). A second run starts from them again:
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

# The database password: made once, readable by this user only (and by PostgreSQL's user when
# we are root, which initdb reads it as).
if [ ! -s "$pg/password" ]; then
    mkdir -p "$pg"
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$pg/password.tmp")
    mv "$pg/password.tmp" "$pg/password"
fi
[ "$(id -u)" != 0 ] || chown "$pguser:" "$pg" "$pg/password"
password=$(cat "$pg/password")

if [ ! -f "$pg/data/PG_VERSION" ]; then
    echo "initdb in $pg/data"
    as_pg "$pgbin/initdb" -D "$pg/data" -U mistry --auth=scram-sha-256 --pwfile="$pg/password" \
        -E UTF8 --no-locale -N >"$pg/initdb.log" 2>&1 ||
        { cat "$pg/initdb.log" >&2; exit 1; }
elif grep -Eq '^[[:space:]]*(local|host)[^#]*[[:space:]]trust([[:space:]]|$)' "$pg/data/pg_hba.conf"; then
    # A cluster made by an earlier version of this script, with trust authentication: give the
    # user the password, then ask for it (pg_hba.conf is read again at the start below).
    echo "switching $pg/data from trust to password authentication"
    as_pg "$pgbin/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 30 \
        -o "-c listen_addresses= -p $port -k $pg" start >/dev/null ||
        { tail -20 "$pg/postgres.log" >&2; exit 1; }
    # (printf is the shell's own: the password shows on no command line; it is hex digits.)
    printf "ALTER ROLE mistry PASSWORD '%s';\n" "$password" |
        as_pg "$pgbin/psql" -h "$pg" -p "$port" -U mistry -d postgres -AtqX -v ON_ERROR_STOP=1 ||
        { as_pg "$pgbin/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null; exit 1; }
    as_pg "$pgbin/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null
    as_pg sed -Ei 's/[[:space:]]trust([[:space:]]*)$/ scram-sha-256\1/' "$pg/data/pg_hba.conf"
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
# The password goes to PostgreSQL's tools and to the agents in the environment: it is in no
# configuration file, no command line and no log.
export PGPASSWORD="$password"
export MISTRY_DATABASE_URL="postgres://mistry:$password@127.0.0.1:$port/mistry"
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
  PGPASSWORD=\$(cat target/cluster-example/pg/password) \\
      $pgbin/psql -h 127.0.0.1 -p $port -U mistry mistry -c 'SELECT project, id, state, agent FROM jobs'
Ctrl-C stops everything.
EOF
# Until Ctrl-C (or an agent exits).
wait
