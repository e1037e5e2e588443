//! A job's life over the in-memory fake of the jobs interface ([`super::fake`]): coalescing,
//! the result cache, rebuild, retrigger of a failed job, discard, a dead agent's jobs rescued,
//! and the pipeline runner (`crate::pipeline`) over the interface. Milliseconds each, no disk
//! but a temporary configuration.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::fake::{fake_id, FakeHandle, FakeJobs};
use super::{JobError, JobState, Jobs};
use crate::config::Config;
use crate::jobs::JobRequest;
use crate::pipeline::run::{JobRunState, RunState, Runs};

/// A wait with a bound: a job the fake never ends (as a mutant of the state machine leaves it)
/// fails the test instead of hanging it. Far longer than any of these waits takes.
trait Within: std::future::Future + Sized {
    async fn within(self) -> Self::Output {
        match tokio::time::timeout(std::time::Duration::from_secs(10), self).await {
            Ok(out) => out,
            Err(_) => panic!("still waiting after 10s: the job never ended"),
        }
    }
}

impl<F: std::future::Future> Within for F {}

fn config(dir: &Path) -> Config {
    let (projects, build) = (dir.join("projects"), dir.join("build"));
    std::fs::create_dir_all(&projects).unwrap();
    std::fs::create_dir_all(&build).unwrap();
    let text = serde_json::json!({
        "projects_path": projects,
        "build_path": build,
    })
    .to_string();
    Config::parse(&text, &dir.join("config.json")).unwrap()
}

fn fake(dir: &Path, auto: bool) -> Arc<FakeJobs> {
    FakeJobs::new(config(dir), &["app", "lib", "bad"], auto)
}

fn req(project: &str, param: &str) -> JobRequest {
    let mut r = JobRequest {
        project: project.into(),
        ..JobRequest::default()
    };
    r.params.insert("p".into(), param.into());
    r
}

#[tokio::test]
async fn identical_requests_join_one_job_then_hit_the_result_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let first = f.submit_now(req("app", "1")).unwrap();
    let second = f.submit_now(req("app", "1")).unwrap();
    let other = f.submit_now(req("app", "2")).unwrap();
    assert_eq!(first.id, second.id);
    assert_ne!(first.id, other.id);
    assert_eq!((first.cached, second.cached), (Some(false), Some(false)));
    let id = first.id.clone();
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Queued);
    assert_eq!(f.claim("a"), Some(("app".to_string(), id.clone())));
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Running);
    assert!(f.end("a", "app", &id, 0));
    let (a, b) = (
        first.wait().within().await.unwrap(),
        second.wait().within().await.unwrap(),
    );
    assert_eq!((a.info.exit_code, a.info.coalesced), (0, false));
    assert_eq!((b.info.exit_code, b.info.coalesced), (0, true));
    assert_eq!(a.dir.id(), id);
    // Ended: the result cache answers, the job does not run again.
    let third = f.submit_now(req("app", "1")).unwrap();
    assert_eq!(third.cached, Some(true));
    assert!(third.wait().within().await.unwrap().info.cached);
    let rec = f.record("app", &id).unwrap();
    assert_eq!((rec.state, rec.runs), (JobState::Ready, 1));
    // The other request's job is still queued, untouched.
    assert_eq!(f.record("app", &other.id).unwrap().state, JobState::Queued);
}

#[tokio::test]
async fn a_rebuild_runs_an_ended_job_again_and_is_joined_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let s = f.submit_now(req("app", "1")).unwrap();
    let id = s.id.clone();
    f.claim("a");
    f.end("a", "app", &id, 0);
    s.wait().within().await.unwrap();
    let mut rebuild = req("app", "1");
    rebuild.rebuild = true;
    let r = f.submit_now(rebuild).unwrap();
    assert_eq!((r.id.as_str(), r.cached), (id.as_str(), Some(false)));
    let rec = f.record("app", &id).unwrap();
    assert_eq!((rec.state, rec.runs), (JobState::Queued, 2));
    // A plain request meanwhile joins the rebuild, not the old build.
    let joined = f.submit_now(req("app", "1")).unwrap();
    assert_eq!(joined.cached, Some(false));
    f.claim("b");
    assert!(f.end("b", "app", &id, 0));
    assert!(!r.wait().within().await.unwrap().info.cached);
    assert!(joined.wait().within().await.unwrap().info.coalesced);
    assert_eq!(f.record("app", &id).unwrap().agent.as_deref(), Some("b"));
}

#[tokio::test]
async fn a_failed_job_fails_its_waiters_and_runs_again_when_asked_again() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let s = f.submit_now(req("app", "1")).unwrap();
    let id = s.id.clone();
    f.claim("a");
    assert!(f.end("a", "app", &id, 3));
    let a = s.wait().within().await.unwrap();
    assert_eq!(a.info.exit_code, 3);
    assert!(!a.info.succeeded());
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Failed);
    // Retriggered: no result-cache answer for a failure, it runs again.
    let again = f.submit_now(req("app", "1")).unwrap();
    assert_eq!(again.cached, Some(false));
    assert_eq!(f.record("app", &id).unwrap().runs, 2);
    f.claim("a");
    f.end("a", "app", &id, 0);
    assert_eq!(again.wait().within().await.unwrap().info.exit_code, 0);
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Ready);
}

#[tokio::test]
async fn a_discarded_build_is_built_again_and_a_job_in_flight_is_not_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let s = f.submit_now(req("app", "1")).unwrap();
    let id = s.id.clone();
    assert!(!f.discard("app", &id), "queued: not discarded");
    f.claim("a");
    assert!(!f.discard("app", &id), "running: not discarded");
    f.end("a", "app", &id, 0);
    s.wait().within().await.unwrap();
    assert!(f.discard("app", &id));
    assert!(f.record("app", &id).is_none());
    let again = f.submit_now(req("app", "1")).unwrap();
    assert_eq!(again.cached, Some(false));
    let rec = f.record("app", &id).unwrap();
    assert_eq!((rec.state, rec.runs), (JobState::Queued, 1));
}

#[tokio::test]
async fn a_dead_agents_job_is_rescued_run_by_another_and_its_late_end_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let s = f.submit_now(req("app", "1")).unwrap();
    let id = s.id.clone();
    f.claim("a");
    assert_eq!(f.rescue("b"), 0, "agent b runs nothing");
    assert_eq!(f.rescue("a"), 1);
    let rec = f.record("app", &id).unwrap();
    assert_eq!(
        (rec.state, rec.retries, rec.agent),
        (JobState::Queued, 1, None)
    );
    assert_eq!(f.claim("b"), Some(("app".to_string(), id.clone())));
    // Agent a was only slow: its end comes after b took the job; the record is b's.
    assert!(!f.end("a", "app", &id, 7));
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Running);
    assert!(f.end("b", "app", &id, 0));
    let a = s.wait().within().await.unwrap();
    assert_eq!(a.info.exit_code, 0);
    let rec = f.record("app", &id).unwrap();
    assert_eq!(
        (rec.state, rec.agent.as_deref()),
        (JobState::Ready, Some("b"))
    );
    // A second end (a replay) changes nothing.
    assert!(!f.end("b", "app", &id, 1));
    assert_eq!(f.record("app", &id).unwrap().state, JobState::Ready);
}

#[tokio::test]
async fn a_late_end_of_a_rescued_job_not_claimed_again_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let s = f.submit_now(req("app", "1")).unwrap();
    let id = s.id.clone();
    f.claim("a");
    f.rescue("a");
    assert!(f.end("a", "app", &id, 0));
    assert_eq!(s.wait().within().await.unwrap().info.exit_code, 0);
    assert_eq!(f.claim("b"), None, "nothing left to claim");
}

#[tokio::test]
async fn an_unknown_project_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), false);
    let e = f.submit_now(req("nope", "1")).err();
    assert_eq!(e, Some(JobError::UnknownProject("nope".into())));
    assert!(f.submits().is_empty());
}

/// Pipeline `name` defined as `def` in the fake's projects.
fn pipeline(f: &FakeJobs, name: &str, def: serde_json::Value) {
    let dir = f.cfg().projects_path.join("pipelines");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.json")), def.to_string()).unwrap();
    for p in ["app", "lib", "bad"] {
        let d = f.cfg().projects_path.join(p);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("Dockerfile"), "FROM busybox\n").unwrap();
    }
}

#[tokio::test]
async fn a_pipeline_runs_through_the_interface_and_a_failure_skips_its_dependents() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fake(tmp.path(), true);
    f.exit_code("bad", 2);
    pipeline(
        &f,
        "p",
        serde_json::json!({"jobs": {
            "base": {"project": "lib"},
            "broken": {"project": "bad", "needs": ["base"]},
            "after": {"project": "app", "needs": ["broken"]},
            "beside": {"project": "app", "params": {"x": "1"}, "needs": ["base"]},
        }}),
    );
    let jobs: Arc<dyn Jobs> = Arc::new(FakeHandle(Arc::clone(&f)));
    let projects = f.cfg().projects_path.clone();
    let runs = Runs::new(Arc::clone(&jobs), projects, None);
    let rec = runs.run("p", BTreeMap::new()).within().await.unwrap();
    assert_eq!(rec.state, RunState::Failed);
    let state = |name: &str| rec.jobs.iter().find(|j| j.name == name).unwrap().state;
    assert_eq!(state("base"), JobRunState::Ready);
    assert_eq!(state("broken"), JobRunState::Failed);
    assert_eq!(state("after"), JobRunState::Skipped);
    assert_eq!(state("beside"), JobRunState::Ready);
    assert_eq!(rec.failed, ["broken"]);
    // Submitted once each, "after" never.
    let projects: Vec<String> = f.submits().into_iter().map(|(p, _)| p).collect();
    assert_eq!(projects.len(), 3, "{projects:?}");
    assert_eq!(
        projects.iter().filter(|p| *p == "app").count(),
        1,
        "only beside"
    );
    let broken = rec.jobs.iter().find(|j| j.name == "broken").unwrap();
    assert_eq!(broken.exit_code, 2);
    // The downstream job's request names its input: base's ID.
    let base = rec.jobs.iter().find(|j| j.name == "base").unwrap();
    assert_eq!(
        base.id,
        fake_id(&JobRequest {
            project: "lib".into(),
            ..JobRequest::default()
        })
    );
    let rec2 = runs.run("p", BTreeMap::new()).within().await.unwrap();
    let cached = |name: &str| rec2.jobs.iter().find(|j| j.name == name).unwrap().cached;
    assert!(
        cached("base"),
        "the second run's base is a result-cache hit"
    );
    assert!(
        !cached("broken"),
        "a failed job is not cached: it runs again"
    );
    assert_eq!(f.record("bad", &broken.id).unwrap().runs, 2);
}
