-- Schema version 6 of mistry's cluster database: fencing, backoff and the outage grace
-- (issue 22; src/cluster/jobs/).
--
-- `attempt` is the fencing token of a job's runs: every claim (and an insert that runs the job
-- at once) increments it, and every write that ends or publishes a run carries the attempt it
-- ran as (`... WHERE attempt = $n`): a run whose record moved on (its agent was taken for
-- dead and the job ran again) is refused, and its build is discarded where it ran.
--
-- `not_before` delays the claim of a job put back in the queue after it lost its agent
-- (a backoff that grows with its retries); NULL: claimable at once.
ALTER TABLE jobs
    ADD COLUMN attempt    integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    ADD COLUMN not_before timestamptz;
