//! Access control (no HTTP here; the server's `server/access.rs` applies it to every route):
//! who may read, build and administer which project.
//!
//! The configuration file's keys (top level, beside mistry's):
//!
//! ```json
//! {
//!   "tokens": [{"name": "ci-payments", "hash": "<sha256 hex of the token>",
//!               "scopes": ["build"], "projects": ["payments-*"],
//!               "expires": "2026-01-31T00:00:00Z"}],
//!   "tokens_file": "/etc/mistry/tokens.json",     // more entries, a JSON array of the same
//!   "allow": [{"from": "10.0.0.0/8", "scopes": ["build"], "projects": ["*"]}],
//!   "cluster_token_file": "/etc/mistry/cluster-token"   // agents authenticate each other
//! }
//! ```
//!
//! Scopes are ordered: `read` < `build` < `admin`, each granting those below it (`build` reads
//! the projects it builds; `admin` builds them too, and reaches the server-wide routes:
//! `/metrics`, `GET /agents` as JSON). A token is stored only as the SHA-256 of its text
//! (tokens are 256 random bits, so a plain hash is enough: there is nothing to guess), compared
//! in constant time with every entry. Without `tokens` and `allow`, access control is off, as
//! in mistry: every client may do everything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use globset::{GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a grant allows on a project, ordered: each scope includes those below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// See jobs, logs, artifacts, pipelines and their runs.
    Read,
    /// Also start jobs and pipeline runs.
    Build,
    /// Also the server-wide routes (metrics, the agents' details).
    Admin,
}

impl Scope {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Build => "build",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, AccessError> {
        match s {
            "read" => Ok(Scope::Read),
            "build" => Ok(Scope::Build),
            "admin" => Ok(Scope::Admin),
            other => Err(AccessError::Scope(other.to_string())),
        }
    }
}

/// Why access settings are not valid.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// An unknown scope.
    #[error("unknown scope {0:?} (read, build or admin)")]
    Scope(String),
    /// A project pattern that is not a glob.
    #[error("{what}: project pattern {pattern:?}: {reason}")]
    Pattern {
        /// The entry.
        what: String,
        /// The pattern.
        pattern: String,
        /// The glob's error.
        reason: String,
    },
    /// A hash that is not 64 hex digits.
    #[error("{what}: hash must be the SHA-256 of the token, 64 hex digits")]
    Hash {
        /// The entry.
        what: String,
    },
    /// An expiry that is not an RFC 3339 time.
    #[error("{what}: expires {value:?} is not an RFC 3339 time (2026-01-31T00:00:00Z)")]
    Expires {
        /// The entry.
        what: String,
        /// The value.
        value: String,
    },
    /// An entry without a name, scopes or projects, or two entries of one name.
    #[error("{0}")]
    Entry(String),
    /// An `allow` rule's `from` that is not a network.
    #[error("allow[{index}].from: {value:?} is not a network (10.0.0.0/8) or an address")]
    From {
        /// The rule's index.
        index: usize,
        /// The value.
        value: String,
    },
    /// The tokens file or the cluster token file could not be read, parsed or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A token's entry as the configuration (or the tokens file) holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawToken {
    /// Who holds it (unique; audit lines name it).
    pub name: String,
    /// SHA-256 of the token's text, hex.
    pub hash: String,
    /// `read`, `build`, `admin`.
    pub scopes: Vec<String>,
    /// Globs of project names (`payments-*`, `*`).
    pub projects: Vec<String>,
    /// RFC 3339; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// An `allow` rule: clients from `from` get `scopes` on `projects` without a token.
#[derive(Debug, Clone, Deserialize)]
pub struct RawAllow {
    /// A network (`10.0.0.0/8`) or one address.
    pub from: String,
    /// As a token's.
    pub scopes: Vec<String>,
    /// As a token's.
    pub projects: Vec<String>,
}

/// The configuration file's keys of access control.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAccess {
    /// `tokens`.
    #[serde(default)]
    pub tokens: Vec<RawToken>,
    /// `tokens_file`: a JSON array of more entries (relative to the configuration's directory).
    pub tokens_file: Option<PathBuf>,
    /// `allow`.
    #[serde(default)]
    pub allow: Vec<RawAllow>,
    /// `cluster_token_file`: the token agents send each other (its first line).
    pub cluster_token_file: Option<PathBuf>,
    /// `behind_https`: clients reach this server through https (a proxy in front): the web
    /// view's sign-in cookies are `Secure`.
    #[serde(default)]
    pub behind_https: bool,
}

/// Projects and the scope granted on them: a token's, or an allow rule's.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The token's name, or `allow[i] (<network>)`.
    pub name: String,
    /// The highest scope granted.
    pub scope: Scope,
    /// The patterns, as written.
    pub patterns: Vec<String>,
    projects: GlobSet,
    /// Seconds since the epoch after which the token is refused.
    pub expires: Option<i64>,
}

impl Grant {
    /// Whether it covers every project (one of its patterns is `*` or `**`).
    fn everywhere(&self) -> bool {
        self.patterns.iter().any(|p| p == "*" || p == "**")
    }

    fn new(
        name: String,
        scopes: &[String],
        patterns: Vec<String>,
        expires: Option<i64>,
    ) -> Result<Grant, AccessError> {
        let scope = scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .ok_or_else(|| AccessError::Entry(format!("{name}: no scopes")))?;
        if patterns.is_empty() {
            return Err(AccessError::Entry(format!("{name}: no projects")));
        }
        let mut set = GlobSetBuilder::new();
        for p in &patterns {
            let glob = globset::GlobBuilder::new(&literal_but_star(p))
                .literal_separator(true)
                .build()
                .map_err(|e| AccessError::Pattern {
                    what: name.clone(),
                    pattern: p.clone(),
                    reason: e.kind().to_string(),
                })?;
            set.add(glob);
        }
        let projects = set.build().map_err(|e| AccessError::Pattern {
            what: name.clone(),
            pattern: patterns.join(","),
            reason: e.to_string(),
        })?;
        Ok(Grant {
            name,
            scope,
            patterns,
            projects,
            expires,
        })
    }

    /// Whether it grants `scope` on `project`.
    pub fn allows(&self, scope: Scope, project: &str) -> bool {
        self.scope >= scope && self.projects.is_match(project)
    }
}

/// A project pattern as a glob whose one wildcard is `*`: every other character the glob syntax
/// reads (`?`, `[`, `]`, `{`, `}`, `\\`) stands for itself. Project names may hold them (a
/// directory of `projects_path` is a project), and a pattern naming such a project must grant it
/// and nothing else: `app[1]` is the project `app[1]`, never `app1`.
fn literal_but_star(pattern: &str) -> String {
    pattern
        .split('*')
        .map(globset::escape)
        .collect::<Vec<_>>()
        .join("*")
}

/// A token's entry, validated.
#[derive(Debug, Clone)]
struct TokenEntry {
    hash: [u8; 32],
    grant: Arc<Grant>,
}

/// An allow rule, validated.
#[derive(Debug, Clone)]
struct AllowRule {
    from: sandbox::egress::IpNet,
    grant: Arc<Grant>,
}

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Access control is off: everything is allowed (mistry's behaviour).
    Open,
    /// A token's or an allow rule's grant.
    Granted(Arc<Grant>),
    /// Another agent of the cluster (it sent the cluster token).
    Agent,
}

impl Caller {
    /// Whether it may do `scope` on `project`.
    pub fn allows(&self, scope: Scope, project: &str) -> bool {
        match self {
            Caller::Open | Caller::Agent => true,
            Caller::Granted(g) => g.allows(scope, project),
        }
    }

    /// Whether it may use the server-wide routes (another agent, or `admin` on every project:
    /// a pattern `*`). An admin of some projects only is not: the server-wide routes (metrics,
    /// agents, builds) show or hand out every project's.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open | Caller::Agent => true,
            Caller::Granted(g) => g.scope == Scope::Admin && g.everywhere(),
        }
    }

    /// Its name in audit lines.
    pub fn name(&self) -> &str {
        match self {
            Caller::Open => "-",
            Caller::Agent => "cluster agent",
            Caller::Granted(g) => &g.name,
        }
    }
}

/// Why a request was not authenticated (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No token, and no allow rule for its address.
    #[error("a token is required (Authorization: Bearer <token>)")]
    Missing,
    /// A token no entry has.
    #[error("the token is not valid")]
    Unknown,
    /// A token past its expiry (the entry's name in the audit line only).
    #[error("the token is not valid")]
    Expired(String),
}

/// The validated access settings.
#[derive(Debug, Clone, Default)]
pub struct Access {
    tokens: Vec<TokenEntry>,
    allow: Vec<AllowRule>,
    cluster: Option<[u8; 32]>,
    /// `tokens_file` is set: access control is on even while the file holds no entry (fails
    /// closed).
    file: bool,
}

/// The SHA-256 of a token's text.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_expires(what: &str, value: &str) -> Result<i64, AccessError> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp())
        .map_err(|_| AccessError::Expires {
            what: what.to_string(),
            value: value.to_string(),
        })
}

/// Read a tokens file: a JSON array of entries; a file that does not exist has none.
pub fn read_tokens_file(path: &Path) -> Result<Vec<RawToken>, AccessError> {
    let file = |reason: String| AccessError::File {
        path: path.to_path_buf(),
        reason,
    };
    if matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    {
        return Ok(Vec::new());
    }
    // Who may write it may grant anything: its owner (or root) only.
    let text = read_checked(path, "tokens file", 0o022)?;
    serde_json::from_str(&text).map_err(|e| file(e.to_string()))
}

/// Write a tokens file atomically, readable by its owner only: a new file of a random name in
/// the same directory, created with `O_CREAT | O_EXCL` (never through a link or a file someone
/// put there; the `tempfile` crate), written, synced, then renamed over it.
pub fn write_tokens_file(path: &Path, tokens: &[RawToken]) -> Result<(), AccessError> {
    use std::io::Write;
    let file = |reason: String| AccessError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = serde_json::to_string_pretty(tokens).map_err(|e| file(e.to_string()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".tokens-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| file(format!("creating a new file in {}: {e}", dir.display())))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.write_all(b"\n"))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| file(format!("writing {}: {e}", tmp.path().display())))?;
    tmp.persist(path).map_err(|e| file(e.error.to_string()))?;
    Ok(())
}

/// Read a secret's file (`what`) after checking it: a regular file, owned by this process's
/// user or root, that no one else may write (`no_other_bits` also: read).
fn read_checked(path: &Path, what: &str, no_other_bits: u32) -> Result<String, AccessError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = |reason: String| AccessError::File {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| file(e.to_string()))?;
    let meta = f.metadata().map_err(|e| file(e.to_string()))?;
    if !meta.is_file() {
        return Err(file(format!("the {what} must be a regular file")));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(file(format!(
            "the {what} is owned by uid {}: it must be this daemon's user's (uid {me}) or root's",
            meta.uid()
        )));
    }
    if meta.mode() & no_other_bits != 0 {
        return Err(file(format!(
            "the {what} has mode {:04o}: group and others must not {} it (chmod {})",
            meta.mode() & 0o7777,
            if no_other_bits & 0o044 != 0 {
                "read or write"
            } else {
                "write"
            },
            if no_other_bits & 0o044 != 0 {
                "600"
            } else {
                "go-w"
            },
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| file(e.to_string()))?;
    Ok(text)
}

impl RawAccess {
    /// The tokens file's path, relative to `base_dir`.
    pub fn tokens_path(&self, base_dir: &Path) -> Option<PathBuf> {
        self.tokens_file.as_ref().map(|p| base_dir.join(p))
    }

    /// Every token entry: the configuration's, then the tokens file's.
    pub fn all_tokens(&self, base_dir: &Path) -> Result<Vec<RawToken>, AccessError> {
        let mut all = self.tokens.clone();
        if let Some(p) = self.tokens_path(base_dir) {
            all.extend(read_tokens_file(&p)?);
        }
        Ok(all)
    }
}

impl Access {
    /// Validate the settings (the files named are read now).
    pub fn parse(raw: &RawAccess, base_dir: &Path) -> Result<Access, AccessError> {
        let mut tokens = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        if let Some(p) = raw.tokens_path(base_dir) {
            if !p.exists() {
                return Err(AccessError::File {
                    path: p,
                    reason: "tokens_file does not exist (mistryd token create makes it)".into(),
                });
            }
        }
        for t in raw.all_tokens(base_dir)? {
            let what = format!("token {}", t.name);
            if t.name.is_empty() {
                return Err(AccessError::Entry("a token without a name".into()));
            }
            if !names.insert(t.name.clone()) {
                return Err(AccessError::Entry(format!("two tokens named {}", t.name)));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(t.hash.trim(), &mut hash)
                .map_err(|_| AccessError::Hash { what: what.clone() })?;
            let expires = match &t.expires {
                Some(e) => Some(parse_expires(&what, e)?),
                None => None,
            };
            let grant = Grant::new(t.name.clone(), &t.scopes, t.projects.clone(), expires)?;
            tokens.push(TokenEntry {
                hash,
                grant: Arc::new(grant),
            });
        }
        let mut allow = Vec::new();
        for (index, a) in raw.allow.iter().enumerate() {
            let from = parse_from(&a.from).ok_or_else(|| AccessError::From {
                index,
                value: a.from.clone(),
            })?;
            let grant = Grant::new(
                format!("allow[{index}] ({from})"),
                &a.scopes,
                a.projects.clone(),
                None,
            )?;
            allow.push(AllowRule {
                from,
                grant: Arc::new(grant),
            });
        }
        let cluster = match &raw.cluster_token_file {
            Some(p) => {
                let path = base_dir.join(p);
                let token = read_cluster_token(&path)?;
                Some(hash_token(&token))
            }
            None => None,
        };
        Ok(Access {
            tokens,
            allow,
            cluster,
            file: raw.tokens_file.is_some(),
        })
    }

    /// Whether clients must authenticate (`tokens`, `tokens_file` or `allow` set).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || !self.allow.is_empty() || self.file
    }

    /// How many tokens and allow rules there are.
    pub fn counts(&self) -> (usize, usize) {
        (self.tokens.len(), self.allow.len())
    }

    /// The allow rules a request from this host itself matches: those covering a loopback
    /// address or one of `host_addrs` (the host's interfaces' addresses), each with the
    /// address it covers. Local users, and jobs with `network: host`, send from those.
    pub fn rules_covering_host(&self, host_addrs: &[IpAddr]) -> Vec<(String, IpAddr)> {
        let loopback = [
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ];
        let mut out = Vec::new();
        for rule in &self.allow {
            let hit = if rule.from.addr().is_loopback() {
                Some(rule.from.addr())
            } else {
                loopback
                    .iter()
                    .chain(host_addrs.iter())
                    .map(|ip| canonical(*ip))
                    .find(|ip| rule.from.contains(ip))
            };
            if let Some(ip) = hit {
                out.push((rule.grant.name.clone(), ip));
            }
        }
        out
    }

    /// Whether agents authenticate each other (`cluster_token_file` set).
    pub fn has_cluster_token(&self) -> bool {
        self.cluster.is_some()
    }

    /// Who sent `bearer` (the token, if any) from `peer` at `now` (seconds since the epoch).
    /// Every entry is compared, in constant time, whatever matches.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        peer: Option<IpAddr>,
        now: i64,
    ) -> Result<Caller, Refused> {
        if let Some(token) = bearer {
            let hash = hash_token(token);
            let mut found: Option<&Arc<Grant>> = None;
            for t in &self.tokens {
                if bool::from(t.hash.ct_eq(&hash)) {
                    found = Some(&t.grant);
                }
            }
            if self.cluster.is_some_and(|c| bool::from(c.ct_eq(&hash))) {
                return Ok(Caller::Agent);
            }
            return match found {
                Some(g) if g.expires.is_some_and(|e| e <= now) => {
                    Err(Refused::Expired(g.name.clone()))
                }
                Some(g) => Ok(Caller::Granted(Arc::clone(g))),
                None if !self.enabled() => Ok(Caller::Open),
                None => Err(Refused::Unknown),
            };
        }
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        if let Some(ip) = peer.map(canonical) {
            if let Some(rule) = self.allow.iter().find(|r| r.from.contains(&ip)) {
                return Ok(Caller::Granted(Arc::clone(&rule.grant)));
            }
        }
        Err(Refused::Missing)
    }
}

impl Access {
    /// The grant of the token whose hash is `hash`, if it is still the same (name, scope and
    /// patterns as `was`) and not expired at `now`: an open stream of that token goes on.
    pub fn still_grants(&self, hash: &[u8; 32], was: &Grant, now: i64) -> Option<Arc<Grant>> {
        let mut found: Option<&Arc<Grant>> = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(hash)) {
                found = Some(&t.grant);
            }
        }
        let g = found?;
        let same = g.name == was.name && g.scope == was.scope && g.patterns == was.patterns;
        (same && g.expires.is_none_or(|e| e > now)).then(|| Arc::clone(g))
    }
}

/// The access settings in force: an [`Access`] behind a lock, swapped whole by
/// [`Policy::reload`] (SIGHUP) so that every request reads one consistent set; open streams
/// watch [`Policy::changes`] and end when their token is revoked.
#[derive(Debug)]
pub struct Policy {
    current: std::sync::RwLock<Arc<Access>>,
    raw: RawAccess,
    base_dir: PathBuf,
    changed: tokio::sync::watch::Sender<u64>,
    sessions: std::sync::Mutex<std::collections::HashMap<[u8; 32], Session>>,
}

/// How long a web sign-in lasts at most (less when its token expires sooner).
pub const SESSION_SECONDS: i64 = 12 * 3600;

/// A web view's sign-in: the token's grant (never the token), until `expires`.
#[derive(Debug, Clone)]
pub struct Session {
    /// The SHA-256 of the token signed in with (to see whether a reload still grants it).
    pub token_hash: [u8; 32],
    /// Its grant at sign-in.
    pub grant: Arc<Grant>,
    /// Seconds since the epoch.
    pub expires: i64,
    /// The CSRF token its state-changing requests must send (`X-CSRF-Token`).
    pub csrf: String,
}

/// A new sign-in: the cookie's session id and the CSRF token.
#[derive(Debug)]
pub struct SignedIn {
    /// The session cookie's value (random; the server keeps its SHA-256).
    pub id: String,
    /// The CSRF cookie's value.
    pub csrf: String,
    /// Seconds the cookies last.
    pub max_age: i64,
    /// The token's name (audit lines).
    pub name: String,
}

impl Policy {
    /// The settings `access`, parsed from `raw` (relative to `base_dir`), which a reload reads
    /// again.
    pub fn new(access: Access, raw: RawAccess, base_dir: PathBuf) -> Policy {
        Policy {
            current: std::sync::RwLock::new(Arc::new(access)),
            raw,
            base_dir,
            changed: tokio::sync::watch::channel(0).0,
            sessions: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether cookies must be `Secure` (`behind_https`).
    pub fn behind_https(&self) -> bool {
        self.raw.behind_https
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sign in with `token` at `now`: a session lasting until the token's expiry, at most
    /// [`SESSION_SECONDS`]. Only a token's grant signs in (not an allow rule, nor access off).
    pub fn sign_in(&self, token: &str, now: i64) -> Result<SignedIn, Refused> {
        let access = self.now();
        let Caller::Granted(grant) = access.authenticate(Some(token), None, now)? else {
            return Err(Refused::Unknown);
        };
        let expires = grant
            .expires
            .map_or(now + SESSION_SECONDS, |e| e.min(now + SESSION_SECONDS));
        let (id, csrf) = (random_hex()?, random_hex()?);
        let name = grant.name.clone();
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            hash_token(&id),
            Session {
                token_hash: hash_token(token),
                grant,
                expires,
                csrf: csrf.clone(),
            },
        );
        Ok(SignedIn {
            id,
            csrf,
            max_age: expires - now,
            name,
        })
    }

    /// The session of cookie value `id` at `now`, if it is still valid: not expired, and its
    /// token still granted the same (a reload that revoked or changed it ends the session).
    pub fn session(&self, id: &str, now: i64) -> Option<Session> {
        let key = hash_token(id);
        let mut sessions = self.sessions();
        let s = sessions.get(&key)?.clone();
        let still = (s.expires > now)
            .then(|| self.now().still_grants(&s.token_hash, &s.grant, now))
            .flatten();
        if still.is_none() {
            sessions.remove(&key);
        }
        still.map(|grant| Session { grant, ..s })
    }

    /// End the session of cookie value `id`.
    pub fn sign_out(&self, id: &str) {
        self.sessions().remove(&hash_token(id));
    }

    /// The settings now.
    pub fn now(&self) -> Arc<Access> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Read the tokens again (the configuration's own entries as they were at start, the
    /// tokens file as it is now) and put them in force; a file that does not parse keeps the
    /// tokens in force (fails safe) and says why. The cluster token stays the one read at start
    /// (this agent sends it: a new one needs a restart). Blocking (reads files).
    pub fn reload(&self) -> Result<(usize, usize), AccessError> {
        let mut next = Access::parse(&self.raw, &self.base_dir)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        next.cluster = current.cluster;
        let counts = next.counts();
        *current = Arc::new(next);
        let access = Arc::clone(&current);
        drop(current);
        let now = now();
        self.sessions()
            .retain(|_, s| access.still_grants(&s.token_hash, &s.grant, now).is_some());
        self.changed.send_modify(|n| *n += 1);
        Ok(counts)
    }

    /// [`Policy::reload`] with its audit line: the counts in force, or the error and that the
    /// previous tokens stay.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok((tokens, rules)) => {
                tracing::info!(target: "audit", tokens, allow_rules = rules, "access settings reloaded");
            }
            Err(e) => {
                tracing::error!(target: "audit", error = %e, "reloading the access settings failed: the previous tokens stay in force");
            }
        }
    }

    /// A receiver that changes on every reload.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// As [`Access::enabled`], now.
    pub fn enabled(&self) -> bool {
        self.now().enabled()
    }

    /// As [`Access::counts`], now.
    pub fn counts(&self) -> (usize, usize) {
        self.now().counts()
    }

    /// As [`Access::has_cluster_token`] (fixed at start).
    pub fn has_cluster_token(&self) -> bool {
        self.now().has_cluster_token()
    }

    /// As [`Access::rules_covering_host`], now.
    pub fn rules_covering_host(&self, host_addrs: &[IpAddr]) -> Vec<(String, IpAddr)> {
        self.now().rules_covering_host(host_addrs)
    }

    /// As [`Access::authenticate`], with the settings now.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        peer: Option<IpAddr>,
        now: i64,
    ) -> Result<Caller, Refused> {
        self.now().authenticate(bearer, peer, now)
    }
}

/// An `allow` rule's `from`: a network (`10.0.0.0/8`) or one address.
fn parse_from(s: &str) -> Option<sandbox::egress::IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<sandbox::egress::IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(sandbox::egress::IpNet::from)
}

/// An IPv4 address mapped into IPv6 (a dual-stack listener's peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The cluster token in `path`: its first line, at least 32 characters.
pub fn read_cluster_token(path: &Path) -> Result<String, AccessError> {
    let file = |reason: String| AccessError::File {
        path: path.to_path_buf(),
        reason,
    };
    // The token itself: no one but its owner may read it.
    let text = read_checked(path, "cluster token file", 0o077)?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 32 {
        return Err(file(
            "the cluster token must be at least 32 characters (mistryd token generate)".into(),
        ));
    }
    Ok(token)
}

/// The token this agent sends other agents, set once at start (`set_cluster_token`).
static CLUSTER_TOKEN: OnceLock<String> = OnceLock::new();

/// Set the token this agent sends other agents (`cluster_token_file`); once per process.
pub fn set_cluster_token(token: String) {
    let _ = CLUSTER_TOKEN.set(token);
}

/// The `Authorization` header's value for a request to another agent, if agents authenticate.
pub fn cluster_authorization() -> Option<String> {
    CLUSTER_TOKEN.get().map(|t| format!("Bearer {t}"))
}

/// 256 random bits in hex.
fn random_hex() -> Result<String, Refused> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| Refused::Unknown)?;
    Ok(hex::encode(bytes))
}

/// A new token: `mistry_` and 256 random bits in hex.
pub fn generate_token() -> Result<String, AccessError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| AccessError::File {
        path: PathBuf::from("/dev/urandom"),
        reason: e.to_string(),
    })?;
    Ok(format!("mistry_{}", hex::encode(bytes)))
}

/// The current time, seconds since the epoch.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, token: &str, scopes: &[&str], projects: &[&str]) -> RawToken {
        RawToken {
            name: name.into(),
            hash: hex::encode(hash_token(token)),
            scopes: scopes.iter().map(|s| (*s).to_string()).collect(),
            projects: projects.iter().map(|s| (*s).to_string()).collect(),
            expires: None,
        }
    }

    fn access(tokens: Vec<RawToken>, allow: Vec<RawAllow>) -> Access {
        Access::parse(
            &RawAccess {
                tokens,
                allow,
                ..RawAccess::default()
            },
            Path::new("/"),
        )
        .unwrap()
    }

    #[test]
    fn tokens_grant_their_scope_on_their_projects() {
        let mut old = raw("old", "t-old", &["admin"], &["*"]);
        old.expires = Some("2020-01-01T00:00:00Z".into());
        let a = access(
            vec![
                raw("ci", "t-ci", &["build"], &["payments-*"]),
                raw("ro", "t-ro", &["read"], &["web"]),
                raw("ops", "t-ops", &["admin"], &["*"]),
                raw("pay-ops", "t-pay-ops", &["admin"], &["payments-*"]),
                old,
            ],
            Vec::new(),
        );
        assert!(a.enabled());
        let now = parse_expires("", "2025-06-01T00:00:00Z").unwrap();
        let ci = a.authenticate(Some("t-ci"), None, now).unwrap();
        assert!(ci.allows(Scope::Build, "payments-api"));
        assert!(ci.allows(Scope::Read, "payments-api"));
        assert!(!ci.allows(Scope::Admin, "payments-api"));
        assert!(!ci.allows(Scope::Read, "web"));
        assert!(!ci.allows(Scope::Read, "payments-x/y"));
        assert!(!ci.is_admin());
        // Admin on some projects: everything of theirs, no server-wide route.
        let pay_ops = a.authenticate(Some("t-pay-ops"), None, now).unwrap();
        assert!(pay_ops.allows(Scope::Admin, "payments-api"));
        assert!(!pay_ops.allows(Scope::Read, "web"));
        assert!(!pay_ops.is_admin());
        assert!(a.authenticate(Some("t-ops"), None, now).unwrap().is_admin());
        let ro = a.authenticate(Some("t-ro"), None, now).unwrap();
        assert!(ro.allows(Scope::Read, "web") && !ro.allows(Scope::Build, "web"));
        assert_eq!(
            a.authenticate(Some("nope"), None, now).unwrap_err(),
            Refused::Unknown
        );
        assert_eq!(
            a.authenticate(None, None, now).unwrap_err(),
            Refused::Missing
        );
        assert_eq!(
            a.authenticate(Some("t-old"), None, now).unwrap_err(),
            Refused::Expired("old".into())
        );
    }

    #[test]
    fn allow_rules_match_the_peer_address() {
        let a = access(
            Vec::new(),
            vec![RawAllow {
                from: "10.0.0.0/8".into(),
                scopes: vec!["build".into()],
                projects: vec!["*".into()],
            }],
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(a
            .authenticate(None, ip("10.1.2.3"), 0)
            .unwrap()
            .allows(Scope::Build, "x"));
        assert!(a
            .authenticate(None, ip("::ffff:10.1.2.3"), 0)
            .unwrap()
            .allows(Scope::Build, "x"));
        assert_eq!(
            a.authenticate(None, ip("192.168.1.1"), 0).unwrap_err(),
            Refused::Missing
        );
        // A token given is checked even from an allowed address.
        assert_eq!(
            a.authenticate(Some("x"), ip("10.1.2.3"), 0).unwrap_err(),
            Refused::Unknown
        );
    }

    #[test]
    fn off_by_default() {
        let a = Access::default();
        assert!(!a.enabled());
        assert!(matches!(a.authenticate(None, None, 0), Ok(Caller::Open)));
        assert!(matches!(
            a.authenticate(Some("x"), None, 0),
            Ok(Caller::Open)
        ));
    }

    #[test]
    fn bad_entries_are_refused() {
        let parse = |t: RawToken| {
            Access::parse(
                &RawAccess {
                    tokens: vec![t],
                    ..RawAccess::default()
                },
                Path::new("/"),
            )
            .unwrap_err()
            .to_string()
        };
        let mut t = raw("a", "x", &["write"], &["*"]);
        assert_eq!(
            parse(t.clone()),
            "unknown scope \"write\" (read, build or admin)"
        );
        t.scopes = vec!["read".into()];
        t.hash = "abc".into();
        assert_eq!(
            parse(t.clone()),
            "token a: hash must be the SHA-256 of the token, 64 hex digits"
        );
        t.hash = hex::encode([0u8; 32]);
        t.expires = Some("30d".into());
        assert!(parse(t.clone()).starts_with("token a: expires \"30d\""));
        t.expires = None;
        t.projects = Vec::new();
        assert_eq!(parse(t), "a: no projects");
    }

    /// Review finding 8: a pattern's only wildcard is `*`; `?`, `[` and `{` are the name's own.
    #[test]
    fn patterns_are_literal_but_for_the_star() {
        let a = access(
            vec![
                raw("one", "t-one", &["read"], &["app[1]"]),
                raw("q", "t-q", &["read"], &["a?c", "{x,y}"]),
                raw("star", "t-star", &["read"], &["pay-*[v2]"]),
            ],
            Vec::new(),
        );
        let one = a.authenticate(Some("t-one"), None, 0).unwrap();
        assert!(one.allows(Scope::Read, "app[1]"));
        assert!(!one.allows(Scope::Read, "app1"));
        let q = a.authenticate(Some("t-q"), None, 0).unwrap();
        assert!(q.allows(Scope::Read, "a?c") && q.allows(Scope::Read, "{x,y}"));
        for other in ["abc", "x", "y"] {
            assert!(!q.allows(Scope::Read, other), "{other}");
        }
        let star = a.authenticate(Some("t-star"), None, 0).unwrap();
        assert!(star.allows(Scope::Read, "pay-api[v2]"));
        assert!(!star.allows(Scope::Read, "pay-apiv"));
    }

    /// Review finding 5: the rules a request from the host itself matches.
    #[test]
    fn rules_covering_the_host_are_found() {
        let rule = |from: &str| RawAllow {
            from: from.into(),
            scopes: vec!["build".into()],
            projects: vec!["*".into()],
        };
        let a = access(
            Vec::new(),
            vec![
                rule("127.0.0.2"),
                rule("10.0.0.0/8"),
                rule("192.168.0.0/16"),
                rule("::/0"),
            ],
        );
        let host: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap()];
        let found: Vec<String> = a
            .rules_covering_host(&host)
            .into_iter()
            .map(|(name, ip)| format!("{name} {ip}"))
            .collect();
        assert_eq!(
            found,
            [
                "allow[0] (127.0.0.2/32) 127.0.0.2",
                "allow[1] (10.0.0.0/8) 10.1.2.3",
                "allow[3] (::/0) ::1",
            ]
        );
    }

    /// Review finding 9: the cluster token file is its owner's alone; the tokens file is
    /// written by its owner only, and rewritten through a new file (a link in the way of a
    /// fixed temporary name is not followed).
    #[test]
    fn token_files_are_checked_and_written_safely() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ct = dir.path().join("cluster-token");
        std::fs::write(&ct, format!("{}\n", "c".repeat(40))).unwrap();
        std::fs::set_permissions(&ct, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_cluster_token(&ct).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: the cluster token file has mode 0644: group and others must not read or \
                 write it (chmod 600)",
                ct.display()
            )
        );
        std::fs::set_permissions(&ct, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_cluster_token(&ct).unwrap(), "c".repeat(40));

        let tokens = dir.path().join("tokens.json");
        std::fs::write(&tokens, "[]").unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = read_tokens_file(&tokens).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: the tokens file has mode 0666: group and others must not write it (chmod \
                 go-w)",
                tokens.display()
            )
        );
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_tokens_file(&tokens).unwrap().is_empty());
        // The old fixed temporary name, a link to a file elsewhere: left alone.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, tokens.with_extension("tmp-mistry")).unwrap();
        write_tokens_file(&tokens, &[raw("a", "t-a", &["read"], &["*"])]).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(read_tokens_file(&tokens).unwrap().len(), 1);
        let mode = std::fs::metadata(&tokens).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".tokens-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn generated_tokens_are_distinct() {
        let (a, b) = (generate_token().unwrap(), generate_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), "mistry_".len() + 64);
    }

    #[test]
    fn a_tokens_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let raw = RawAccess {
            tokens_file: Some("tokens.json".into()),
            ..RawAccess::default()
        };
        let e = Access::parse(&raw, dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("tokens.json: tokens_file does not exist (mistryd token create makes it)"),
            "{e}"
        );
        std::fs::write(dir.path().join("tokens.json"), "[]").unwrap();
        let a = Access::parse(&raw, dir.path()).unwrap();
        assert!(a.enabled());
        assert_eq!(a.authenticate(None, None, 0).unwrap_err(), Refused::Missing);
    }
}
