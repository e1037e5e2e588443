-- Schema version 1 of mistry's cluster database: the agents.
--
-- One row per agent name. An agent upserts its row at start (started_at, last_heartbeat = now(),
-- stopped_at = NULL), updates last_heartbeat and running every `heartbeat`, and sets
-- stopped_at (running = 0) when it stops gracefully. Times are the database's clock, so the
-- agents' clocks never have to agree: an agent is alive when stopped_at IS NULL and
-- last_heartbeat is within the reader's agent_timeout of the database's now().
--
-- The job records, claims, placement and central logs come in later versions (V2__...), each
-- in its own file beside this one; a version, once released, is never edited.
CREATE TABLE agents (
    -- `agent_name` (default: the host name).
    name           text        PRIMARY KEY,
    -- `advertise_url`: how other agents and clients reach this agent's HTTP API.
    advertise_url  text        NOT NULL,
    -- `job_concurrency`: jobs it runs at once.
    capacity       integer     NOT NULL CHECK (capacity > 0),
    -- Jobs running on it at its last heartbeat.
    running        integer     NOT NULL DEFAULT 0 CHECK (running >= 0),
    -- mistryd's version (CARGO_PKG_VERSION).
    version        text        NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    -- Set by a graceful shutdown; NULL while it runs.
    stopped_at     timestamptz
);
