//! Pipelines end to end over HTTP: a real mistryd, busybox projects and pipeline definitions
//! written by each test into the server's projects directory.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pipelines::{
    get_json, job, job_fields, post_run, script_project, write, write_pipeline,
};
use common::server::{read, Server};
use serde_json::{json, Value};

/// Writes `text` to `/data/artifacts/out.txt` (after `sleep` seconds), exits with `code`.
const PRODUCE_SH: &str = r#"#!/bin/sh
p() { cat "/data/params/$1" 2>/dev/null; }
echo "producing $(p text)"
if [ -n "$(p sleep)" ]; then sleep "$(p sleep)"; fi
p text > /data/artifacts/out.txt
echo >> /data/artifacts/out.txt
code=$(p code)
exit "${code:-0}"
"#;

/// Reads its inputs `left` and `right`, and checks it cannot write them.
const COMBINE_SH: &str = r#"#!/bin/sh
set -e
echo combining
ls /data/input > /data/artifacts/inputs.txt
cat /data/input/left/out.txt /data/input/right/out.txt > /data/artifacts/combined.txt
if touch /data/input/left/new 2>/dev/null; then echo writable; else echo read-only; fi > /data/artifacts/ro.txt
"#;

fn projects(s: &Server) -> PathBuf {
    s.dir.path().join("projects")
}

/// The projects `producer` and `combine`, and the pipelines `(name, definition)`.
fn setup(s: &Server, pipelines: &[(&str, Value)]) {
    let root = projects(s);
    script_project(&root, "producer", PRODUCE_SH);
    script_project(&root, "combine", COMBINE_SH);
    for (name, def) in pipelines {
        write_pipeline(&root, name, &serde_json::to_string_pretty(def).unwrap());
    }
}

fn diamond() -> Value {
    json!({
        "params": {"left": {"required": true}, "right": {"default": "R"}},
        "jobs": {
            "left": {"project": "producer", "params": {"text": "{{left}}"}},
            "right": {"project": "producer", "params": {"text": "{{right}}"}},
            "combine": {"project": "combine", "needs": ["left", "right"]}
        }
    })
}

fn run(s: &Server, body: Value) -> Value {
    post_run(s, &body)
}

fn states(rec: &Value) -> Vec<(String, String)> {
    job_fields(rec, "state")
}

fn artifact(rec: &Value, name: &str, file: &str) -> String {
    read(Path::new(job(rec, name)["path"].as_str().unwrap()).join(file))
}

fn stored(s: &Server, rec: &Value) -> Value {
    let path = s
        .builds()
        .join(".pipelines")
        .join(rec["pipeline"].as_str().unwrap())
        .join(rec["run"].as_str().unwrap())
        .join("run.json");
    serde_json::from_str(&read(path)).unwrap()
}

/// The string field `field` of each element of the array `list`.
fn field_of_each<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e[field].as_str().unwrap())
        .collect()
}

/// Each of `lines` is a whole line of `/metrics`.
fn assert_metrics(s: &Server, lines: &[&str]) {
    let (_, metrics) = s.get("/metrics", false);
    for line in lines {
        assert!(
            metrics.contains(&format!("{line}\n")),
            "{line} missing from:\n{metrics}"
        );
    }
}

fn ready_dirs(s: &Server, project: &str) -> usize {
    std::fs::read_dir(s.builds().join(project).join("ready")).map_or(0, std::iter::Iterator::count)
}

#[test]
fn diamond_inputs_cache_hits_and_changed_params() {
    let s = Server::start(json!({}));
    setup(&s, &[("diamond", diamond())]);

    // Two independent jobs, one needing both; it reads their artifacts, read-only.
    let first = run(&s, json!({"pipeline": "diamond", "params": {"left": "L1"}}));
    assert_eq!(first["state"], "succeeded", "{first}");
    assert_eq!(first["pipeline"], "diamond");
    let run_id = first["run"].as_str().unwrap().to_string();
    assert_eq!(run_id.len(), 64);
    assert_eq!(first["url"], format!("pipeline/diamond/{run_id}"));
    assert_eq!(first["params"], json!({"left": "L1", "right": "R"}));
    assert_eq!(
        states(&first),
        [("left", "ready"), ("right", "ready"), ("combine", "ready")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(first["failed"], json!([]));
    assert_eq!(first["triggered"], json!([]));
    assert_eq!(first["caused_by"], Value::Null);
    assert!(first["duration"].as_i64().unwrap() > 0);
    for name in ["left", "right", "combine"] {
        let j = job(&first, name);
        assert_eq!(j["exit_code"], 0, "{j}");
        assert_eq!(j["cached"], false, "{j}");
        assert_eq!(j["err_build"], "", "{j}");
        let id = j["id"].as_str().unwrap();
        assert_eq!(
            j["url"],
            format!("job/{}/{id}", j["project"].as_str().unwrap())
        );
    }
    assert_eq!(job(&first, "combine")["needs"], json!(["left", "right"]));
    assert_eq!(artifact(&first, "left", "out.txt"), "L1\n");
    assert_eq!(artifact(&first, "combine", "combined.txt"), "L1\nR\n");
    assert_eq!(artifact(&first, "combine", "inputs.txt"), "left\nright\n");
    assert_eq!(artifact(&first, "combine", "ro.txt"), "read-only\n");
    // The upstream builds are untouched.
    assert_eq!(artifact(&first, "left", "out.txt"), "L1\n");
    assert!(!Path::new(job(&first, "left")["path"].as_str().unwrap())
        .join("new")
        .exists());
    assert_eq!(
        (ready_dirs(&s, "producer"), ready_dirs(&s, "combine")),
        (2, 1)
    );

    // Stored, and served as JSON (Accept or Content-Type) and as a page.
    assert_eq!(stored(&s, &first), first);
    assert_eq!(get_json(&s, &format!("/pipeline/diamond/{run_id}")), first);
    let mut r = Server::agent()
        .get(&s.url(&format!("/pipeline/diamond/{run_id}")))
        .header("Accept", "application/json")
        .call()
        .unwrap();
    let accepted: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(accepted, first);
    let (status, page) = s.get(&format!("/pipeline/diamond/{run_id}"), false);
    assert_eq!(status, 200);
    assert!(page.contains("<h1>Pipeline diamond"), "{page}");
    assert!(
        page.contains(&format!(
            "href=\"/job/combine/{}\"",
            job(&first, "combine")["id"].as_str().unwrap()
        )),
        "{page}"
    );
    let (status, text) = s.get(&format!("/pipeline/diamond/{}", "0".repeat(64)), true);
    assert_eq!(
        (status, text),
        (
            404,
            format!("Unknown pipeline run diamond/{}", "0".repeat(64))
        )
    );

    // The same run again: the same run ID, every job from the result cache, none ran again.
    let again = run(
        &s,
        json!({"pipeline": "diamond", "params": {"left": "L1", "right": "R"}}),
    );
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["run"], first["run"]);
    for name in ["left", "right", "combine"] {
        let (a, b) = (job(&again, name), job(&first, name));
        assert_eq!(a["cached"], true, "{a}");
        assert_eq!(a["coalesced"], false, "{a}");
        assert_eq!(a["id"], b["id"]);
        assert_eq!(a["state"], "ready");
    }
    assert_eq!(
        (ready_dirs(&s, "producer"), ready_dirs(&s, "combine")),
        (2, 1)
    );
    let log =
        read(Path::new(job(&first, "combine")["path"].as_str().unwrap()).join("../../out.log"));
    assert_eq!(log.matches("combining").count(), 1, "{log}");

    // Another left: left and combine are new jobs; right is the same, from the cache.
    let changed = run(&s, json!({"pipeline": "diamond", "params": {"left": "L2"}}));
    assert_eq!(changed["state"], "succeeded", "{changed}");
    assert_ne!(changed["run"], first["run"]);
    assert_ne!(job(&changed, "left")["id"], job(&first, "left")["id"]);
    assert_ne!(job(&changed, "combine")["id"], job(&first, "combine")["id"]);
    assert_eq!(job(&changed, "right")["id"], job(&first, "right")["id"]);
    assert_eq!(
        [
            &job(&changed, "left")["cached"],
            &job(&changed, "right")["cached"],
            &job(&changed, "combine")["cached"]
        ],
        [&json!(false), &json!(true), &json!(false)]
    );
    assert_eq!(artifact(&changed, "combine", "combined.txt"), "L2\nR\n");
    assert_eq!(
        (ready_dirs(&s, "producer"), ready_dirs(&s, "combine")),
        (3, 2)
    );

    // The runs are listed, newest first; counted in the metrics.
    let index = get_json(&s, "/pipelines/index/");
    let runs = field_of_each(&index, "run");
    assert_eq!(
        runs,
        [
            changed["run"].as_str().unwrap(),
            first["run"].as_str().unwrap()
        ]
    );
    assert_metrics(
        &s,
        &[
            "mistry_pipeline_runs_started_total 3",
            "mistry_pipeline_runs_finished_total{outcome=\"success\"} 3",
        ],
    );
}

#[test]
fn a_failed_job_skips_its_dependents_only() {
    let s = Server::start(json!({}));
    setup(
        &s,
        &[
            (
                "broken",
                json!({
                    "jobs": {
                        "bad": {"project": "producer", "params": {"text": "bad", "code": "3"}},
                        "after": {"project": "producer", "params": {"text": "after"}, "needs": ["bad"]},
                        "last": {"project": "producer", "params": {"text": "last"}, "needs": ["after"]},
                        "alone": {"project": "producer", "params": {"text": "alone"}}
                    },
                    "on_success": [{"pipeline": "broken2"}]
                }),
            ),
            ("broken2", json!({"jobs": {"x": {"project": "producer"}}})),
        ],
    );
    let rec = run(&s, json!({"pipeline": "broken"}));
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["failed"], json!(["bad"]));
    assert_eq!(
        states(&rec),
        [
            ("alone", "ready"),
            ("bad", "failed"),
            ("after", "skipped"),
            ("last", "skipped")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(job(&rec, "bad")["exit_code"], 3);
    assert_eq!(job(&rec, "alone")["exit_code"], 0);
    assert_eq!(artifact(&rec, "alone", "out.txt"), "alone\n");
    for name in ["after", "last"] {
        assert_eq!(job(&rec, name)["id"], "", "{rec}");
        assert_eq!(job(&rec, name)["exit_code"], -999, "{rec}");
    }
    // Not triggered: the run failed.
    assert_eq!(rec["triggered"], json!([]));
    assert_eq!(ready_dirs(&s, "producer"), 2);
    assert_eq!(stored(&s, &rec), rec);
    assert_metrics(
        &s,
        &["mistry_pipeline_runs_finished_total{outcome=\"failed\"} 1"],
    );
}

#[test]
fn on_success_triggers_are_linked_both_ways() {
    let s = Server::start(json!({}));
    setup(
        &s,
        &[
            (
                "first",
                json!({
                    "params": {"v": {"required": true}},
                    "jobs": {"one": {"project": "producer", "params": {"text": "{{v}}"}}},
                    "on_success": [{"pipeline": "second", "params": {"from": "{{pipeline}}:{{run}}", "up": "{{jobs.one.id}}"}}]
                }),
            ),
            (
                "second",
                json!({
                    "params": {"from": {"required": true}, "up": {"required": true}},
                    "jobs": {"two": {"project": "producer", "params": {"text": "{{up}}"}}}
                }),
            ),
        ],
    );
    let first = run(&s, json!({"pipeline": "first", "params": {"v": "hello"}}));
    assert_eq!(first["state"], "succeeded", "{first}");
    let one_id = job(&first, "one")["id"].as_str().unwrap().to_string();
    let first_run = first["run"].as_str().unwrap().to_string();
    let triggered = first["triggered"].as_array().unwrap();
    assert_eq!(triggered.len(), 1, "{first}");
    let second_run = triggered[0]["run"].as_str().unwrap().to_string();
    assert_eq!(
        triggered[0],
        json!({"pipeline": "second", "run": second_run, "url": format!("pipeline/second/{second_run}")})
    );
    let path = format!("/pipeline/second/{second_run}");
    let mut second = Value::Null;
    common::wait_for("the triggered run", Duration::from_secs(60), || {
        second = get_json(&s, &path);
        second["state"] != "running"
    });
    assert_eq!(second["state"], "succeeded", "{second}");
    assert_eq!(
        second["caused_by"],
        json!({"pipeline": "first", "run": first_run, "url": format!("pipeline/first/{first_run}")})
    );
    assert_eq!(
        second["params"],
        json!({"from": format!("first:{first_run}"), "up": one_id})
    );
    assert_eq!(artifact(&second, "two", "out.txt"), format!("{one_id}\n"));
    assert_eq!(stored(&s, &first)["triggered"], first["triggered"]);
    // The events of an ended run: its record, once.
    let events = sse(&s, &format!("/pipeline/second/{second_run}/events"));
    assert_eq!(events, [second.clone()]);
}

/// The `data:` events of an SSE stream, until it ends.
fn sse(s: &Server, path: &str) -> Vec<Value> {
    let r = Server::agent().get(&s.url(path)).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let reader = BufReader::new(r.into_body().into_reader());
    reader
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            l.strip_prefix("data: ")
                .or(l.strip_prefix("data:"))
                .map(str::to_string)
        })
        .map(|d| serde_json::from_str(&d).unwrap())
        .collect()
}

#[test]
fn identical_concurrent_runs_coalesce_and_events_follow() {
    let s = Server::start(json!({}));
    setup(
        &s,
        &[(
            "slow",
            json!({
                "params": {"n": {"default": "x"}},
                "jobs": {
                    "a": {"project": "producer", "params": {"text": "slow-{{n}}", "sleep": "2"}},
                    "b": {"project": "producer", "params": {"text": "b-{{n}}"}, "needs": ["a"]},
                    "c": {"project": "producer", "params": {"text": "c-{{n}}", "sleep": "2"}}
                }
            }),
        )],
    );
    let (status, text) = s.post("/pipelines?async", &json!({"pipeline": "slow"}).to_string());
    assert_eq!(status, 201, "{text}");
    let started: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(started["state"], "running");
    assert_eq!(started["duration"], -1);
    assert_eq!(
        states(&started),
        [("a", "waiting"), ("b", "waiting"), ("c", "waiting")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let run_id = started["run"].as_str().unwrap().to_string();
    let events_path = format!("/pipeline/slow/{run_id}/events");
    let followers: Vec<_> = (0..2)
        .map(|_| {
            let (addr, body) = (
                s.url("/pipelines"),
                json!({"pipeline": "slow", "params": {"n": "x"}}).to_string(),
            );
            std::thread::spawn(move || {
                let mut r = Server::agent().post(&addr).send(body).unwrap();
                (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
            })
        })
        .collect();
    let events = sse(&s, &events_path);
    let last = events.last().unwrap().clone();
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(events[0]["state"], "running");
    let seen: Vec<String> = events
        .iter()
        .map(|e| job(e, "a")["state"].as_str().unwrap().to_string())
        .collect();
    assert!(seen.iter().any(|s| s == "pending"), "{seen:?}");
    // a and c run at once; b waits for a.
    assert!(
        events
            .iter()
            .any(|e| job(e, "a")["state"] == "pending" && job(e, "c")["state"] == "pending"),
        "{events:?}"
    );
    for e in &events {
        if job(e, "b")["state"] != "waiting" {
            assert_eq!(job(e, "a")["state"], "ready", "{e}");
        }
    }
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["state"] == "running"));
    for f in followers {
        let (status, text) = f.join().unwrap();
        assert_eq!(status, 201, "{text}");
        let rec: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(rec, last);
    }
    // Each job ran once.
    assert_eq!(ready_dirs(&s, "producer"), 3);
    for name in ["a", "b", "c"] {
        assert_eq!(job(&last, name)["cached"], false);
        let log = read(Path::new(job(&last, name)["path"].as_str().unwrap()).join("../../out.log"));
        assert_eq!(log.matches("producing").count(), 1, "{log}");
    }
    assert_metrics(
        &s,
        &[
            "mistry_pipeline_runs_coalesced_total 2",
            "mistry_pipeline_runs_started_total 1",
        ],
    );
}

#[test]
fn definitions_are_validated_with_file_and_key() {
    let s = Server::start(json!({}));
    let job = |project: &str| json!({"project": project});
    setup(
        &s,
        &[
            (
                "good",
                json!({"params": {"v": {"required": true}, "w": {"default": "1"}}, "jobs": {"one": job("producer"), "two": {"project": "combine", "needs": ["one"]}}}),
            ),
            (
                "cyclic",
                json!({"jobs": {"a": {"project": "producer", "needs": ["b"]}, "b": {"project": "producer", "needs": ["a"]}}}),
            ),
            ("noproject", json!({"jobs": {"a": job("nosuch")}})),
            (
                "unknownjob",
                json!({"jobs": {"a": {"project": "producer", "needs": ["dep"]}}}),
            ),
            (
                "template",
                json!({"jobs": {"a": {"project": "producer", "params": {"x": "{{y}}"}}}}),
            ),
            (
                "loop1",
                json!({"jobs": {"a": job("producer")}, "on_success": [{"pipeline": "loop2"}]}),
            ),
            (
                "loop2",
                json!({"jobs": {"a": job("producer")}, "on_success": [{"pipeline": "loop1"}]}),
            ),
        ],
    );
    write(
        &projects(&s).join("pipelines/syntax.json"),
        "{\n  \"jobs\": {\n    \"a\": {\"project\": \"producer\"\n  }\n",
    );
    let post = |body: Value| s.post("/pipelines", &body.to_string());
    let bad = |name: &str| post(json!({"pipeline": name, "params": {}}));
    let cases: &[(&str, u16, &str)] = &[
        (
            "cyclic",
            400,
            "pipelines/cyclic.json: jobs.a.needs: cycle a -> b -> a",
        ),
        (
            "noproject",
            400,
            "pipelines/noproject.json: jobs.a.project: unknown project \"nosuch\"",
        ),
        (
            "unknownjob",
            400,
            "pipelines/unknownjob.json: jobs.a.needs[0]: unknown job \"dep\"",
        ),
        (
            "template",
            400,
            "pipelines/template.json: jobs.a.params.x: unknown param \"y\" in \"{{y}}\"",
        ),
        (
            "loop1",
            400,
            "pipelines/loop2.json: on_success[0].pipeline: trigger loop loop1 -> loop2 -> loop1",
        ),
        (
            "syntax",
            400,
            "pipelines/syntax.json: invalid JSON: EOF while parsing an object at line 5 column 0",
        ),
        (
            "good",
            400,
            "pipelines/good.json: params.v: missing required param \"v\"",
        ),
        ("nosuch", 404, "Unknown pipeline 'nosuch'"),
        ("../good", 404, "Unknown pipeline '../good'"),
    ];
    for (name, status, text) in cases {
        assert_eq!(bad(name), (*status, text.to_string()), "{name}");
    }
    assert_eq!(
        post(json!({"pipeline": "good", "params": {"v": "1", "zz": "2"}})),
        (
            400,
            "pipelines/good.json: params: unknown param \"zz\"".to_string()
        )
    );
    assert_eq!(post(json!({})), (400, "no pipeline given".to_string()));
    let (status, text) = s.post("/pipelines", "{nope");
    assert_eq!(status, 400);
    assert!(
        text.starts_with("Error unmarshalling body '{nope' to Pipeline: "),
        "{text}"
    );
    // Another site's page may not start runs.
    let mut r = Server::agent()
        .post(&s.url("/pipelines"))
        .header("Origin", "http://evil.example")
        .send(json!({"pipeline": "good", "params": {"v": "1"}}).to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let text = r.body_mut().read_to_string().unwrap();
    assert!(text.starts_with("Cross-origin request refused"), "{text}");
    // Nothing ran.
    assert_eq!(ready_dirs(&s, "producer"), 0);
    assert!(!s.builds().join(".pipelines").exists());

    // The list, by name; invalid definitions say why.
    let list = get_json(&s, "/pipelines");
    let names = field_of_each(&list, "name");
    assert_eq!(
        names,
        [
            "cyclic",
            "good",
            "loop1",
            "loop2",
            "noproject",
            "syntax",
            "template",
            "unknownjob"
        ]
    );
    // The entry of the pipeline `name` in the list.
    let named = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
    };
    let good = named("good");
    assert_eq!(
        *good,
        json!({"name": "good", "params": {"v": {"required": true}, "w": {"default": "1"}}, "jobs": ["one", "two"]})
    );
    let cyclic = named("cyclic");
    assert_eq!(
        cyclic["error"],
        "pipelines/cyclic.json: jobs.a.needs: cycle a -> b -> a"
    );
}

#[test]
fn a_run_interrupted_by_a_crash_is_failed_at_restart() {
    let mut s = Server::start(json!({}));
    setup(
        &s,
        &[(
            "slow",
            json!({"jobs": {
                "a": {"project": "producer", "params": {"text": "a", "sleep": "30"}},
                "b": {"project": "producer", "needs": ["a"]}
            }}),
        )],
    );
    let (status, text) = s.post("/pipelines?async", &json!({"pipeline": "slow"}).to_string());
    assert_eq!(status, 201, "{text}");
    let rec: Value = serde_json::from_str(&text).unwrap();
    let path = format!("/pipeline/slow/{}", rec["run"].as_str().unwrap());
    common::wait_until("the job to run", || s.pending_dirs("producer") > 0);
    common::wait_until("the stored record to say so", || {
        job(&stored(&s, &rec), "a")["state"] == "pending"
    });
    s.kill9();
    s.spawn();
    let mut after = Value::Null;
    common::wait_until("the run to be failed", || {
        after = get_json(&s, &path);
        after["state"] != "running"
    });
    assert_eq!(after["state"], "failed");
    assert_eq!(after["error"], "mistryd stopped during the run");
    assert_eq!(
        states(&after),
        [("a", "failed"), ("b", "skipped")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(
        job(&after, "a")["err_build"],
        "mistryd stopped before the job ended"
    );
    assert_eq!(after["failed"], json!(["a"]));
    assert_eq!(stored(&s, &rec), after);
}

#[test]
fn a_full_backlog_is_503() {
    let s = Server::start(json!({"job_concurrency": 1, "job_backlog": 0}));
    setup(
        &s,
        &[(
            "one",
            json!({"jobs": {"a": {"project": "producer", "params": {"text": "a"}}}}),
        )],
    );
    s.start_slow_job("busy", "5");
    let (status, text) = s.post("/pipelines", &json!({"pipeline": "one"}).to_string());
    assert_eq!(status, 503, "{text}");
    let run = text
        .strip_prefix("Server is overloaded; try again later (pipeline one run ")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text}"));
    let rec = get_json(&s, &format!("/pipeline/one/{run}"));
    assert_eq!(rec["state"], "failed");
    assert_eq!(rec["failed"], json!(["a"]));
    assert_eq!(
        job(&rec, "a")["err_build"],
        "Server is overloaded; try again later"
    );
}
