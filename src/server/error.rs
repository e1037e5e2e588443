//! The one place where the API's errors become HTTP answers: every handler (jobs, agents,
//! pipelines) returns `Result<_, ApiError>`, the typed errors of the layers below convert into
//! it with `?`, and [`ApiError::status`] decides the status. The body is the error's text
//! (`text/plain`), exactly what mistry's clients and the web view parse.

use axum::extract::rejection::QueryRejection;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::jobs::RequestError;
use crate::pipeline::PipelineError;
use crate::service::{ExportError, FilterError, JobError};

/// Why a request got no answer but an error (see the module's doc).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The jobs interface refused or failed (400, 404, 503, 500 by kind).
    #[error(transparent)]
    Job(#[from] JobError),
    /// A build another agent asked for (`GET /api/build`): 400, 404, 500 by kind.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A pipeline could not be run (404, 400, 503, 500 by kind).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A `POST /jobs` body that is not a job request (400).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A filter of the cluster's job list that is not valid (400).
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// A query string that does not parse (400, axum's text).
    #[error("{}", .0.body_text())]
    Query(#[from] QueryRejection),
    /// 405: `Expected POST, got GET`.
    #[error("Expected {expected}, got {got}")]
    Method { expected: &'static str, got: Method },
    /// 404.
    #[error("Unknown job {project}/{id}")]
    UnknownJob { project: String, id: String },
    /// 409: its artifacts are asked for while it runs.
    #[error("Job {project}/{id} is not ready")]
    NotReady { project: String, id: String },
    /// 409: the job left something else than a directory at `data/artifacts`.
    #[error(
        "The artifacts of job {project}/{id} are not served: data/artifacts is not a \
         directory of the job ({source})"
    )]
    Artifacts {
        project: String,
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// 404.
    #[error("Unknown pipeline run {name}/{run}")]
    UnknownRun { name: String, run: String },
    /// 503: a run failed because the backlog was full, as a job's request would.
    #[error("{} (pipeline {pipeline} run {run})", JobError::Overloaded)]
    RunOverloaded { pipeline: String, run: String },
    /// 400: `GET /api/agents/jobs` with one of `project` and `id`.
    #[error("Give both project and id, or neither")]
    ProjectAndId,
    /// 404: `GET /api/cluster/jobs` on a single node.
    #[error("No cluster: this mistryd has no database_url (GET /index/ lists its jobs)")]
    NoCluster,
    /// 503: `GET /agents` when the database does not answer; the database's error alone, as
    /// this route always said it.
    #[error("{}", agents_text(.0))]
    Agents(JobError),
    /// 403: a state-changing request from another origin's page.
    #[error("Cross-origin request refused: Origin '{origin}' is not this server (http://{host})")]
    CrossOrigin { origin: String, host: String },
    /// 403: a state-changing request signed in with a cookie, without its CSRF token.
    #[error("Forbidden: a signed-in request must send its CSRF token (X-CSRF-Token)")]
    Csrf,
    /// 401 (with `WWW-Authenticate: Bearer`): no token, or not a valid one.
    #[error("Unauthorized: {0}")]
    Unauthorized(crate::access::Refused),
    /// 403: the caller's grant does not cover this (the project it asked for, never others).
    #[error("Forbidden: {}", forbidden_text(*.scope, .project.as_deref()))]
    Forbidden {
        scope: crate::access::Scope,
        project: Option<String>,
    },
    /// 500: a blocking task panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// 500: an answer that does not serialize.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

fn agents_text(e: &JobError) -> String {
    match e {
        JobError::Unavailable(why) => why.clone(),
        other => other.to_string(),
    }
}

fn forbidden_text(scope: crate::access::Scope, project: Option<&str>) -> String {
    match project {
        Some(p) => format!("this token has no {} scope on project {p}", scope.as_str()),
        None => format!("this needs the {} scope", scope.as_str()),
    }
}

impl ApiError {
    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Job(e) => match e {
                JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
                JobError::UnknownProject(_) => StatusCode::NOT_FOUND,
                JobError::Overloaded | JobError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                JobError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Export(e) => match e {
                ExportError::BadName(_) => StatusCode::BAD_REQUEST,
                ExportError::NotReady { .. } => StatusCode::NOT_FOUND,
                ExportError::Squash { .. } | ExportError::Open(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::Pipeline(e) => match e {
                PipelineError::Unknown(_) => StatusCode::NOT_FOUND,
                PipelineError::Invalid(_) | PipelineError::BadRequest(_) => StatusCode::BAD_REQUEST,
                PipelineError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                PipelineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Request(_)
            | ApiError::Filter(_)
            | ApiError::Query(_)
            | ApiError::ProjectAndId => StatusCode::BAD_REQUEST,
            ApiError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnknownJob { .. } | ApiError::UnknownRun { .. } | ApiError::NoCluster => {
                StatusCode::NOT_FOUND
            }
            ApiError::NotReady { .. } | ApiError::Artifacts { .. } => StatusCode::CONFLICT,
            ApiError::RunOverloaded { .. } | ApiError::Agents(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::CrossOrigin { .. } | ApiError::Forbidden { .. } | ApiError::Csrf => {
                StatusCode::FORBIDDEN
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Task(_) | ApiError::Json(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unauthorized(_) = self {
            // Bearer for API clients; Basic too, so that a browser asks for the token (as the
            // password) once and sends it with the web view's requests.
            return (
                self.status(),
                [(
                    axum::http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"mistry\", Basic realm=\"mistry\"",
                )],
                self.to_string(),
            )
                .into_response();
        }
        (self.status(), self.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    //! The mapping, through the router in process: one request per error kind, its exact status
    //! and body.

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower_service::Service as _;

    use super::ApiError;
    use crate::config::Config;
    use crate::engine::{blank_info, Found, Layout, Stage};
    use crate::jobs::JobRequest;
    use crate::pipeline::PipelineError;
    use crate::service::fake::{FakeHandle, FakeJobs};
    use crate::service::{
        AgentInfo, ByteStream, ClusterJobsFilter, Export, ExportError, Hold, JobError, JobView,
        Jobs, Lines, LogTail, Submitted,
    };

    /// The fake's answers, except `err` from every method that can fail, `export`'s error, and
    /// `found` as the one job whose artifacts are asked for.
    struct Scripted {
        fake: FakeHandle,
        err: Option<JobError>,
        export: fn() -> ExportError,
        found: Option<(Stage, &'static str, &'static str)>,
    }

    impl Scripted {
        fn fail(&self) -> Result<(), JobError> {
            match &self.err {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }
    }

    #[async_trait::async_trait]
    impl Jobs for Scripted {
        fn config(&self) -> &Config {
            self.fake.config()
        }
        fn metrics(&self) -> &crate::metrics::Metrics {
            self.fake.metrics()
        }
        async fn submit(&self, req: JobRequest) -> Result<Submitted, JobError> {
            self.fail()?;
            self.fake.submit(req).await
        }
        async fn find(&self, project: &str, id: &str) -> Result<Option<JobView>, JobError> {
            self.fail()?;
            self.fake.find(project, id).await
        }
        async fn document(&self, p: &str, i: &str) -> Result<Option<ByteStream>, JobError> {
            self.fail()?;
            self.fake.document(p, i).await
        }
        async fn follow(&self, p: &str, i: &str) -> Result<Option<Lines>, JobError> {
            self.fail()?;
            self.fake.follow(p, i).await
        }
        async fn log_tail(
            &self,
            p: &str,
            i: &str,
            n: Option<u64>,
        ) -> Result<Option<LogTail>, JobError> {
            self.fail()?;
            self.fake.log_tail(p, i, n).await
        }
        async fn artifacts(&self, _: &str, _: &str) -> Option<Found> {
            let (stage, project, id) = self.found?;
            let layout = Layout::new(self.config().build_path.clone());
            Some(Found {
                stage,
                info: blank_info(&BTreeMap::new(), "", project, id),
                dir: layout.job(project, id, stage),
            })
        }
        fn hold(&self, p: &str, i: &str) -> Option<Hold> {
            self.fake.hold(p, i)
        }
        fn list(&self) -> Box<dyn Iterator<Item = Found> + Send + '_> {
            self.fake.list()
        }
        async fn cluster_jobs(
            &self,
            f: &ClusterJobsFilter,
        ) -> Result<Option<Vec<serde_json::Value>>, JobError> {
            self.fail()?;
            self.fake.cluster_jobs(f).await
        }
        async fn job_agents(
            &self,
            only: Option<(String, String)>,
        ) -> Result<BTreeMap<String, String>, JobError> {
            self.fail()?;
            self.fake.job_agents(only).await
        }
        async fn agents(&self) -> Result<Vec<AgentInfo>, JobError> {
            self.fail()?;
            self.fake.agents().await
        }
        async fn capacity(&self) -> usize {
            self.fake.capacity().await
        }
        async fn refresh_gauges(&self) {}
        fn export(&self, _: &str, _: &str, _: bool) -> Result<Export, ExportError> {
            Err((self.export)())
        }
    }

    struct App {
        dir: tempfile::TempDir,
        router: axum::Router,
    }

    fn not_ready() -> ExportError {
        ExportError::NotReady {
            project: "p".into(),
            id: "i".into(),
        }
    }

    fn app(err: Option<JobError>) -> App {
        app_with(err, not_ready, None)
    }

    fn app_with(
        err: Option<JobError>,
        export: fn() -> ExportError,
        found: Option<(Stage, &'static str, &'static str)>,
    ) -> App {
        let dir = tempfile::tempdir().unwrap();
        let (projects, build) = (dir.path().join("projects"), dir.path().join("build"));
        std::fs::create_dir_all(projects.join("pipelines")).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        let text = serde_json::json!({"projects_path": projects, "build_path": build});
        let cfg = Config::parse(&text.to_string(), &dir.path().join("config.json")).unwrap();
        let jobs = Scripted {
            fake: FakeHandle(FakeJobs::new(cfg, &["app"], true)),
            err,
            export,
            found,
        };
        App {
            dir,
            router: super::super::router(Arc::new(jobs)),
        }
    }

    impl App {
        async fn send(&self, req: Request<Body>) -> (StatusCode, String) {
            let resp = match self.router.clone().call(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }

        async fn get(&self, uri: &str) -> (StatusCode, String) {
            let req = Request::get(uri)
                .header("content-type", "application/json")
                .body(Body::empty())
                .unwrap();
            self.send(req).await
        }

        async fn post(&self, uri: &str, body: &str) -> (StatusCode, String) {
            let req = Request::post(uri)
                .body(Body::from(body.to_string()))
                .unwrap();
            self.send(req).await
        }
    }

    fn want(status: StatusCode, body: &str) -> (StatusCode, String) {
        (status, body.to_string())
    }

    #[tokio::test]
    async fn job_errors_by_kind() {
        let cases = [
            (
                JobError::BadRequest("no project given".into()),
                want(StatusCode::BAD_REQUEST, "no project given"),
            ),
            (
                JobError::UnknownProject("nope".into()),
                want(StatusCode::NOT_FOUND, "Unknown project 'nope'"),
            ),
            (
                JobError::Overloaded,
                want(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Server is overloaded; try again later",
                ),
            ),
            (
                JobError::Unavailable("the database does not answer".into()),
                want(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable: the database does not answer",
                ),
            ),
            (
                JobError::Internal("work: boom".into()),
                want(StatusCode::INTERNAL_SERVER_ERROR, "work: boom"),
            ),
        ];
        for (err, expected) in cases {
            let a = app(Some(err.clone()));
            assert_eq!(a.get("/api/job/app/0123").await, expected, "{err:?}");
            assert_eq!(a.get("/job/app/0123").await, expected, "{err:?}");
            assert_eq!(a.get("/log/app/0123").await, expected, "{err:?}");
            assert_eq!(a.get("/api/logtail/app/0123").await, expected, "{err:?}");
            assert_eq!(
                a.post("/jobs", r#"{"project": "app"}"#).await,
                expected,
                "{err:?}"
            );
            assert_eq!(
                a.get("/api/agents/jobs?project=app&id=0123").await,
                expected,
                "{err:?}"
            );
            assert_eq!(a.get("/api/cluster/jobs").await, expected, "{err:?}");
        }
    }

    #[tokio::test]
    async fn agents_answer_503_with_the_databases_error_alone() {
        let a = app(Some(JobError::Unavailable("connection refused".into())));
        assert_eq!(
            a.get("/agents").await,
            want(StatusCode::SERVICE_UNAVAILABLE, "connection refused")
        );
        let a = app(Some(JobError::Internal("lost".into())));
        assert_eq!(
            a.get("/agents").await,
            want(StatusCode::SERVICE_UNAVAILABLE, "lost")
        );
    }

    #[tokio::test]
    async fn export_errors_by_kind() {
        let bad_name: fn() -> ExportError =
            || ExportError::BadName(crate::jobs::check_name("project", ".p").unwrap_err());
        let squash: fn() -> ExportError = || ExportError::Squash {
            project: "p".into(),
            id: "i".into(),
            source: Box::new(images::StoreError::Io {
                what: "reading cache-layers".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
        };
        let open: fn() -> ExportError = || ExportError::Open(rustix::io::Errno::ACCESS);
        let cases = [
            (
                bad_name,
                want(
                    StatusCode::BAD_REQUEST,
                    "invalid project name \".p\": must not start with '.'",
                ),
            ),
            (
                not_ready as fn() -> ExportError,
                want(
                    StatusCode::NOT_FOUND,
                    "Build p/i is not ready on this agent",
                ),
            ),
            (
                squash,
                want(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!(
                        "Build p/i: its cache could not be merged: reading cache-layers: {}",
                        std::io::Error::from_raw_os_error(libc::EIO)
                    ),
                ),
            ),
            (
                open,
                want(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &rustix::io::Errno::ACCESS.to_string(),
                ),
            ),
        ];
        for (export, expected) in cases {
            let a = app_with(None, export, None);
            assert_eq!(a.get("/api/build/p/i?cache=1").await, expected);
        }
    }

    #[tokio::test]
    async fn request_errors() {
        let a = app(None);
        let json_err = serde_json::from_slice::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(
            a.post("/jobs", "{nope").await,
            want(
                StatusCode::BAD_REQUEST,
                &format!("Error unmarshalling body '{{nope' to Job: {json_err}"),
            )
        );
        assert_eq!(
            a.post("/jobs", "[1]").await,
            want(
                StatusCode::BAD_REQUEST,
                "Error unmarshalling body '[1]' to Job: not an object"
            )
        );
        assert_eq!(
            a.post("/jobs", r#"{"project": 1}"#).await,
            want(
                StatusCode::BAD_REQUEST,
                "Error unmarshalling body to Job: project must be a string"
            )
        );
        assert_eq!(
            a.get("/jobs").await,
            want(StatusCode::METHOD_NOT_ALLOWED, "Expected POST, got GET")
        );
        let put = Request::put("/pipelines").body(Body::empty()).unwrap();
        assert_eq!(
            a.send(put).await,
            want(
                StatusCode::METHOD_NOT_ALLOWED,
                "Expected GET or POST, got PUT"
            )
        );
        let cross = Request::post("/jobs")
            .header("host", "mistry.example:8462")
            .header("origin", "http://evil.example")
            .body(Body::from(r#"{"project": "app"}"#))
            .unwrap();
        assert_eq!(
            a.send(cross).await,
            want(
                StatusCode::FORBIDDEN,
                "Cross-origin request refused: Origin 'http://evil.example' is not this server \
                 (http://mistry.example:8462)"
            )
        );
    }

    #[tokio::test]
    async fn unknown_and_not_ready_jobs() {
        let a = app(None);
        for uri in [
            "/api/job/app/0123",
            "/job/app/0123",
            "/api/logtail/app/0123",
        ] {
            assert_eq!(
                a.get(uri).await,
                want(StatusCode::NOT_FOUND, "Unknown job app/0123"),
                "{uri}"
            );
        }
        assert_eq!(
            a.get("/artifacts/app/0123").await,
            want(StatusCode::NOT_FOUND, "Unknown job app/0123")
        );
        let a = app_with(None, not_ready, Some((Stage::Pending, "app", "0123")));
        assert_eq!(
            a.get("/artifacts/app/0123").await,
            want(StatusCode::CONFLICT, "Job app/0123 is not ready")
        );
        // A job that left a link at data/artifacts: not served.
        let a = app_with(None, not_ready, Some((Stage::Ready, "app", "0123")));
        let data = a.dir.path().join("build/app/ready/0123/data");
        std::fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink("/", data.join("artifacts")).unwrap();
        let (status, body) = a.get("/artifacts/app/0123").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(
            body.starts_with(
                "The artifacts of job app/0123 are not served: data/artifacts is not a \
                 directory of the job ("
            ),
            "{body}"
        );
    }

    #[tokio::test]
    async fn cluster_list_and_agents_queries() {
        let a = app(None);
        assert_eq!(
            a.get("/api/cluster/jobs?limit=0").await,
            want(
                StatusCode::BAD_REQUEST,
                "limit must be between 1 and 5000, got 0"
            )
        );
        assert_eq!(
            a.get("/api/cluster/jobs?state=Ready").await,
            want(
                StatusCode::BAD_REQUEST,
                "Unknown state 'Ready': give queued, running, pending, ready or failed"
            )
        );
        assert_eq!(
            a.get("/api/cluster/jobs?limit=x").await,
            want(
                StatusCode::BAD_REQUEST,
                "Failed to deserialize query string: limit: invalid digit found in string"
            )
        );
        assert_eq!(
            a.get("/api/cluster/jobs").await,
            want(
                StatusCode::NOT_FOUND,
                "No cluster: this mistryd has no database_url (GET /index/ lists its jobs)"
            )
        );
        assert_eq!(
            a.get("/api/agents/jobs?project=app").await,
            want(
                StatusCode::BAD_REQUEST,
                "Give both project and id, or neither"
            )
        );
    }

    #[tokio::test]
    async fn pipeline_errors() {
        let a = app(None);
        assert_eq!(
            a.post("/pipelines", r#"{"pipeline": "nope"}"#).await,
            want(StatusCode::NOT_FOUND, "Unknown pipeline 'nope'")
        );
        assert_eq!(
            a.post("/pipelines", r#"{"params": {}}"#).await,
            want(StatusCode::BAD_REQUEST, "no pipeline given")
        );
        std::fs::write(
            a.dir.path().join("projects/pipelines/bad.json"),
            r#"{"jobs": {}}"#,
        )
        .unwrap();
        assert_eq!(
            a.post("/pipelines", r#"{"pipeline": "bad"}"#).await,
            want(
                StatusCode::BAD_REQUEST,
                "pipelines/bad.json: jobs: no jobs defined"
            )
        );
        let run = "a".repeat(64);
        for uri in [
            format!("/pipeline/bad/{run}"),
            format!("/pipeline/bad/{run}/events"),
        ] {
            assert_eq!(
                a.get(&uri).await,
                want(
                    StatusCode::NOT_FOUND,
                    &format!("Unknown pipeline run bad/{run}")
                ),
                "{uri}"
            );
        }
    }

    /// The kinds no request of the fake reaches.
    #[test]
    fn the_other_statuses() {
        let cases = [
            (
                ApiError::from(PipelineError::Overloaded),
                want(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Server is overloaded; try again later",
                ),
            ),
            (
                ApiError::from(PipelineError::Internal("run.json: gone".into())),
                want(StatusCode::INTERNAL_SERVER_ERROR, "run.json: gone"),
            ),
            (
                ApiError::RunOverloaded {
                    pipeline: "p".into(),
                    run: "r".into(),
                },
                want(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Server is overloaded; try again later (pipeline p run r)",
                ),
            ),
            (
                ApiError::from(serde_json::from_str::<u8>("x").unwrap_err()),
                want(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "expected value at line 1 column 1",
                ),
            ),
        ];
        for (e, (status, body)) in cases {
            assert_eq!((e.status(), e.to_string()), (status, body));
        }
    }
}
