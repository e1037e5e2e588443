//! Several agents around one PostgreSQL (issue 14) against a single node, on loopback, with the
//! image cached, side by side (the single node and the agents run together; their requests
//! alternate, so the machine's noise falls on both):
//!
//! - a result-cache hit (median): single node; an agent of a cluster holding the build (its
//!   disk answers first, the database is not asked); an agent that does not hold it (the job's
//!   record is read, the build fetched from its holder — each such job once). Target: the
//!   database adds ≤ 3 ms to a cache hit;
//! - a new job (median, new params each time, a single node's and a cluster agent's in turn):
//!   single node vs an agent of a cluster (insert, run, record the end). Target: ≤ 3 ms more;
//! - jobs/s with 1, 2 and 3 agents: `BENCH_CLIENTS` (default 6) clients each posting new-params
//!   jobs for `BENCH_SECONDS` (default 5), spread round-robin over the agents, and a single node
//!   for comparison; each cluster fresh (b1, b1–b2, b1–b3; the other agents stopped), each agent
//!   having run a job of the project alone first (so that each has its image, as in a cluster
//!   in use); `BENCH_ROUNDS` (default 2) rounds of the four, each figure their mean. All
//!   agents share this one machine, so "per machine" is the cluster's jobs/s over the single
//!   node's (target ≥ 0.9); "moved" counts the jobs that ran on another agent than the one
//!   asked (each one's build then fetched back to answer), "claimed" those that were queued
//!   in the records and claimed from there (the others ran where they were inserted);
//! - the CPU time per job in those runs: the single node's, and each cluster's agents' and
//!   PostgreSQL's (each daemon with its sandboxes, PostgreSQL with its backends: the process
//!   trees' user and system time from `/proc`; the clients not counted) — where the jobs/s
//!   ratio comes from, and the ratio of the agents' machines when PostgreSQL has its own.
//!
//! Each jobs/s phase starts after `BENCH_SETTLE` seconds (default 35) of rest, outside its
//! measure: on an ext4 without a journal (this machine's root), allocating an inode skips
//! every inode its block group freed in the last 30–35 s (`recently_deleted` in the kernel's
//! `ext4/ialloc.c`), so a phase right after another paid for the other's deletions — the
//! daemons' directories share block groups — about 0.5 ms per job, always to the phase that
//! came second (the agents, after the single node).
//!
//! `BENCH_SPLIT=1` splits the machine in two, for "per machine" with the database on a machine
//! of its own: the daemons (the single node, the agents) run on CPU 0 alone, PostgreSQL and the
//! clients on the other CPUs; a single node's machine and an agent's machine are then the
//! same one core. Every daemon's `job_concurrency` is the whole machine's CPU count (as
//! without the split) unless `BENCH_CONCURRENCY` says otherwise.
//!
//! A throwaway PostgreSQL 15 is started as tests/common/postgres.rs does (as mistry-test when
//! run as root). `cargo bench --bench cluster`, or `scripts/bench.sh cluster` (root and
//! rootless); `BENCH_RUNS` sets the number of timed requests (default 40), `BENCH_CONCURRENCY`
//! every daemon's `job_concurrency` (default: theirs, the number of CPUs).

mod common;
#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{median, ms, Daemon};
use serde_json::json;

/// Where the daemons run, and what they run with.
struct Setup {
    /// `BENCH_SPLIT`: the daemons on CPU 0 alone (the rest on the others).
    split: bool,
    /// Every daemon's `job_concurrency`, when set.
    concurrency: Option<usize>,
}

impl Setup {
    /// From the environment; with `BENCH_SPLIT`, this process (and so PostgreSQL and the
    /// clients, started from it) moves to the CPUs but 0.
    fn from_env() -> Setup {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let split = std::env::var_os("BENCH_SPLIT").is_some();
        let concurrency = std::env::var("BENCH_CONCURRENCY")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .or(split.then_some(cpus));
        if split {
            assert!(
                cpus >= 2,
                "BENCH_SPLIT needs 2 CPUs or more, this machine has {cpus}"
            );
            let mut rest = nix::sched::CpuSet::new();
            for cpu in 1..cpus {
                rest.set(cpu).expect("a CPU of the set");
            }
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &rest)
                .expect("moving the benchmark off CPU 0");
        }
        Setup { split, concurrency }
    }
}

/// One agent of the cluster (or a single node when `db` is `None`), in its own directory.
fn daemon(setup: &Setup, parent: &Path, name: &str, images: &Path, db: Option<&str>) -> Daemon {
    let dir = parent.join(name);
    common::touch_project(&dir.join("projects"));
    let mut extra = match db {
        Some(url) => json!({
            "database_url": url,
            "agent_name": name,
            "heartbeat": "1s",
            "agent_timeout": "10s",
        }),
        None => json!({}),
    };
    if let Some(n) = setup.concurrency {
        extra["job_concurrency"] = json!(n);
    }
    Daemon::start_on(
        &common::write_config(&dir, images, extra),
        setup.split.then_some("0"),
    )
}

/// `POST /jobs` of project `touch` with param `n`: its time; the answer's `Cached`.
fn post(agent: &ureq::Agent, d: &Daemon, n: &str) -> (Duration, bool) {
    let t = Instant::now();
    let mut r = agent
        .post(&format!("http://{}/jobs", d.addr))
        .send(
            json!({"project": "touch", "params": {"n": n}})
                .to_string()
                .as_str(),
        )
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    let took = t.elapsed();
    assert_eq!(r.status().as_u16(), 201, "{body}");
    assert!(body.contains("\"ExitCode\":0"), "{body}");
    (took, body.contains("\"Cached\":true"))
}

/// New-params jobs/s: `clients` threads posting for `seconds`, client i to agent i mod n; with
/// the jobs' count.
fn throughput(daemons: &[Daemon], prefix: &str, clients: usize, seconds: u64) -> (f64, usize) {
    let done = AtomicUsize::new(0);
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (d, done) = (&daemons[c % daemons.len()], &done);
            scope.spawn(move || {
                let agent = common::agent(Some(Duration::from_secs(120)));
                let mut i = 0;
                while Instant::now() < until {
                    post(&agent, d, &format!("{prefix}-{c}-{i}"));
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
    });
    let done = done.load(Ordering::Relaxed);
    (done as f64 / start.elapsed().as_secs_f64(), done)
}

/// CPU time per job, in ms: `cpu` over `jobs`.
fn per_job(cpu: Duration, jobs: usize) -> f64 {
    ms(cpu) / jobs.max(1) as f64
}

fn main() {
    // First: PostgreSQL and the clients' threads inherit this process's CPUs.
    let setup = Setup::from_env();
    let settle = Duration::from_secs(common::env_num("BENCH_SETTLE", 35));
    let images = common::busybox_images();
    let runs: usize = common::env_num("BENCH_RUNS", 40);
    let clients: usize = common::env_num("BENCH_CLIENTS", 6);
    let seconds: u64 = common::env_num("BENCH_SECONDS", 5);
    let rounds: usize = common::env_num("BENCH_ROUNDS", 2).max(1);
    let Some(pg) = postgres::Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = common::agent(Some(Duration::from_secs(120)));

    // A single node, and two agents of a cluster: a1 runs the jobs, a2 answers them from the
    // database.
    let single = daemon(&setup, dir.path(), "single", &images, None);
    let a1 = daemon(&setup, dir.path(), "a1", &images, Some(&pg.url()));
    let a2 = daemon(&setup, dir.path(), "a2", &images, Some(&pg.url()));
    post(&agent, &single, "warm");
    post(&agent, &a1, "warm-a1");
    post(&agent, &a2, "warm-a2");
    // New jobs, a single node's and a cluster agent's in turn.
    let (mut single_new, mut cluster_new): (Vec<Duration>, Vec<Duration>) = (0..runs)
        .map(|i| {
            (
                post(&agent, &single, &format!("s{i}")).0,
                post(&agent, &a1, &format!("c{i}")).0,
            )
        })
        .unzip();
    let (mut single_hit, mut holder_hit): (Vec<Duration>, Vec<Duration>) = (0..200)
        .map(|_| (post(&agent, &single, "s0").0, post(&agent, &a1, "c0").0))
        .unzip();
    let mut remote_hit: Vec<Duration> = (0..runs)
        .map(|i| {
            let (t, cached) = post(&agent, &a2, &format!("c{i}"));
            assert!(cached, "c{i} on a2 was not a cache hit");
            t
        })
        .collect();
    let mut copy_hit: Vec<Duration> = (0..200).map(|_| post(&agent, &a2, "c0").0).collect();

    // jobs/s: a single node, then clusters of 1, 2, 3 agents b1.. (the others stopped: idle
    // agents would take queued jobs), in rounds. Each agent runs a job of the project alone
    // first, so that each has the project's image as a cluster in use does.
    drop((a1, a2));
    let stop_all = || pg.psql("UPDATE agents SET stopped_at = now(), running = 0");
    stop_all();
    let names = ["b1", "b2", "b3"];
    for name in names {
        let d = daemon(&setup, dir.path(), name, &images, Some(&pg.url()));
        post(&agent, &d, &format!("warm-{name}"));
        drop(d);
        stop_all();
    }
    assert_eq!(
        pg.psql(
            "SELECT string_agg(agent, ',' ORDER BY agent) FROM agent_images WHERE agent LIKE 'b%'"
        ),
        "b1,b2,b3"
    );
    let (mut single_rps, mut rps, mut moved) = (0.0, [0.0; 3], [(0u64, 0u64, 0u64); 3]);
    // CPU time and jobs: the single node's; each cluster's agents' and PostgreSQL's.
    let mut single_cpu = (Duration::ZERO, 0);
    let mut cluster_cpu = [(Duration::ZERO, Duration::ZERO, 0); 3];
    for round in 0..rounds {
        let prefix = format!("ts{round}");
        std::thread::sleep(settle);
        let before = common::tree_cpu(single.pid());
        let (one, jobs) = throughput(std::slice::from_ref(&single), &prefix, clients, seconds);
        single_cpu.0 += common::tree_cpu(single.pid()) - before;
        single_cpu.1 += jobs;
        single_rps += one;
        for (k, ((r, m), c)) in rps
            .iter_mut()
            .zip(&mut moved)
            .zip(&mut cluster_cpu)
            .enumerate()
        {
            let agents: Vec<Daemon> = names[..=k]
                .iter()
                .map(|name| daemon(&setup, dir.path(), name, &images, Some(&pg.url())))
                .collect();
            let prefix = format!("t{k}r{round}");
            let cpu = || -> Duration { agents.iter().map(|d| common::tree_cpu(d.pid())).sum() };
            std::thread::sleep(settle);
            let before = (cpu(), common::tree_cpu(pg.pid()));
            let (one, jobs) = throughput(&agents, &prefix, clients, seconds);
            c.0 += cpu() - before.0;
            c.1 += common::tree_cpu(pg.pid()) - before.1;
            c.2 += jobs;
            *r += one;
            drop(agents);
            stop_all();
            // Client c asked agent c mod (k + 1), b<c mod (k + 1) + 1>.
            // A job inserted `running` starts in its insert's transaction (`now()` is the
            // transaction's time); a queued one when it is claimed, later.
            let counted = pg.psql(&format!(
                "SELECT count(*) FILTER (WHERE agent <> 'b' ||
                          (split_part(request->'params'->>'n', '-', 2)::int % {n} + 1)),
                        count(*), count(*) FILTER (WHERE started_at > queued_at)
                   FROM jobs WHERE request->'params'->>'n' LIKE '{prefix}-%'",
                n = k + 1
            ));
            let figures: Vec<u64> = counted.split('|').map(|f| f.parse().unwrap()).collect();
            m.0 += figures[0];
            m.1 += figures[1];
            m.2 += figures[2];
        }
    }
    single_rps /= rounds as f64;
    rps.iter_mut().for_each(|r| *r /= rounds as f64);
    let started = pg.psql("SELECT count(*) FROM jobs");

    let (s_hit, h_hit) = (ms(median(&mut single_hit)), ms(median(&mut holder_hit)));
    let (r_hit, c_hit) = (ms(median(&mut remote_hit)), ms(median(&mut copy_hit)));
    let (s_new, c_new) = (ms(median(&mut single_new)), ms(median(&mut cluster_new)));
    println!(
        "mistryd on loopback, image cached: a single node vs agents sharing a PostgreSQL 15 \
         ({runs} new jobs, 200 cache hits; {clients} clients for {seconds}s, {rounds} rounds, \
         {}s of rest before each; {started} job records)",
        settle.as_secs()
    );
    if setup.split {
        println!(
            "split machine: the daemons on CPU 0 alone, PostgreSQL and the clients on the \
             others (job_concurrency {})",
            setup.concurrency.unwrap_or_default()
        );
    }
    println!("{:<58} {:>10}   target", "", "measured");
    println!("{:<58} {:>8.2}ms", "cache hit, single node (median)", s_hit);
    println!(
        "{:<58} {:>8.2}ms   <= single + 3 ms ({:+.2} ms)",
        "cache hit, agent holding the build (median)",
        h_hit,
        h_hit - s_hit
    );
    println!(
        "{:<58} {:>8.2}ms   <= single + 3 ms ({:+.2} ms)",
        "cache hit, agent with its fetched copy (median)",
        c_hit,
        c_hit - s_hit
    );
    println!(
        "{:<58} {:>8.2}ms   (record read + build fetched: {:+.2} ms)",
        "cache hit, build on another agent, first time (median)",
        r_hit,
        r_hit - s_hit
    );
    println!("{:<58} {:>8.1}ms", "new job, single node (median)", s_new);
    println!(
        "{:<58} {:>8.1}ms   <= single + 3 ms ({:+.1} ms)",
        "new job, cluster agent (median)",
        c_new,
        c_new - s_new
    );
    println!("{:<58} {:>10.1}", "jobs/s, single node", single_rps);
    // "1 agent", "2 agents", ... for cluster k (0-based).
    let agents = |k: usize| format!("{} agent{}", k + 1, if k == 0 { "" } else { "s" });
    for (k, r) in rps.iter().enumerate() {
        println!(
            "{:<58} {:>10.1}   >= 0.9 x single per machine ({:.2} x; moved {}/{}, claimed {})",
            format!("jobs/s, {}", agents(k)),
            r,
            r / single_rps,
            moved[k].0,
            moved[k].1,
            moved[k].2
        );
    }
    // Where a job's CPU time goes (the daemons with their sandboxes; the clients not counted).
    println!(
        "{:<58} {:>8.2}ms",
        "CPU per job, single node",
        per_job(single_cpu.0, single_cpu.1)
    );
    for (k, (daemons, db, jobs)) in cluster_cpu.iter().enumerate() {
        let (a, d) = (per_job(*daemons, *jobs), per_job(*db, *jobs));
        println!(
            "{:<58} {:>8.2}ms   (agents {a:.2} + PostgreSQL {d:.2})",
            format!("CPU per job, {}", agents(k)),
            a + d
        );
    }
}
