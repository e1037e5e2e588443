-- Schema version 3 of mistry's cluster database: central job logs (src/cluster/logs.rs).
--
-- While a job runs on an agent, that agent ships its `out.log` and `stderr.log` here in chunks
-- (every 200 ms, at most 64 KiB each), keyed by the byte offset of the chunk's first byte in
-- its file: a retried insert never duplicates (`ON CONFLICT DO NOTHING`), and a reader
-- resumes at any offset. The last chunk is shipped before the job's record says `ready` or
-- `failed`. A new run of the job (a rebuild, a retry on another agent) first deletes the
-- previous run's chunks.
--
-- Every chunk is announced on the channel `mistry_logs` (payload `<project>/<id> <stream>
-- <pos> <length>`, never the data: NOTIFY payloads are limited to 8000 bytes), and so are a
-- run's start (`<project>/<id> start <run>`) and the end of its log (`<project>/<id> end`).
--
-- `log_retention` deletes the chunks of jobs that ended longer ago than it (and the records).
CREATE TABLE job_logs (
    project text        NOT NULL,
    id      text        NOT NULL,
    -- 'out' (out.log: image build output + job stdout and stderr) or 'stderr' (stderr.log).
    stream  text        NOT NULL CHECK (stream IN ('out', 'stderr')),
    -- The offset of data's first byte in the file.
    pos     bigint      NOT NULL CHECK (pos >= 0),
    data    bytea       NOT NULL,
    -- The agent that shipped it, and its run of the job (`<agent>-<nanoseconds>`): a follower
    -- that finds chunks of another run starts the log again.
    agent   text        NOT NULL,
    run     text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, id, stream, pos)
);

-- Retention: the oldest chunks first.
CREATE INDEX job_logs_at ON job_logs (at);
