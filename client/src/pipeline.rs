//! `mistry pipeline run` and `mistry pipeline list`: a pipeline run on the server, followed job
//! by job (`GET /pipeline/{name}/{run}/events`), with `mistry build`'s messages and exit codes,
//! and the artifacts of named jobs fetched over the http transport.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::build::parse_params;

/// `mistry pipeline ...`.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Run a pipeline on the server: print each job's state as it changes, then the result.
    Run(PipelineRunArgs),
    /// List the server's pipelines, their params and jobs.
    List(ServerArgs),
}

/// Where the server is (as `mistry build`).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server host.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Server port.
    #[arg(long, short = 'p', default_value_t = 8462)]
    pub port: u16,
    /// The server's token (access control); default: the environment's `MISTRY_TOKEN`.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl ServerArgs {
    fn base(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

/// `JOB=DIR` of `--artifacts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactsOf {
    /// The job's name in the pipeline definition.
    pub job: String,
    /// The local directory its artifacts go to (created if missing; an error if it is a file).
    pub dir: PathBuf,
}

/// An `--artifacts` value that is not `JOB=DIR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected JOB=DIR, got {0:?}")]
pub(crate) struct BadArtifacts(String);

fn parse_artifacts(s: &str) -> Result<ArtifactsOf, BadArtifacts> {
    match s.split_once('=') {
        Some((job, dir)) if !job.is_empty() && !dir.is_empty() => Ok(ArtifactsOf {
            job: job.to_string(),
            dir: PathBuf::from(dir),
        }),
        _ => Err(BadArtifacts(s.to_string())),
    }
}

/// Options of `mistry pipeline run`.
#[derive(Debug, Args)]
pub struct PipelineRunArgs {
    /// `--host` and `--port` of the server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The pipeline (`<projects_path>/pipelines/NAME.json` on the server).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Print the run record JSON on stdout instead of the job lines.
    #[arg(long)]
    pub json_result: bool,
    /// Start the run and exit; fetch nothing.
    #[arg(long, conflicts_with = "artifacts")]
    pub no_wait: bool,
    /// How long to wait for the run's end (Go syntax: 1s, 90m, 1h30m).
    #[arg(long, default_value = "60m", value_parser = crate::duration::parse)]
    pub timeout: Duration,
    /// Fetch the artifacts of job JOB into DIR (created if missing) once the run succeeded;
    /// repeatable.
    #[arg(long, value_name = "JOB=DIR", value_parser = parse_artifacts)]
    pub artifacts: Vec<ArtifactsOf>,
    /// Pipeline params: `--name=value` or `--name value`; `@file` reads the value from a file.
    #[arg(last = true, value_name = "PARAMS")]
    pub params: Vec<String>,
}

/// Run a `mistry pipeline` command; returns the process exit code.
pub fn pipeline(cmd: PipelineCommand) -> Result<i32> {
    match cmd {
        PipelineCommand::Run(args) => run(args),
        PipelineCommand::List(server) => list(&server),
    }
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn jobs_of(record: &Value) -> &[Value] {
    record
        .get("jobs")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// One job's line for `state` (None: not worth a line, e.g. still waiting for its needs).
pub fn job_line(base: &str, job: &Value) -> Option<String> {
    let name = str_of(job, "name");
    let logs = format!("logs at {base}/{}", str_of(job, "url"));
    let text = match str_of(job, "state") {
        "" | "waiting" => return None,
        "ready" => {
            let flags: Vec<&str> = ["cached", "coalesced", "incremental"]
                .into_iter()
                .filter(|f| job.get(*f).and_then(Value::as_bool) == Some(true))
                .collect();
            if flags.is_empty() {
                format!("ready, {logs}")
            } else {
                format!("ready ({}), {logs}", flags.join(", "))
            }
        }
        "failed" => {
            let err = str_of(job, "err_build").lines().next().unwrap_or("");
            let code = job.get("exit_code").and_then(Value::as_i64).unwrap_or(0);
            if code != 0 {
                format!("failed with exit code {code}, {logs}")
            } else if !err.is_empty() {
                format!("failed: {err}, {logs}")
            } else {
                format!("failed, {logs}")
            }
        }
        "skipped" => "skipped (a job it needs failed)".to_string(),
        other => other.to_string(),
    };
    Some(format!("{name}: {text}"))
}

/// Prints each job's line when its state changes.
struct Lines {
    base: String,
    seen: BTreeMap<String, String>,
    quiet: bool,
}

impl Lines {
    fn show(&mut self, record: &Value) {
        for job in jobs_of(record) {
            let (name, state) = (str_of(job, "name"), str_of(job, "state"));
            if self.seen.get(name).map(String::as_str) == Some(state) {
                continue;
            }
            self.seen.insert(name.to_string(), state.to_string());
            if let (false, Some(line)) = (self.quiet, job_line(&self.base, job)) {
                println!("{line}");
            }
        }
    }
}

fn running(record: &Value) -> bool {
    matches!(str_of(record, "state"), "running" | "")
}

/// Run `mistry pipeline run`; returns the process exit code.
pub(crate) fn run(args: PipelineRunArgs) -> Result<i32> {
    let params = parse_params(&args.params)?;
    for a in &args.artifacts {
        if a.dir.is_file() {
            bail!("target {} is a file", a.dir.display());
        }
    }
    for a in &args.artifacts {
        std::fs::create_dir_all(&a.dir)
            .with_context(|| format!("creating the target {}", a.dir.display()))?;
    }
    let base = args.server.base();
    let agent = crate::http::agent(
        args.timeout,
        crate::http::token(args.server.token.as_deref()),
    );
    let what = "The pipeline run";
    let body = serde_json::json!({"pipeline": args.name, "params": params}).to_string();
    let (status, text) = crate::http::request(
        &agent,
        &base,
        &format!("{base}/pipelines?async"),
        Some(&body),
        what,
        args.timeout,
    )?;
    if status != 201 {
        return Err(crate::http::refused(status, &text));
    }
    let mut record: Value =
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    let url = str_of(&record, "url").to_string();
    if url.is_empty() {
        bail!("unexpected answer (no run URL): {text}");
    }
    if args.no_wait {
        if args.json_result {
            println!("{}", text.trim_end());
        } else {
            println!("Pipeline run can be found at {base}/{url}");
        }
        return Ok(0);
    }
    if !args.json_result {
        println!("Pipeline run can be found at {base}/{url}");
    }
    for a in &args.artifacts {
        if !jobs_of(&record).iter().any(|j| str_of(j, "name") == a.job) {
            let names: Vec<&str> = jobs_of(&record).iter().map(|j| str_of(j, "name")).collect();
            bail!(
                "pipeline {} has no job {} (its jobs: {})",
                args.name,
                a.job,
                names.join(", ")
            );
        }
    }
    let mut lines = Lines {
        base: base.clone(),
        seen: BTreeMap::new(),
        quiet: args.json_result,
    };
    lines.show(&record);
    let deadline = Instant::now() + args.timeout;
    if running(&record) {
        record = follow(&agent, &base, &url, &mut lines, deadline, args.timeout)?;
    }
    if args.json_result {
        println!("{record}");
    }
    for t in record
        .get("triggered")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
    {
        if !args.json_result {
            println!(
                "Triggered pipeline {}: {base}/{}",
                str_of(t, "pipeline"),
                str_of(t, "url")
            );
        }
    }
    let jobs = jobs_of(&record);
    if str_of(&record, "state") != "succeeded" {
        let with = |state: &str| -> Vec<&str> {
            jobs.iter()
                .filter(|j| str_of(j, "state") == state)
                .map(|j| str_of(j, "name"))
                .collect()
        };
        let (failed, skipped) = (with("failed"), with("skipped"));
        let mut why = Vec::new();
        if !failed.is_empty() {
            why.push(format!("failed jobs: {}", failed.join(", ")));
        }
        if !skipped.is_empty() {
            why.push(format!("skipped: {}", skipped.join(", ")));
        }
        if why.is_empty() {
            why.push(format!("state {}", str_of(&record, "state")));
        }
        bail!("Pipeline {} failed: {}", args.name, why.join("; "));
    }
    if !args.json_result {
        let cached = jobs
            .iter()
            .filter(|j| j.get("cached").and_then(Value::as_bool) == Some(true))
            .count();
        println!(
            "Pipeline {} succeeded: {} jobs ready ({cached} cached)",
            args.name,
            jobs.len()
        );
    }
    for a in &args.artifacts {
        let job = jobs
            .iter()
            .find(|j| str_of(j, "name") == a.job)
            .ok_or_else(|| anyhow!("pipeline {} has no job {}", args.name, a.job))?;
        crate::transport::fetch_http(&agent, &base, str_of(job, "url"), &a.dir, false)
            .with_context(|| format!("job {}", a.job))?;
    }
    Ok(0)
}

/// Follow the run at `url` until it ends: its events (SSE), else its record polled.
fn follow(
    agent: &ureq::Agent,
    base: &str,
    url: &str,
    lines: &mut Lines,
    deadline: Instant,
    timeout: Duration,
) -> Result<Value> {
    let what = "The pipeline run";
    if let Some(record) = events(agent, base, url, lines, what, timeout)? {
        return Ok(record);
    }
    // No events (or they ended early): ask for the record until the run ends.
    loop {
        let (status, text) =
            crate::http::request(agent, base, &format!("{base}/{url}"), None, what, timeout)?;
        if status != 200 {
            bail!("following the run: {}", text.trim());
        }
        let record: Value =
            serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
        lines.show(&record);
        if !running(&record) {
            return Ok(record);
        }
        if Instant::now() >= deadline {
            return Err(crate::http::timed_out(what, timeout));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The run's events until the one that ends it; `None` when there are none to follow.
fn events(
    agent: &ureq::Agent,
    base: &str,
    url: &str,
    lines: &mut Lines,
    what: &str,
    timeout: Duration,
) -> Result<Option<Value>> {
    let mut resp = agent
        .get(&format!("{base}/{url}/events"))
        .header("Accept", "text/event-stream")
        .call()
        .map_err(|e| crate::http::send_error(e, base, what, timeout))?;
    if resp.status().as_u16() != 200 {
        return Ok(None);
    }
    let reader = std::io::BufReader::new(resp.body_mut().with_config().limit(u64::MAX).reader());
    let mut data = String::new();
    for line in reader.lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(crate::http::timed_out(what, timeout))
            }
            Err(e) if e.to_string().contains("timeout") => {
                return Err(crate::http::timed_out(what, timeout))
            }
            Err(_) => return Ok(None),
        };
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
            continue;
        }
        if !line.is_empty() || data.is_empty() {
            continue;
        }
        let event = std::mem::take(&mut data);
        let Ok(record) = serde_json::from_str::<Value>(&event) else {
            continue;
        };
        lines.show(&record);
        if !running(&record) {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// `mistry pipeline list`: one line per pipeline, `NAME  params: --p (required), --q (default
/// "v")  jobs: a, b`.
pub(crate) fn list(server: &ServerArgs) -> Result<i32> {
    let base = server.base();
    let timeout = Duration::from_secs(60);
    let agent = crate::http::agent(timeout, crate::http::token(server.token.as_deref()));
    let (status, text) = crate::http::request(
        &agent,
        &base,
        &format!("{base}/pipelines"),
        None,
        "Listing the pipelines",
        timeout,
    )?;
    if status != 200 {
        return Err(crate::http::refused(status, &text));
    }
    let all: Value =
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    let all = all
        .as_array()
        .ok_or_else(|| anyhow!("unexpected answer: {text}"))?;
    if all.is_empty() {
        println!("No pipelines.");
    }
    for p in all {
        println!("{}", list_line(p));
    }
    Ok(0)
}

/// The line of one pipeline in `mistry pipeline list`.
pub fn list_line(p: &Value) -> String {
    let params: Vec<String> = p
        .get("params")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, spec)| {
                    if let Some(d) = spec.get("default") {
                        let d = d.as_str().map(str::to_string).unwrap_or(d.to_string());
                        format!("--{k} (default {d:?})")
                    } else if spec.get("required").and_then(Value::as_bool) == Some(true) {
                        format!("--{k} (required)")
                    } else {
                        format!("--{k}")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let jobs: Vec<&str> = p
        .get("jobs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{}  params: {}  jobs: {}",
        str_of(p, "name"),
        if params.is_empty() {
            "none".to_string()
        } else {
            params.join(", ")
        },
        jobs.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_option() {
        assert_eq!(
            parse_artifacts("deps=out/d").unwrap(),
            ArtifactsOf {
                job: "deps".into(),
                dir: "out/d".into()
            }
        );
        for bad in ["deps", "=d", "deps="] {
            assert!(parse_artifacts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines() {
        let j =
            serde_json::json!({"name": "deps", "state": "ready", "cached": true, "url": "job/p/1"});
        assert_eq!(
            job_line("http://h:1", &j).unwrap(),
            "deps: ready (cached), logs at http://h:1/job/p/1"
        );
        let j =
            serde_json::json!({"name": "a", "state": "failed", "exit_code": 3, "url": "job/p/2"});
        assert_eq!(
            job_line("http://h:1", &j).unwrap(),
            "a: failed with exit code 3, logs at http://h:1/job/p/2"
        );
        let j = serde_json::json!({"name": "a", "state": "waiting"});
        assert_eq!(job_line("http://h:1", &j), None);
        let p = serde_json::json!({"name": "assets", "params": {"branch": {"required": true}, "env": {"default": "production"}}, "jobs": ["deps", "assets"]});
        assert_eq!(
            list_line(&p),
            "assets  params: --branch (required), --env (default \"production\")  jobs: deps, assets"
        );
    }
}
