-- Schema version 2 of mistry's cluster database: the job records ("one job, one run,
-- cluster-wide", src/cluster/jobs.rs).
--
-- One row per job, keyed by (project, id): the job ID is the hash mistry computes from the
-- project's files, its group and params, so two agents asked for the same job compute the same
-- key and the primary key decides which one inserts it (`INSERT ... ON CONFLICT DO NOTHING`).
--
-- Life of a row: `queued` (inserted by the agent that took the request, or put back by the
-- sweeper when the agent running it stopped heartbeating, retries + 1) -> `running` (claimed by
-- an agent with free capacity: `SELECT ... FOR UPDATE SKIP LOCKED`, `agent` = it) -> `ready`
-- (succeeded) or `failed` (ran and failed), with the BuildInfo. The agent's on-disk move to
-- ready/ happens before the row says ready or failed. A request for a failed job, or for a
-- ready job whose agent is gone, or with `rebuild`, queues the row again.
--
-- Every change a waiter cares about is announced on the channel `mistry_jobs` (pg_notify, sent
-- at commit): `queued` when there is work to claim, `ended <project>/<id>` when a job ended.
CREATE TABLE jobs (
    project         text        NOT NULL,
    id              text        NOT NULL,
    -- The job's group ('' when none): placement keeps a group on one agent.
    group_name      text        NOT NULL DEFAULT '',
    state           text        NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'ready', 'failed')),
    -- The agent that runs or ran it (NULL while queued).
    agent           text,
    -- The JobRequest (project, group, params, inputs, rebuild).
    request         jsonb       NOT NULL,
    -- The BuildInfo, once ended (as the agent that ran it wrote it, without the logs).
    build_info      jsonb,
    -- Times it was put back in the queue because its agent stopped heartbeating.
    retries         integer     NOT NULL DEFAULT 0 CHECK (retries >= 0),
    -- The agent that last ran it when it was re-queued.
    retried_from    text,
    -- The agent holding the group's last successful build when it was queued: others leave the
    -- job alone for a short grace unless that agent is dead or full.
    preferred_agent text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    ended_at        timestamptz,
    PRIMARY KEY (project, id)
);

-- Claims: the oldest queued jobs first.
CREATE INDEX jobs_queued ON jobs (queued_at) WHERE state = 'queued';
-- The sweeper and the start-up pass: the jobs an agent runs.
CREATE INDEX jobs_running ON jobs (agent) WHERE state = 'running';
-- Placement: a group's last successful build.
CREATE INDEX jobs_group_ready ON jobs (project, group_name, ended_at DESC) WHERE state = 'ready';
