//! `mistryd doctor [--config C]`: check what a host needs to run mistryd's jobs, and say how to
//! fix what is missing. One line per check, `ok|warn|FAIL  what  — how to fix`; FAIL is what
//! blocks jobs (the exit code is then 1).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandbox::{Bind, IdMap, IdMapping, NetworkMode, Sandbox};

use crate::config::{human_bytes, Config};
use crate::security::SandboxIds;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Works as it should.
    Ok,
    /// Does not block jobs, but is weaker, slower or riskier than it could be (the fix says
    /// what to do).
    Warn,
    /// Blocks jobs.
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One finding: what was checked (and found), and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// How bad it is.
    pub level: Level,
    /// What was checked and found, one line.
    pub what: String,
    /// How to fix it; empty when there is nothing to do.
    pub fix: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<4}  {}", self.level.word(), self.what)?;
        if !self.fix.is_empty() {
            write!(f, "  — {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every finding, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// The findings, in the order they were checked.
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, level: Level, what: impl Into<String>, fix: impl Into<String>) {
        self.checks.push(Check {
            level,
            what: what.into(),
            fix: fix.into(),
        });
    }
    fn ok(&mut self, what: impl Into<String>) {
        self.add(Level::Ok, what, "");
    }
    fn warn(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Warn, what, fix);
    }
    fn fail(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Fail, what, fix);
    }

    /// 1 when a check failed, else 0.
    pub fn code(&self) -> i32 {
        i32::from(self.checks.iter().any(|c| c.level == Level::Fail))
    }
}

/// The calling user: name (if any), uid.
fn whoami() -> (Option<String>, u32) {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    (name, uid.as_raw())
}

/// Run every check. `config`: the configuration file; `ids`: `--sandbox-ids` if given.
pub fn check(config: &Path, ids: Option<SandboxIds>) -> Report {
    let mut r = Report::default();
    let root = nix::unistd::geteuid().is_root();
    let cfg = match Config::load(config) {
        Ok(mut c) => {
            if let Some(ids) = ids {
                c.sandbox_ids = ids;
            }
            r.ok(format!("configuration {} loads", config.display()));
            Some(c)
        }
        Err(e) => {
            r.fail(
                format!("configuration {}: {e:#}", config.display()),
                "fix the file (docs/operators.md, \"Configuration\"); the host checks below still ran",
            );
            None
        }
    };
    let sandbox_ids = cfg
        .as_ref()
        .map(|c| c.sandbox_ids)
        .or(ids)
        .unwrap_or_default();
    sandbox::set_default_id_mapping(match sandbox_ids {
        SandboxIds::Auto => IdMapping::Auto,
        SandboxIds::Subordinate => IdMapping::Subordinate,
    });
    check_user(&mut r, root, sandbox_ids);
    check_userns(&mut r, root);
    let mapping = check_mapping(&mut r, root, sandbox_ids);
    check_subordinate_files(&mut r);
    check_sandbox(&mut r);
    if let Some(cfg) = &cfg {
        check_paths(&mut r, cfg);
        check_overlay(&mut r, cfg, mapping.as_ref());
        check_btrfs(&mut r, cfg, root);
        check_incremental(&mut r, cfg);
    }
    check_cgroups(&mut r, root);
    if let Some(cfg) = &cfg {
        check_network(&mut r, cfg, root);
        check_registries(&mut r, cfg);
        check_database(&mut r, cfg);
        check_access(&mut r, cfg);
    }
    r
}

/// Access control: off (a warning: mistryd listens on every address by default), or how many
/// tokens and rules.
fn check_access(r: &mut Report, cfg: &Config) {
    let (tokens, rules) = cfg.access.counts();
    if !cfg.access.enabled() {
        r.warn(
            "access control is off (no tokens, no allow rules): anyone who reaches mistryd's \
             port reads every project, downloads every build and schedules jobs",
            "create tokens (mistryd token create, docs/access.md), or listen on loopback only \
             (--addr 127.0.0.1:8462)",
        );
        return;
    }
    r.ok(format!(
        "access control: {tokens} tokens, {rules} allow rules{}",
        if cfg.access.has_cluster_token() {
            ", agents authenticate each other"
        } else {
            ""
        }
    ));
}

/// Several agents: the database answers (TLS or not), its schema, and this agent's name.
fn check_database(r: &mut Report, cfg: &Config) {
    let Some(url) = cfg.cluster.database_url.as_deref() else {
        r.ok("single node: no database_url");
        return;
    };
    let shown = crate::cluster::db::redact(url);
    let name = cfg.cluster.agent_name.as_str();
    let probed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(crate::cluster::db::Db::probe(url, name))
                .map_err(|e| e.to_string())
        });
    let p = match probed {
        Ok(p) => p,
        Err(e) => {
            r.fail(
                e,
                "start PostgreSQL, check database_url (docs/cluster.md, \"Several agents\"); mistryd does not start without it",
            );
            return;
        }
    };
    let tls = if p.tls { "over TLS" } else { "in the clear" };
    r.ok(format!("database {shown}: PostgreSQL {}, {tls}", p.server));
    let known = crate::cluster::db::known_version();
    match p.schema {
        None => r.ok(format!(
            "database schema: not created yet (mistryd's start applies its {known} migrations)"
        )),
        Some(v) if v > known => r.fail(
            format!("database schema version {v}, newer than this mistryd ({known})"),
            "upgrade mistryd",
        ),
        Some(v) if v < known => r.ok(format!(
            "database schema version {v} (mistryd's start migrates it to {known})"
        )),
        Some(v) => r.ok(format!("database schema version {v}, up to date")),
    }
    match p.namesake {
        Some(other) => r.warn(
            format!("an agent named {name} heartbeated lately, at {other}"),
            "if it is another running mistryd, give this one its own agent_name (a second live agent of a name is refused)",
        ),
        None => r.ok(format!("agent name {name}: free")),
    }
}

/// Print the report of [`check`] and return the exit code.
pub fn run(config: &Path, ids: Option<SandboxIds>, out: &mut dyn Write) -> std::io::Result<i32> {
    let report = check(config, ids);
    for c in &report.checks {
        writeln!(out, "{c}")?;
    }
    let fails = report
        .checks
        .iter()
        .filter(|c| c.level == Level::Fail)
        .count();
    let warns = report
        .checks
        .iter()
        .filter(|c| c.level == Level::Warn)
        .count();
    writeln!(
        out,
        "{} checks: {} failed, {} warnings",
        report.checks.len(),
        fails,
        warns
    )?;
    Ok(report.code())
}

fn check_user(r: &mut Report, root: bool, ids: SandboxIds) {
    let (name, uid) = whoami();
    let who = name.unwrap_or_else(|| uid.to_string());
    match (root, ids) {
        (true, SandboxIds::Auto) => r.warn(
            format!("running as root ({who}) with sandbox_ids auto: a job's root is the host's root"),
            "run mistryd as an unprivileged user (contrib/systemd/mistryd.service), or set \
             \"sandbox_ids\": \"subordinate\" (SECURITY.md)",
        ),
        (true, SandboxIds::Subordinate) => r.ok(format!(
            "running as root ({who}) with sandbox_ids subordinate: a job's root is a subordinate id"
        )),
        (false, SandboxIds::Subordinate) => r.fail(
            format!("sandbox_ids subordinate is set but mistryd runs as {who}, not root"),
            "remove \"sandbox_ids\" (an unprivileged daemon's jobs are already not root on the host)",
        ),
        (false, SandboxIds::Auto) => r.ok(format!("running as the unprivileged user {who}")),
    }
}

fn read_sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn check_userns(r: &mut Report, root: bool) {
    match read_sysctl("user.max_user_namespaces").as_deref() {
        Some("0") => r.fail(
            "user.max_user_namespaces is 0: no user namespaces can be created",
            "sysctl -w user.max_user_namespaces=28633, and persist it in /etc/sysctl.d/",
        ),
        Some(n) => r.ok(format!("user.max_user_namespaces = {n}")),
        None => r.warn(
            "user.max_user_namespaces cannot be read (a kernel without user namespaces?)",
            "mistryd needs Linux ≥ 5.12 with CONFIG_USER_NS",
        ),
    }
    if let Some(v) = read_sysctl("kernel.unprivileged_userns_clone") {
        match (v.as_str(), root) {
            ("0", false) => r.fail(
                "kernel.unprivileged_userns_clone is 0: unprivileged users cannot create user namespaces",
                "sysctl -w kernel.unprivileged_userns_clone=1, and persist it in /etc/sysctl.d/",
            ),
            ("0", true) => r.warn(
                "kernel.unprivileged_userns_clone is 0 (root is not affected)",
                "to run mistryd unprivileged: sysctl -w kernel.unprivileged_userns_clone=1",
            ),
            _ => r.ok(format!("kernel.unprivileged_userns_clone = {v}")),
        }
    }
    if let Some(v) = read_sysctl("kernel.apparmor_restrict_unprivileged_userns") {
        match (v.as_str(), root) {
            ("1", false) => r.fail(
                "kernel.apparmor_restrict_unprivileged_userns is 1: AppArmor denies unprivileged \
                 user namespaces their capabilities",
                "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give mistryd an \
                 AppArmor profile with `userns,` (as Ubuntu does for podman)",
            ),
            _ => r.ok(format!(
                "kernel.apparmor_restrict_unprivileged_userns = {v}"
            )),
        }
    }
}

fn check_sandbox(r: &mut Report) {
    // The real thing: a sandbox on the host's root running `true`.
    let out = Sandbox::new("/")
        .read_only_root(true)
        .network(NetworkMode::None)
        .hostname("mistry-doctor")
        .command(["/bin/true"])
        .output();
    match out {
        Ok(o) if o.status.success() => r.ok("a sandbox starts (user, mount, PID namespaces)"),
        Ok(o) => r.fail(
            format!(
                "a sandbox running /bin/true ended with {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "see the messages above; MISTRY_LOG=debug mistryd sandbox run --rootfs / -- /bin/true",
        ),
        Err(e) => r.fail(
            format!("no sandbox can be started: {e}"),
            "fix what the checks above name",
        ),
    }
}

/// Isolated networks (the default `network`): slirp4netns, a TUN device the daemon may open,
/// and one namespace started and torn down as the daemon makes them.
fn check_network(r: &mut Report, cfg: &Config, root: bool) {
    let isolated = cfg.network == NetworkMode::Isolated
        || cfg
            .projects
            .values()
            .any(|p| p.network.as_deref() == Some("isolated"));
    if !isolated {
        r.ok(format!(
            "network {}: no isolated networks to start (a project's .mistry.json that narrows \
             it to isolated needs slirp4netns)",
            cfg.network
        ));
        return;
    }
    let Some(slirp) = sandbox::slirp4netns_path() else {
        r.fail(
            "slirp4netns is not installed: jobs and RUN steps with the isolated network (the \
             default) cannot start",
            "apt-get install slirp4netns (or dnf install slirp4netns), or set \"network\"",
        );
        return;
    };
    let tun = Path::new("/dev/net/tun");
    match std::fs::metadata(tun) {
        Err(e) => {
            r.fail(
                format!("{}: {e}", tun.display()),
                "load the tun module (modprobe tun) or create the node: mknod /dev/net/tun c 10 200",
            );
            return;
        }
        Ok(m) if !root && m.mode() & 0o006 != 0o006 => {
            r.fail(
                format!(
                    "{} is mode {:04o}: an unprivileged daemon cannot open it for slirp4netns",
                    tun.display(),
                    m.mode() & 0o7777
                ),
                "chmod 0666 /dev/net/tun, as standard distributions have it (udev: \
                 KERNEL==\"tun\", MODE=\"0666\"); it only lets a user make devices in \
                 network namespaces they own",
            );
            return;
        }
        Ok(_) => {}
    }
    match sandbox::check_isolated_network() {
        Ok(how) => r.ok(format!("isolated networks start: {how}")),
        Err(e) => r.fail(
            format!("an isolated network cannot be started: {e}"),
            format!(
                "{} must run (MISTRY_LOG=debug mistryd sandbox run --net isolated --rootfs / \
                 -- /bin/true); reading its system calls' arguments needs ptrace access to our \
                 own children (kernel.yama.ptrace_scope at most 1)",
                slirp.display()
            ),
        ),
    }
    let deny = &cfg.network_deny;
    r.ok(format!(
        "egress of isolated networks: loopback, link-local, this host's addresses{}{} refused",
        if cfg.cluster.database_url.is_some() {
            ", the cluster's hosts (PostgreSQL, every agent)"
        } else {
            ""
        },
        if deny.is_empty() {
            String::new()
        } else {
            format!(
                ", network_deny ({})",
                deny.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    ));
}

/// Why `newuidmap` or `newgidmap` cannot map a range.
#[derive(Debug, thiserror::Error)]
enum Unprivileged {
    #[error("{}: {source}", path.display())]
    Stat {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is neither set-uid root nor has file capabilities (mode {mode:o}, owner {uid})", path.display())]
    Plain {
        path: std::path::PathBuf,
        mode: u32,
        uid: u32,
    },
}

/// Whether `path` is set-uid root or carries file capabilities (what newuidmap needs).
fn privileged_helper(path: &Path) -> Result<String, Unprivileged> {
    let meta = std::fs::metadata(path).map_err(|source| Unprivileged::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.uid() == 0 && meta.permissions().mode() & 0o4000 != 0 {
        return Ok("set-uid root".into());
    }
    let mut buf = [0u8; 64];
    if rustix::fs::getxattr(path, "security.capability", &mut buf[..]).is_ok() {
        return Ok("with file capabilities".into());
    }
    Err(Unprivileged::Plain {
        path: path.to_path_buf(),
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
    })
}

fn check_mapping(r: &mut Report, root: bool, ids: SandboxIds) -> Option<IdMap> {
    let (who, uid) = whoami();
    let who = who.unwrap_or_else(|| uid.to_string());
    let usermod = format!(
        "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who} (pick a range no \
         other user has)"
    );
    match sandbox::try_choose_id_map(IdMapping::Auto) {
        Ok((IdMap::Single { .. }, Some(why))) => {
            let fix = if why.contains("newuidmap") {
                "apt-get install uidmap (newuidmap and newgidmap, set-uid root)".to_string()
            } else {
                usermod
            };
            r.fail(
                format!(
                    "sandbox ids: only root exists in the sandboxes ({why}); images whose files \
                     belong to several users (Debian's apt, most distributions) cannot be built"
                ),
                fix,
            );
            None
        }
        Ok((m, _)) => {
            let (ruid, rgid) = m.root_ids();
            let what = match &m {
                IdMap::Single { .. } => format!("sandbox ids: root = {ruid}:{rgid} only"),
                IdMap::Full { subuid, subgid, .. } => format!(
                    "sandbox ids: root = {ruid}:{rgid}, 1..{} = uids {}.. and gids {}..",
                    m.max_id(),
                    subuid.start,
                    subgid.start
                ),
                IdMap::Subordinate { subuid, subgid, .. } => format!(
                    "sandbox ids: 0..{} = uids {}.. and gids {}.. (root is not mapped)",
                    m.max_id(),
                    subuid.start,
                    subgid.start
                ),
            };
            if m.max_id() > 0 && m.max_id() < 65535 {
                r.warn(
                    format!("{what}: fewer than 65536 ids"),
                    format!("images using higher ids fail: {usermod}"),
                );
            } else {
                r.ok(what);
            }
            match &m {
                IdMap::Full {
                    helpers: Some((u, g)),
                    ..
                }
                | IdMap::Subordinate {
                    helpers: Some((u, g)),
                    ..
                } => {
                    for p in [u, g] {
                        match privileged_helper(p) {
                            Ok(how) => r.ok(format!("{} is {how}", p.display())),
                            Err(e) => r.fail(
                                format!("{e}: it cannot write the sandboxes' id maps"),
                                format!(
                                    "apt-get install --reinstall uidmap, or chmod u+s {} (as \
                                     root); check that PATH finds the system's copy first",
                                    p.display()
                                ),
                            ),
                        }
                    }
                }
                _ if root => {
                    r.ok("newuidmap/newgidmap: not needed (root writes the id maps itself)");
                }
                _ => {}
            }
            Some(m)
        }
        Err(e) => {
            let _ = ids;
            r.fail(format!("sandbox ids: {e}"), usermod);
            None
        }
    }
}

/// Lines of `/etc/subuid`-style `text` owned by `name` or `uid`: (line number, start, count).
fn ranges_of(text: &str, name: Option<&str>, uid: u32) -> Vec<(usize, u32, u32)> {
    let id = uid.to_string();
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let mut it = l.split(':');
            let (owner, start, count) = (it.next()?, it.next()?, it.next()?);
            let owned = owner == id || Some(owner) == name;
            Some((
                i + 1,
                start.trim().parse().ok()?,
                count.trim().parse().ok()?,
            ))
            .filter(|_| owned)
        })
        .collect()
}

/// Other owners' ranges in `text` that overlap `start..start+count`.
fn overlaps(text: &str, name: Option<&str>, uid: u32, start: u32, count: u32) -> Vec<String> {
    let id = uid.to_string();
    let end = u64::from(start) + u64::from(count);
    text.lines()
        .filter_map(|l| {
            let mut it = l.trim().split(':');
            let (owner, s, c) = (it.next()?, it.next()?, it.next()?);
            let (s, c): (u32, u32) = (s.trim().parse().ok()?, c.trim().parse().ok()?);
            let theirs = owner != id && Some(owner) != name && !owner.starts_with('#');
            let overlap = u64::from(s) < end && u64::from(start) < u64::from(s) + u64::from(c);
            (theirs && overlap && c > 0).then(|| format!("{owner}'s {s}:{c}"))
        })
        .collect()
}

fn check_subordinate_files(r: &mut Report) {
    let (name, uid) = whoami();
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mine = ranges_of(&text, name.as_deref(), uid);
        let used = sandbox::find_subordinate_range(&text, name.as_deref(), uid);
        match (mine.as_slice(), used) {
            (_, None) => r.fail(
                format!("no subordinate range for {who} in {file}"),
                format!(
                    "usermod --add-sub{}s 100000-165535 {who} (a range no other user has)",
                    if file.ends_with("subuid") {
                        "uid"
                    } else {
                        "gid"
                    }
                ),
            ),
            ([_], Some(u)) => r.ok(format!(
                "{who} has one range in {file}: {}:{}",
                u.start, u.count
            )),
            (many, Some(u)) => {
                let list = many
                    .iter()
                    .map(|(line, s, c)| {
                        let state = if (*s, *c) == (u.start, u.count) && *c > 0 {
                            "used"
                        } else {
                            "ignored"
                        };
                        format!("{s}:{c} (line {line}, {state})")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                r.warn(
                    format!(
                        "{who} has {} ranges in {file}: {list}; mistry uses the first, {}:{}",
                        many.len(),
                        u.start,
                        u.count
                    ),
                    format!(
                        "remove the ones you do not want from {file} (one was perhaps added by \
                         useradd, another by hand); files jobs made keep the ids of the range \
                         used when they were made"
                    ),
                );
            }
        }
        if let Some(u) = used {
            let others = overlaps(&text, name.as_deref(), uid, u.start, u.count);
            if !others.is_empty() {
                r.warn(
                    format!(
                        "{who}'s range {}:{} in {file} overlaps {}",
                        u.start,
                        u.count,
                        others.join(", ")
                    ),
                    "give each user a range of its own: their jobs' files would otherwise share \
                     owners",
                );
            }
        }
    }
}

fn check_paths(r: &mut Report, cfg: &Config) {
    // build_path's writability is checked when the configuration loads.
    let store = &cfg.store_path;
    let probe = store.join(format!(".doctor-{}", std::process::id()));
    match std::fs::create_dir_all(store).and_then(|()| std::fs::write(&probe, b"")) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            r.ok(format!("store_path {} is writable", store.display()));
        }
        Err(e) => r.fail(
            format!("store_path {} is not writable: {e}", store.display()),
            "create it for mistryd's user (chown), or set store_path elsewhere",
        ),
    }
    let mut seen = BTreeSet::new();
    for (what, path) in [("build_path", &cfg.build_path), ("store_path", store)] {
        let Ok((free, total)) = crate::engine::retention::free_space(path) else {
            continue;
        };
        let dev = std::fs::metadata(path).map_or(0, |m| m.dev());
        if !seen.insert(dev) {
            continue;
        }
        let pct = if total > 0 {
            free as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        let what = format!(
            "{what} {}: {} free of {} ({pct:.0}%)",
            path.display(),
            human_bytes(free),
            human_bytes(total)
        );
        if free < 256 << 20 {
            r.fail(
                what,
                "free space: set \"retention\" (min_free, keep, max_age) or run mistryd purge",
            );
        } else if free < 2 << 30 || pct < 5.0 {
            r.warn(
                what,
                "builds may fill it: set \"retention\" or run mistryd purge --older-than 7d",
            );
        } else {
            r.ok(what);
        }
    }
    if let Some(min_free) = cfg.retention.min_free {
        if let Ok((mark, true)) = crate::engine::retention::below_mark(&cfg.build_path, min_free) {
            r.warn(
                format!(
                    "build_path is below retention.min_free ({}): the oldest unlinked builds \
                     will be removed",
                    human_bytes(mark)
                ),
                "expected while it holds; otherwise give build_path more room",
            );
        }
    }
}

/// A directory for the overlay probe on the store's filesystem (where overlay layers live).
fn probe_dir(cfg: &Config) -> std::io::Result<tempfile_dir::Dir> {
    for base in [cfg.store_path.join("tmp"), cfg.build_path.clone()] {
        if let Ok(d) = tempfile_dir::Dir::new_in(&base) {
            return Ok(d);
        }
    }
    tempfile_dir::Dir::new_in(&std::env::temp_dir())
}

/// A directory removed on drop (no dependency for so little), by the iterative removal of
/// [`images::walk`] (whatever a stale one of the same name holds).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub(super) struct Dir(pub PathBuf);

    impl Dir {
        pub(super) fn new_in(base: &Path) -> std::io::Result<Dir> {
            let p = base.join(format!(".mistry-doctor-{}", std::process::id()));
            let _ = images::walk::remove_path(&p);
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = images::walk::remove_path(&self.0);
        }
    }
}

fn check_overlay(r: &mut Report, cfg: &Config, mapping: Option<&IdMap>) {
    let wanted = cfg.filesystem == Some(images::BackendKind::Overlay);
    let dir = match probe_dir(cfg) {
        Ok(d) => d,
        Err(e) => {
            r.warn(
                format!("rootless overlayfs: no directory to probe in: {e}"),
                "",
            );
            return;
        }
    };
    let d = dir.0.clone();
    let (lower, upper, work, merged) = (
        d.join("lower"),
        d.join("upper"),
        d.join("work"),
        d.join("merged"),
    );
    let made = [&lower, &upper, &work, &merged]
        .iter()
        .try_for_each(std::fs::create_dir)
        .and_then(|()| std::fs::write(lower.join("f"), b"lower\n"));
    // Sandbox root must own the directories (it is not this user with sandbox_ids subordinate).
    let owned = match mapping.map(IdMap::root_ids) {
        Some((u, g)) if nix::unistd::geteuid().is_root() && u != 0 => {
            [&d, &lower, &lower.join("f"), &upper, &work, &merged]
                .iter()
                .try_for_each(|p| std::os::unix::fs::lchown(p, Some(u), Some(g)))
        }
        _ => Ok(()),
    };
    if let Err(e) = made.and(owned) {
        r.warn(
            format!(
                "rootless overlayfs: preparing the probe in {}: {e}",
                d.display()
            ),
            "",
        );
        return;
    }
    let out = Sandbox::new("/")
        .read_only_root(true)
        .network(NetworkMode::None)
        .hostname("mistry-doctor")
        .bind(Bind::new(&d, &d))
        .overlay_mount(
            vec![lower.clone()],
            Some((upper.clone(), work.clone())),
            &merged,
        )
        .command([
            PathBuf::from("/bin/sh").into_os_string(),
            "-c".into(),
            "read l < \"$1/f\" && [ \"$l\" = lower ] && echo upper > \"$1/g\"".into(),
            "sh".into(),
            merged.clone().into_os_string(),
        ])
        .output();
    let worked = matches!(&out, Ok(o) if o.status.success())
        && std::fs::read_to_string(upper.join("g")).is_ok_and(|t| t == "upper\n");
    let fs = fs_type(&d).unwrap_or_else(|| "?".into());
    if worked {
        r.ok(format!(
            "rootless overlayfs works on {} ({fs})",
            d.display()
        ));
        return;
    }
    let why = match out {
        Ok(o) => format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    let what = format!(
        "rootless overlayfs does not work on {} ({fs}): {why}",
        d.display()
    );
    let fix = "Linux ≥ 5.11 mounts overlayfs in user namespaces; the store's filesystem must \
               support it (ext4, xfs, btrfs, tmpfs)";
    if wanted {
        r.fail(
            format!("{what}; the configured filesystem is overlay"),
            format!("{fix}, or set \"filesystem\" to plain"),
        );
    } else {
        r.warn(
            what,
            format!("{fix}; meanwhile jobs run on copies (slower, bigger store)"),
        );
    }
}

/// How a group's next build will get the last one's cache on `build_path` (see the engine's
/// `layers.rs`): btrfs snapshots, overlay layers, or copies of the whole cache.
fn check_incremental(r: &mut Report, cfg: &Config) {
    let path = &cfg.build_path;
    if images::is_btrfs(path) && cfg.filesystem != Some(images::BackendKind::Overlay) {
        r.ok(format!(
            "incremental builds: btrfs snapshots on {}",
            path.display()
        ));
        return;
    }
    if cfg.filesystem == Some(images::BackendKind::Plain) || cfg.cache_layers == 0 {
        r.warn(
            "incremental builds copy the group's whole cache (plain backend or cache_layers 0)",
            "use the overlay backend with cache_layers > 0, or put build_path on btrfs",
        );
        return;
    }
    match images::overlay_works_in(path) {
        Ok(()) => r.ok(format!(
            "incremental builds: overlay cache layers on {} (squashed past {})",
            path.display(),
            cfg.cache_layers
        )),
        Err(why) => r.warn(
            format!(
                "incremental builds copy the group's whole cache: overlayfs does not work on {} ({why})",
                path.display()
            ),
            "put build_path on a filesystem that rootless overlayfs supports (ext4, xfs, btrfs, tmpfs)",
        ),
    }
}

/// The mount of `path` in `/proc/self/mountinfo`: (mount point, fs type, options).
fn mount_of(path: &Path) -> Option<(PathBuf, String, String)> {
    let path = std::fs::canonicalize(path).ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(PathBuf, String, String)> = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(point), Some(opts)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let point = PathBuf::from(point.replace("\\040", " "));
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("").to_string();
        let super_opts = r.nth(1).unwrap_or("");
        let longer = match &best {
            Some((p, _, _)) => point.as_os_str().len() >= p.as_os_str().len(),
            None => true,
        };
        if path.starts_with(&point) && longer {
            best = Some((point, fstype, format!("{opts},{super_opts}")));
        }
    }
    best
}

fn fs_type(path: &Path) -> Option<String> {
    mount_of(path).map(|(_, t, _)| t)
}

fn check_btrfs(r: &mut Report, cfg: &Config, root: bool) {
    let store = &cfg.store_path;
    let on_btrfs = images::is_btrfs(store);
    if cfg.filesystem == Some(images::BackendKind::Btrfs) && !on_btrfs {
        r.fail(
            format!(
                "filesystem btrfs is configured but store_path {} is not on btrfs",
                store.display()
            ),
            "move store_path onto a btrfs filesystem, or set \"filesystem\" to plain or overlay",
        );
        return;
    }
    if !on_btrfs {
        r.ok(format!(
            "store_path {} is on {}, not btrfs (the btrfs backend is not used)",
            store.display(),
            fs_type(store).unwrap_or_else(|| "?".into())
        ));
        return;
    }
    let Some((point, _, opts)) = mount_of(store) else {
        r.ok(format!("store_path {} is on btrfs", store.display()));
        return;
    };
    if opts.split(',').any(|o| o == "user_subvol_rm_allowed") {
        r.ok(format!(
            "store_path {} is on btrfs ({}) with user_subvol_rm_allowed",
            store.display(),
            point.display()
        ));
    } else if root {
        r.ok(format!(
            "store_path {} is on btrfs ({}); root deletes subvolumes itself",
            store.display(),
            point.display()
        ));
    } else {
        r.warn(
            format!(
                "store_path {} is on btrfs ({}) without user_subvol_rm_allowed: removing a \
                 snapshot or build empties it in the user namespace first (slower)",
                store.display(),
                point.display()
            ),
            format!(
                "mount -o remount,user_subvol_rm_allowed {} (and add the option in /etc/fstab)",
                point.display()
            ),
        );
    }
}

fn check_cgroups(r: &mut Report, root: bool) {
    let without = "processes are limited by RLIMIT_NPROC, a per-sandbox kernel.pid_max and a \
                   watchdog; memory only by a best-effort RSS watchdog; CPU limits are not \
                   enforced (SECURITY.md, \"What is enforced on which host\")";
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string());
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        });
    let fix = "run mistryd under systemd with Delegate=yes (contrib/systemd/mistryd.service) on a \
               host with the unified cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1)";
    let (Some(rel), Some(mount)) = (rel, mount) else {
        r.warn(format!("no cgroup v2 hierarchy: {without}"), fix);
        return;
    };
    let dir = mount.join(&rel);
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let writable = nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok();
    if writable && has("memory") && has("pids") {
        r.ok(format!(
            "cgroup v2 delegated ({}): memory.max, pids.max{} enforced per job",
            dir.display(),
            if has("cpu") { ", cpu.max" } else { "" }
        ));
        return;
    }
    let v1 = |c: &str| {
        let p = Path::new("/sys/fs/cgroup").join(c);
        p.join("tasks").is_file() && nix::unistd::access(&p, nix::unistd::AccessFlags::W_OK).is_ok()
    };
    let state = if !writable {
        format!("cgroup v2 {} is not writable", dir.display())
    } else {
        format!(
            "cgroup v2 {} has controllers [{}] (memory and pids needed)",
            dir.display(),
            controllers.trim()
        )
    };
    if root && v1("memory") && v1("pids") {
        r.warn(
            format!(
                "{state}: as root, the cgroup v1 memory and pids controllers are used instead; \
                 CPU limits are not enforced"
            ),
            fix,
        );
    } else {
        r.warn(format!("{state}: {without}"), fix);
    }
}

/// Registries the configuration names, and those of the projects' `FROM` lines that are not
/// local images.
fn registries(cfg: &Config) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> = cfg.registries.insecure.iter().cloned().collect();
    hosts.extend(cfg.registries.credentials.keys().cloned());
    let Ok(projects) = std::fs::read_dir(&cfg.projects_path) else {
        return hosts;
    };
    for p in projects.flatten() {
        let Ok(text) = std::fs::read_to_string(p.path().join("Dockerfile")) else {
            continue;
        };
        let mut stages = BTreeSet::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if !words
                .first()
                .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
            {
                continue;
            }
            let rest: Vec<&str> = words[1..]
                .iter()
                .copied()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let Some(image) = rest.first() else { continue };
            if let (Some(as_), Some(name)) = (rest.get(1), rest.get(2)) {
                if as_.eq_ignore_ascii_case("AS") {
                    stages.insert(name.to_ascii_lowercase());
                }
            }
            let name = image.split(['@']).next().unwrap_or(image);
            if image.contains('$')
                || *image == "scratch"
                || stages.contains(&image.to_ascii_lowercase())
            {
                continue;
            }
            let first = name.split('/').next().unwrap_or(name);
            let host = if name.contains('/')
                && (first.contains('.') || first.contains(':') || first == "localhost")
            {
                first.to_string()
            } else {
                let local = name.split(':').next().unwrap_or(name);
                if cfg
                    .images_path
                    .as_ref()
                    .is_some_and(|d| d.join(local).join("index.json").is_file())
                {
                    continue;
                }
                "docker.io".to_string()
            };
            hosts.insert(host);
        }
    }
    hosts
}

fn check_registries(r: &mut Report, cfg: &Config) {
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(8)))
            .build(),
    );
    let hosts = registries(cfg);
    if hosts.is_empty() {
        r.ok("registries: none configured or used by the projects' FROM lines");
    }
    for host in hosts {
        let insecure = cfg.registries.insecure.contains(&host);
        let api = if host == "docker.io" {
            "registry-1.docker.io".to_string()
        } else {
            host.clone()
        };
        let port = if api.contains(':') {
            String::new()
        } else if insecure {
            ":80".into()
        } else {
            ":443".into()
        };
        let addr = format!("{api}{port}");
        let tcp = addr
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
            .and_then(|a| {
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
        if let Err(e) = tcp {
            r.warn(
                format!("registry {host}: cannot connect to {addr}: {e}"),
                "builds that need a new base image from it fail; check DNS, the firewall, a \
                 proxy (mistry connects directly)",
            );
            continue;
        }
        let get = |scheme: &str| -> Result<u16, ureq::Error> {
            agent
                .get(&format!("{scheme}://{api}/v2/"))
                .call()
                .map(|resp| resp.status().as_u16())
        };
        let scheme = if insecure { "http" } else { "https" };
        match get(scheme) {
            Ok(code @ (200 | 401)) => r.ok(format!(
                "registry {host}: {scheme}://{api}/v2/ answers {code}{}",
                if insecure { " (insecure: plain http)" } else { "" }
            )),
            Ok(code) => r.warn(
                format!("registry {host}: {scheme}://{api}/v2/ answers {code}, not a registry's 200 or 401"),
                "check the host name and port in the configuration and FROM lines",
            ),
            Err(e) if !insecure => match get("http") {
                Ok(_) => r.warn(
                    format!("registry {host}: https fails ({e}) but plain http answers"),
                    format!("add \"{host}\" to registries.insecure in the configuration"),
                ),
                Err(_) => r.warn(
                    format!("registry {host}: https://{api}/v2/: {e}"),
                    "check its certificate (mistry trusts the system's and webpki roots)",
                ),
            },
            Err(e) => r.warn(
                format!("registry {host}: http://{api}/v2/: {e}"),
                format!(
                    "it is listed in registries.insecure: does it serve https? then remove \
                     \"{host}\" from there"
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicated_ranges_and_overlaps() {
        let text = "alice:100000:65536\nbob:165536:65536\n# x:1:1\n1000:231072:65536\n";
        assert_eq!(
            ranges_of(text, Some("alice"), 1000),
            [(1, 100000, 65536), (4, 231072, 65536)]
        );
        assert_eq!(
            overlaps(text, Some("alice"), 1000, 150000, 20000),
            ["bob's 165536:65536"]
        );
        assert!(overlaps(text, Some("bob"), 1001, 165536, 65536).is_empty());
    }

    #[test]
    fn lines_read_as_documented() {
        let c = Check {
            level: Level::Fail,
            what: "x is missing".into(),
            fix: "install x".into(),
        };
        assert_eq!(c.to_string(), "FAIL  x is missing  — install x");
        let c = Check {
            level: Level::Ok,
            what: "y".into(),
            fix: String::new(),
        };
        assert_eq!(c.to_string(), "ok    y");
    }

    #[test]
    fn access_control_off_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("p"), dir.path().join("b"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let cfg = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"projects_path": p, "build_path": b});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Config::parse(&v.to_string(), &dir.path().join("c.json")).unwrap()
        };
        let mut r = Report::default();
        check_access(&mut r, &cfg(serde_json::json!({})));
        assert_eq!(r.checks[0].level, Level::Warn);
        assert!(r.checks[0].what.starts_with("access control is off"));
        let mut r = Report::default();
        let hash = hex::encode([7u8; 32]);
        check_access(
            &mut r,
            &cfg(
                serde_json::json!({"tokens": [{"name": "a", "hash": hash, "scopes": ["read"], "projects": ["*"]}]}),
            ),
        );
        assert_eq!(r.checks[0].level, Level::Ok);
        assert_eq!(r.checks[0].what, "access control: 1 tokens, 0 allow rules");
    }
}
