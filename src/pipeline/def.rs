//! Pipeline definitions: `<projects_path>/pipelines/<name>.json`, parsed and validated with
//! errors that name the file and the key (`pipelines/assets.json: jobs.build.needs[0]: unknown
//! job "dep"`), templates (`{{param}}`, `{{run}}`, `{{pipeline}}`, `{{jobs.<job>.id}}`), and
//! run IDs.
//!
//! JSON rather than YAML: serde_json is already a dependency and well kept, while serde_yaml is
//! unmaintained (archived in 2024) and its forks are young.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::PipelineError;
use crate::jobs::check_name;

/// Template names a pipeline may not declare as params.
const RESERVED: [&str; 3] = ["run", "pipeline", "jobs"];

/// A declared param.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ParamDef {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// One job of a pipeline, its strings still templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobDef {
    pub name: String,
    pub project: String,
    pub group: String,
    pub params: BTreeMap<String, String>,
    pub needs: Vec<String>,
}

/// One `on_success` trigger, its params still templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TriggerDef {
    pub pipeline: String,
    pub params: BTreeMap<String, String>,
}

/// A parsed and validated pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Pipeline {
    pub name: String,
    /// `pipelines/<name>.json`, as errors name it.
    pub file: String,
    /// The definition file's bytes (they enter the run ID).
    pub bytes: Vec<u8>,
    pub description: String,
    pub params: BTreeMap<String, ParamDef>,
    /// In a topological order (among the jobs ready at once, by name).
    pub jobs: Vec<JobDef>,
    pub on_success: Vec<TriggerDef>,
}

/// The file of pipeline `name` (not checked).
pub(crate) fn file_of(projects_path: &Path, name: &str) -> PathBuf {
    projects_path.join("pipelines").join(format!("{name}.json"))
}

/// The names of the pipelines defined in `projects_path/pipelines/`, sorted.
pub(crate) fn names(projects_path: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(projects_path.join("pipelines")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
            (check_name("pipeline", &name).is_ok() && e.path().is_file()).then_some(name)
        })
        .collect();
    v.sort();
    v
}

impl Pipeline {
    /// Read, parse and validate pipeline `name`, its triggers too (the pipelines they name
    /// exist, take the params given and require no others, and never trigger `name` again).
    /// `projects`: where the jobs' projects are (the engine's `projects_path`).
    pub(crate) fn load(
        projects_path: &Path,
        projects: &Path,
        name: &str,
    ) -> Result<Pipeline, PipelineError> {
        let p = Self::load_one(projects_path, projects, name)?;
        check_triggers(projects_path, projects, &p)?;
        Ok(p)
    }

    /// Read, parse and validate one pipeline, without following its triggers.
    fn load_one(
        projects_path: &Path,
        projects: &Path,
        name: &str,
    ) -> Result<Pipeline, PipelineError> {
        if check_name("pipeline", name).is_err() {
            return Err(PipelineError::Unknown(name.to_string()));
        }
        let path = file_of(projects_path, name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PipelineError::Unknown(name.to_string()))
            }
            Err(e) => {
                return Err(PipelineError::Internal(format!(
                    "reading {}: {e}",
                    path.display()
                )))
            }
        };
        Self::parse(name, bytes, &|p| {
            projects.join(p).join("Dockerfile").is_file()
        })
    }

    /// Parse and validate a definition (`project_exists` says whether a project exists).
    pub(crate) fn parse(
        name: &str,
        bytes: Vec<u8>,
        project_exists: &dyn Fn(&str) -> bool,
    ) -> Result<Pipeline, PipelineError> {
        let file = format!("pipelines/{name}.json");
        let err = |key: &str, msg: String| {
            PipelineError::Invalid(if key.is_empty() {
                format!("{file}: {msg}")
            } else {
                format!("{file}: {key}: {msg}")
            })
        };
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            // serde_json's message ends with "at line L column C".
            err("", format!("invalid JSON: {e}"))
        })?;
        let top = value
            .as_object()
            .ok_or_else(|| err("", "must be a JSON object".into()))?;
        known_keys(
            top,
            "",
            &["description", "params", "jobs", "on_success"],
            &err,
        )?;
        let description = opt_string(top, "description", "description", &err)?;

        // params
        let mut params = BTreeMap::new();
        if let Some(v) = top.get("params") {
            let obj = v
                .as_object()
                .ok_or_else(|| err("params", "must be an object".into()))?;
            for (pname, def) in obj {
                let key = format!("params.{pname}");
                check_name("param", pname).map_err(|e| err(&key, e.to_string()))?;
                if RESERVED.contains(&pname.as_str()) {
                    return Err(err(
                        &key,
                        format!("\"{pname}\" is reserved for templates ({{{{{pname}}}}})"),
                    ));
                }
                let d = def
                    .as_object()
                    .ok_or_else(|| err(&key, "must be an object".into()))?;
                known_keys(d, &key, &["required", "default", "description"], &err)?;
                let required = match d.get("required") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(err(&format!("{key}.required"), "must be a boolean".into()))
                    }
                };
                let default = match d.get("default") {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        return Err(err(&format!("{key}.default"), "must be a string".into()))
                    }
                };
                if required && default.is_some() {
                    return Err(err(&key, "a required param has no default".into()));
                }
                let description =
                    opt_string(d, "description", &format!("{key}.description"), &err)?;
                params.insert(
                    pname.clone(),
                    ParamDef {
                        required,
                        default,
                        description,
                    },
                );
            }
        }

        // jobs
        let jobs_obj = match top.get("jobs") {
            Some(Value::Object(o)) if !o.is_empty() => o,
            Some(Value::Object(_)) | None => return Err(err("jobs", "no jobs defined".into())),
            Some(_) => return Err(err("jobs", "must be an object".into())),
        };
        let job_names: BTreeSet<&str> = jobs_obj.keys().map(String::as_str).collect();
        let mut jobs = Vec::new();
        for (jname, def) in jobs_obj {
            let key = format!("jobs.{jname}");
            check_name("job", jname).map_err(|e| err(&key, e.to_string()))?;
            let d = def
                .as_object()
                .ok_or_else(|| err(&key, "must be an object".into()))?;
            known_keys(d, &key, &["project", "params", "group", "needs"], &err)?;
            let project = match d.get("project") {
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(err(&format!("{key}.project"), "must be a string".into())),
                None => return Err(err(&key, "no project given".into())),
            };
            check_name("project", &project)
                .map_err(|e| err(&format!("{key}.project"), e.to_string()))?;
            if !project_exists(&project) {
                return Err(err(
                    &format!("{key}.project"),
                    format!("unknown project \"{project}\""),
                ));
            }
            let group = opt_string(d, "group", &format!("{key}.group"), &err)?;
            check_template(&group, &params, None, &format!("{key}.group"), &err)?;
            let jparams = string_map(d.get("params"), &format!("{key}.params"), &err)?;
            for (pk, pv) in &jparams {
                let pkey = format!("{key}.params.{pk}");
                check_name("param", pk).map_err(|e| err(&pkey, e.to_string()))?;
                check_template(pv, &params, None, &pkey, &err)?;
            }
            let mut needs = Vec::new();
            match d.get("needs") {
                None => {}
                Some(Value::Array(a)) => {
                    for (i, n) in a.iter().enumerate() {
                        let nkey = format!("{key}.needs[{i}]");
                        let n = n
                            .as_str()
                            .ok_or_else(|| err(&nkey, "must be a string".into()))?;
                        if !job_names.contains(n) {
                            return Err(err(&nkey, format!("unknown job \"{n}\"")));
                        }
                        if n == jname {
                            return Err(err(&nkey, format!("job \"{n}\" needs itself")));
                        }
                        if needs.iter().any(|m| m == n) {
                            return Err(err(&nkey, format!("job \"{n}\" is named twice")));
                        }
                        needs.push(n.to_string());
                    }
                }
                Some(_) => {
                    return Err(err(
                        &format!("{key}.needs"),
                        "must be an array of job names".into(),
                    ))
                }
            }
            jobs.push(JobDef {
                name: jname.clone(),
                project,
                group,
                params: jparams,
                needs,
            });
        }
        let jobs = topological(jobs).map_err(|cycle| {
            err(
                &format!("jobs.{}.needs", cycle.0.first().map_or("", String::as_str)),
                cycle.to_string(),
            )
        })?;

        // on_success
        let mut on_success = Vec::new();
        match top.get("on_success") {
            None => {}
            Some(Value::Array(a)) => {
                for (i, t) in a.iter().enumerate() {
                    let key = format!("on_success[{i}]");
                    let d = t
                        .as_object()
                        .ok_or_else(|| err(&key, "must be an object".into()))?;
                    known_keys(d, &key, &["pipeline", "params"], &err)?;
                    let pipeline = match d.get("pipeline") {
                        Some(Value::String(s)) => s.clone(),
                        Some(_) => {
                            return Err(err(&format!("{key}.pipeline"), "must be a string".into()))
                        }
                        None => return Err(err(&key, "no pipeline given".into())),
                    };
                    if check_name("pipeline", &pipeline).is_err() {
                        return Err(err(
                            &format!("{key}.pipeline"),
                            format!("unknown pipeline \"{pipeline}\""),
                        ));
                    }
                    let tparams = string_map(d.get("params"), &format!("{key}.params"), &err)?;
                    for (pk, pv) in &tparams {
                        let pkey = format!("{key}.params.{pk}");
                        check_template(pv, &params, Some(&job_names), &pkey, &err)?;
                    }
                    on_success.push(TriggerDef {
                        pipeline,
                        params: tparams,
                    });
                }
            }
            Some(_) => return Err(err("on_success", "must be an array".into())),
        }

        Ok(Pipeline {
            name: name.to_string(),
            file,
            bytes,
            description,
            params,
            jobs,
            on_success,
        })
    }

    fn invalid(&self, key: &str, msg: impl std::fmt::Display) -> PipelineError {
        PipelineError::Invalid(format!("{}: {key}: {msg}", self.file))
    }

    /// The effective params of a run: those given, checked against the declared ones, with the
    /// defaults of the others.
    pub(crate) fn resolve_params(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, PipelineError> {
        for k in given.keys() {
            if !self.params.contains_key(k) {
                return Err(self.invalid("params", format!("unknown param \"{k}\"")));
            }
        }
        let mut out = BTreeMap::new();
        for (k, def) in &self.params {
            let v = match (given.get(k), &def.default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) if def.required => {
                    return Err(self.invalid(
                        &format!("params.{k}"),
                        format!("missing required param \"{k}\""),
                    ))
                }
                (None, None) => String::new(),
            };
            out.insert(k.clone(), v);
        }
        Ok(out)
    }

    /// The run ID of a run with these (resolved) params: sha256 of the pipeline's name, the
    /// params in name order and the definition's bytes, each part NUL-terminated. A value
    /// holding a NUL could pass for several params there (`a="x\0param\0b\0y"` and `a="x"`,
    /// `b="y"`): with one, every part is length-prefixed instead, after a tag no NUL-terminated
    /// form starts with — so no two runs of other params share an ID, and runs without NULs
    /// keep theirs.
    pub(crate) fn run_id(&self, params: &BTreeMap<String, String>) -> String {
        let mut h = Sha256::new();
        if params.values().any(|v| v.contains('\0')) {
            let mut field = |bytes: &[u8]| {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            };
            field(b"pipeline run id v2");
            field(self.name.as_bytes());
            field(&(params.len() as u64).to_le_bytes());
            for (k, v) in params {
                field(k.as_bytes());
                field(v.as_bytes());
            }
            field(&self.bytes);
            return hex::encode(h.finalize());
        }
        for part in ["pipeline", &self.name] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for (k, v) in params {
            for part in ["param", k, v] {
                h.update(part.as_bytes());
                h.update([0]);
            }
        }
        h.update(b"definition\0");
        h.update(&self.bytes);
        hex::encode(h.finalize())
    }
}

/// Template values: the params, `run`, `pipeline` and (in `on_success`) `jobs.<job>.id`.
pub(crate) struct Values<'a> {
    pub params: &'a BTreeMap<String, String>,
    pub pipeline: &'a str,
    pub run: &'a str,
    pub job_ids: Option<&'a BTreeMap<String, String>>,
}

impl Values<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "run" => Some(self.run),
            "pipeline" => Some(self.pipeline),
            _ => {
                if let Some(job) = name
                    .strip_prefix("jobs.")
                    .and_then(|r| r.strip_suffix(".id"))
                {
                    return self.job_ids?.get(job).map(String::as_str);
                }
                self.params.get(name).map(String::as_str)
            }
        }
    }
}

/// A template with a `{{` that is never closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unclosed \"{{{{\" in \"{0}\"")]
struct Unclosed(String);

/// The pieces of a template: literal text and `{{name}}` references (names trimmed).
fn pieces(template: &str) -> Result<Vec<(bool, &str)>, Unclosed> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push((false, &rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| Unclosed(template.to_string()))?;
        out.push((true, after[..end].trim()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push((false, rest));
    }
    Ok(out)
}

/// Expand a (validated) template.
pub(crate) fn expand(template: &str, values: &Values) -> String {
    let Ok(pieces) = pieces(template) else {
        return template.to_string();
    };
    pieces
        .into_iter()
        .map(|(is_ref, s)| {
            if is_ref {
                values.get(s).unwrap_or_default()
            } else {
                s
            }
        })
        .collect()
}

/// Expand every value of a map of templates.
pub(crate) fn expand_map(
    templates: &BTreeMap<String, String>,
    values: &Values,
) -> BTreeMap<String, String> {
    templates
        .iter()
        .map(|(k, v)| (k.clone(), expand(v, values)))
        .collect()
}

fn check_template(
    template: &str,
    params: &BTreeMap<String, ParamDef>,
    jobs: Option<&BTreeSet<&str>>,
    key: &str,
    err: &dyn Fn(&str, String) -> PipelineError,
) -> Result<(), PipelineError> {
    for (is_ref, name) in pieces(template).map_err(|e| err(key, e.to_string()))? {
        if !is_ref || name == "run" || name == "pipeline" || params.contains_key(name) {
            continue;
        }
        if let Some(job) = name
            .strip_prefix("jobs.")
            .and_then(|r| r.strip_suffix(".id"))
        {
            match jobs {
                Some(jobs) if jobs.contains(job) => continue,
                Some(_) => {
                    return Err(err(key, format!("unknown job \"{job}\" in \"{template}\"")))
                }
                None => {
                    return Err(err(
                        key,
                        format!("{{{{{name}}}}} is only known in on_success"),
                    ))
                }
            }
        }
        return Err(err(
            key,
            format!("unknown param \"{name}\" in \"{template}\""),
        ));
    }
    Ok(())
}

fn known_keys(
    obj: &Map<String, Value>,
    key: &str,
    known: &[&str],
    err: &dyn Fn(&str, String) -> PipelineError,
) -> Result<(), PipelineError> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            let at = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            return Err(err(
                &at,
                format!("unknown key (expected one of: {})", known.join(", ")),
            ));
        }
    }
    Ok(())
}

fn opt_string(
    obj: &Map<String, Value>,
    name: &str,
    key: &str,
    err: &dyn Fn(&str, String) -> PipelineError,
) -> Result<String, PipelineError> {
    match obj.get(name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(err(key, "must be a string".into())),
    }
}

fn string_map(
    v: Option<&Value>,
    key: &str,
    err: &dyn Fn(&str, String) -> PipelineError,
) -> Result<BTreeMap<String, String>, PipelineError> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    let obj = v
        .as_object()
        .ok_or_else(|| err(key, "must be an object of strings".into()))?;
    for (k, v) in obj {
        let s = v
            .as_str()
            .ok_or_else(|| err(&format!("{key}.{k}"), "must be a string".into()))?;
        out.insert(k.clone(), s.to_string());
    }
    Ok(out)
}

/// A cycle of needs, `[a, b, a]`: `cycle a -> b -> a`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cycle {}", .0.join(" -> "))]
struct Cycle(Vec<String>);

/// The jobs in a topological order (smallest name first among those ready), or a cycle.
fn topological(jobs: Vec<JobDef>) -> Result<Vec<JobDef>, Cycle> {
    let mut left: BTreeMap<String, JobDef> =
        jobs.into_iter().map(|j| (j.name.clone(), j)).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while !left.is_empty() {
        let next = left
            .values()
            .find(|j| j.needs.iter().all(|n| done.contains(n)))
            .map(|j| j.name.clone());
        match next {
            Some(name) => {
                if let Some(j) = left.remove(&name) {
                    done.insert(name);
                    out.push(j);
                }
            }
            None => return Err(Cycle(find_cycle(&left))),
        }
    }
    Ok(out)
}

/// A cycle among `left` (each of which needs at least one other of `left`).
fn find_cycle(left: &BTreeMap<String, JobDef>) -> Vec<String> {
    let Some(mut cur) = left.keys().next().cloned() else {
        return Vec::new();
    };
    let mut path: Vec<String> = Vec::new();
    loop {
        if let Some(pos) = path.iter().position(|p| *p == cur) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(cur);
            return cycle;
        }
        path.push(cur.clone());
        let Some(next) = left
            .get(&cur)
            .and_then(|j| j.needs.iter().find(|n| left.contains_key(*n)))
        else {
            return path;
        };
        cur = next.clone();
    }
}

/// The triggers of `p` reach existing pipelines with params they declare and the ones they
/// require, and never `p` again.
fn check_triggers(
    projects_path: &Path,
    projects: &Path,
    p: &Pipeline,
) -> Result<(), PipelineError> {
    // Depth-first over the trigger graph from p; `path` is the chain of pipelines being visited.
    let mut loaded: BTreeMap<String, Pipeline> = BTreeMap::new();
    let mut visited: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<(String, Vec<String>)> = vec![(p.name.clone(), vec![p.name.clone()])];
    loaded.insert(p.name.clone(), p.clone());
    while let Some((name, path)) = stack.pop() {
        if !visited.insert(name.clone()) {
            continue;
        }
        let Some(cur) = loaded.get(&name).cloned() else {
            continue;
        };
        for (i, t) in cur.on_success.iter().enumerate() {
            let key = format!("on_success[{i}].pipeline");
            if t.pipeline == p.name {
                let mut chain = path.clone();
                chain.push(t.pipeline.clone());
                return Err(cur.invalid(&key, format!("trigger loop {}", chain.join(" -> "))));
            }
            if !loaded.contains_key(&t.pipeline) {
                let target = match Pipeline::load_one(projects_path, projects, &t.pipeline) {
                    Ok(target) => target,
                    Err(PipelineError::Unknown(n)) => {
                        return Err(cur.invalid(&key, format!("unknown pipeline \"{n}\"")))
                    }
                    Err(e) if cur.name == p.name => {
                        return Err(cur
                            .invalid(&key, format!("pipeline \"{}\" is invalid: {e}", t.pipeline)))
                    }
                    // A pipeline further down has its own errors; they are reported when it runs.
                    Err(_) => continue,
                };
                loaded.insert(t.pipeline.clone(), target);
            }
            if let Some(target) = loaded.get(&t.pipeline) {
                let pkey = format!("on_success[{i}].params");
                for k in t.params.keys() {
                    if !target.params.contains_key(k) {
                        return Err(cur.invalid(
                            &pkey,
                            format!("unknown param \"{k}\" of pipeline \"{}\"", t.pipeline),
                        ));
                    }
                }
                for (k, def) in &target.params {
                    if def.required && !t.params.contains_key(k) {
                        return Err(cur.invalid(
                            &pkey,
                            format!(
                                "missing required param \"{k}\" of pipeline \"{}\"",
                                t.pipeline
                            ),
                        ));
                    }
                }
            }
            let mut chain = path.clone();
            chain.push(t.pipeline.clone());
            stack.push((t.pipeline.clone(), chain));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse("assets", json.as_bytes().to_vec(), &|p| p != "nope")
    }

    const GOOD: &str = r#"{
      "params": {"branch": {"required": true}, "env": {"default": "production"}},
      "jobs": {
        "deps":   {"project": "example-deps", "params": {"branch": "{{branch}}"}, "group": "{{ branch }}"},
        "assets": {"project": "example-build", "params": {"env": "{{env}}-{{run}}"}, "needs": ["deps"]},
        "a": {"project": "x", "needs": ["assets"]}
      },
      "on_success": [{"pipeline": "notify", "params": {"deps_id": "{{jobs.deps.id}}"}}]
    }"#;

    #[test]
    fn a_good_definition() {
        let p = parse(GOOD).unwrap();
        let names: Vec<_> = p.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["deps", "assets", "a"]);
        assert_eq!(p.on_success[0].pipeline, "notify");
        let given = BTreeMap::from([("branch".to_string(), "main".to_string())]);
        let params = p.resolve_params(&given).unwrap();
        assert_eq!(
            params,
            BTreeMap::from([
                ("branch".to_string(), "main".to_string()),
                ("env".to_string(), "production".to_string())
            ])
        );
        let run = p.run_id(&params);
        assert_eq!(run.len(), 64);
        assert_eq!(run, p.run_id(&params));
        let mut other = params.clone();
        other.insert("env".into(), "staging".into());
        assert_ne!(run, p.run_id(&other));
        // The definition's bytes enter the ID.
        let p2 = parse(&GOOD.replace("production", "production ")).unwrap();
        assert_ne!(run, p2.run_id(&params));
        // Run IDs without NULs are kept (this one is the formula's before NULs were handled).
        assert_eq!(
            run,
            "9d5074470fa2e9fe1fd115a6f0ffa8d30f3a1736ac130f4be6975858435ca743"
        );
        // A value holding NUL-terminated params does not pass for them.
        let nul = BTreeMap::from([
            (
                "branch".to_string(),
                "main\0param\0env\0production".to_string(),
            ),
            ("env".to_string(), "x".to_string()),
        ]);
        let split = BTreeMap::from([
            ("branch".to_string(), "main".to_string()),
            ("env".to_string(), "production\0param\0env\0x".to_string()),
        ]);
        assert_ne!(p.run_id(&nul), p.run_id(&split));
        assert_ne!(p.run_id(&nul), run);
        let ids = BTreeMap::from([("deps".to_string(), "abc".to_string())]);
        let v = Values {
            params: &params,
            pipeline: "assets",
            run: "r1",
            job_ids: Some(&ids),
        };
        assert_eq!(
            expand("{{env}}-{{ run }}/{{pipeline}}", &v),
            "production-r1/assets"
        );
        assert_eq!(expand("id={{jobs.deps.id}}", &v), "id=abc");
        assert_eq!(expand("{{ branch }}", &v), "main");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"jobs": {"a": {"project": "x", "needs": ["dep"]}}}"#,
                r#"pipelines/assets.json: jobs.a.needs[0]: unknown job "dep""#,
            ),
            (
                r#"{"jobs": {"a": {"project": "x", "needs": ["b"]}, "b": {"project": "x", "needs": ["a"]}}}"#,
                "pipelines/assets.json: jobs.a.needs: cycle a -> b -> a",
            ),
            (
                r#"{"jobs": {"a": {"project": "nope"}}}"#,
                r#"pipelines/assets.json: jobs.a.project: unknown project "nope""#,
            ),
            (
                r#"{"jobs": {"a": {"project": "x", "params": {"v": "{{vv}}"}}}}"#,
                r#"pipelines/assets.json: jobs.a.params.v: unknown param "vv" in "{{vv}}""#,
            ),
            (
                r#"{"jobs": {"a": {"project": "x", "group": "{{jobs.a.id}}"}}}"#,
                "pipelines/assets.json: jobs.a.group: {{jobs.a.id}} is only known in on_success",
            ),
            (
                r#"{"jobs": {"a": {"project": "x", "params": {"v": "{{v"}}}}"#,
                r#"pipelines/assets.json: jobs.a.params.v: unclosed "{{" in "{{v""#,
            ),
            (
                r#"{"jobs": {"a": {"project": "x", "neds": []}}}"#,
                "pipelines/assets.json: jobs.a.neds: unknown key (expected one of: project, params, group, needs)",
            ),
            (
                r#"{"jobs": {}}"#,
                "pipelines/assets.json: jobs: no jobs defined",
            ),
            (
                r#"{"params": {"run": {}}, "jobs": {"a": {"project": "x"}}}"#,
                r#"pipelines/assets.json: params.run: "run" is reserved for templates ({{run}})"#,
            ),
            (
                r#"{"jobs": {"a": {"project": "x"}}, "on_success": [{"pipeline": "n", "params": {"x": "{{jobs.b.id}}"}}]}"#,
                r#"pipelines/assets.json: on_success[0].params.x: unknown job "b" in "{{jobs.b.id}}""#,
            ),
            (
                "{\n  \"jobs\": {\n    \"a\": {\"project\": \"x\",}\n  }\n}",
                "pipelines/assets.json: invalid JSON: trailing comma at line 3 column 26",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(parse(json).unwrap_err().to_string(), *want, "{json}");
        }
        let p = parse(GOOD).unwrap();
        assert_eq!(
            p.resolve_params(&BTreeMap::new()).unwrap_err().to_string(),
            r#"pipelines/assets.json: params.branch: missing required param "branch""#
        );
        let given = BTreeMap::from([
            ("branch".to_string(), "m".to_string()),
            ("x".to_string(), "1".to_string()),
        ]);
        assert_eq!(
            p.resolve_params(&given).unwrap_err().to_string(),
            r#"pipelines/assets.json: params: unknown param "x""#
        );
    }

    #[test]
    fn trigger_loops_and_targets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("pipelines")).unwrap();
        std::fs::create_dir_all(root.join("x")).unwrap();
        std::fs::write(root.join("x/Dockerfile"), "FROM busybox\n").unwrap();
        let write = |name: &str, json: &str| {
            std::fs::write(root.join("pipelines").join(format!("{name}.json")), json).unwrap();
        };
        let job = r#""jobs": {"j": {"project": "x"}}"#;
        write(
            "a",
            &format!(r#"{{{job}, "on_success": [{{"pipeline": "b"}}]}}"#),
        );
        write(
            "b",
            &format!(r#"{{{job}, "on_success": [{{"pipeline": "c"}}]}}"#),
        );
        write(
            "c",
            &format!(r#"{{{job}, "on_success": [{{"pipeline": "a"}}]}}"#),
        );
        let e = Pipeline::load(root, root, "a").unwrap_err().to_string();
        assert_eq!(
            e,
            "pipelines/c.json: on_success[0].pipeline: trigger loop a -> b -> c -> a"
        );
        write(
            "c",
            &format!(r#"{{"params": {{"p": {{"required": true}}}}, {job}}}"#),
        );
        let e = Pipeline::load(root, root, "a").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"pipelines/b.json: on_success[0].params: missing required param "p" of pipeline "c""#
        );
        write(
            "b",
            &format!(
                r#"{{{job}, "on_success": [{{"pipeline": "c", "params": {{"p": "1", "q": "2"}}}}]}}"#
            ),
        );
        let e = Pipeline::load(root, root, "a").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"pipelines/b.json: on_success[0].params: unknown param "q" of pipeline "c""#
        );
        write(
            "b",
            &format!(
                r#"{{{job}, "on_success": [{{"pipeline": "c", "params": {{"p": "1"}}}}, {{"pipeline": "zz"}}]}}"#
            ),
        );
        let e = Pipeline::load(root, root, "b").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"pipelines/b.json: on_success[1].pipeline: unknown pipeline "zz""#
        );
        write(
            "b",
            &format!(r#"{{{job}, "on_success": [{{"pipeline": "c", "params": {{"p": "1"}}}}]}}"#),
        );
        Pipeline::load(root, root, "a").unwrap();
        assert!(matches!(
            Pipeline::load(root, root, "missing"),
            Err(PipelineError::Unknown(_))
        ));
        assert_eq!(names(root), ["a", "b", "c"]);
    }
}
