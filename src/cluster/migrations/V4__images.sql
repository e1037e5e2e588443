-- Schema version 4 of mistry's cluster database: which agents have a project's image
-- (placement, src/cluster/jobs.rs).
--
-- An agent upserts (agent, project) when it records the end of a job of the project that ran
-- in its container (no `ErrBuild`): its engine built or found the project's image for it, so
-- the image is cached there. A new job without a group's last build to follow prefers an alive
-- agent with free capacity that has the project's image, else the least loaded one.
CREATE TABLE agent_images (
    agent    text        NOT NULL,
    project  text        NOT NULL,
    -- The end of the last job of the project that ran on the agent.
    built_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, project)
);

-- Placement: the agents having a project's image.
CREATE INDEX agent_images_project ON agent_images (project);
