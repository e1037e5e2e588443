-- Schema version 5 of mistry's cluster database: the cluster's job list, newest first
-- (`GET /api/cluster/jobs`, src/cluster/view.rs), read through an index rather than a sort of
-- the whole table. The expression is the one the list orders by.
CREATE INDEX jobs_recent ON jobs ((COALESCE(started_at, queued_at)) DESC, project, id);
