//! Isolated networks ([`crate::NetworkMode::Isolated`]): a network namespace of the sandbox's own
//! whose only way out is a `slirp4netns` under our seccomp supervisor ([`slirp`]), which refuses
//! every destination the egress policy refuses ([`crate::egress`]): the host's loopback and
//! addresses (so the daemon's API and every host service), link-local, the operator's list.
//!
//! Starting slirp4netns takes milliseconds (and tearing a TAP device down, tens), more than a
//! whole job, so namespaces are made ahead: a small pool ([`configure`]), refilled in the
//! background by worker threads, each namespace used by exactly one sandbox and then discarded
//! (its slirp4netns killed), never reused. A sandbox *joins* a pooled namespace:
//!
//! - a root daemon's namespaces belong to the host's user namespace; the thread that clones the
//!   sandbox enters the namespace for the clone and returns to its own right after
//!   ([`ThreadNetns`]), so the sandbox starts in it;
//! - a rootless daemon's belong to its held user namespace (`holder.rs`), made by a child that
//!   joined it; the intermediate process that starts a held sandbox joins the network namespace
//!   too before it clones the sandbox's own user namespace.
//!
//! Either way the sandbox's user namespace does not own the network namespace: the job cannot
//! reconfigure it. Without a held user namespace (a rootless caller without a subordinate range,
//! or holders off) a sandbox gets a new network namespace at clone and a slirp4netns attached to
//! it before it runs ([`Net::Attach`]): the same policy, started per sandbox.
//!
//! Inside, the sandbox sees `tap0` with 10.0.2.100/24, the gateway 10.0.2.2 (which refuses
//! everything: `--disable-host-loopback`), the DNS forwarder 10.0.2.3 in its `/etc/resolv.conf`
//! and its host name in `/etc/hosts` (both generated here and bound read-only).

mod netns;
mod slirp;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{egress, holder, idmap, sys, Error};

pub(crate) use slirp::Slirp;

/// Who owns a pool's namespaces: the host's user namespace (a root daemon), or a held one
/// (identified by its inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Root,
    Held(u64),
}

/// One namespace with its slirp4netns, ready for one sandbox.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) netns: OwnedFd,
    /// A detached read-only sysfs of the namespace (see `netns.rs`), if it could be made.
    pub(crate) sysfs: Option<OwnedFd>,
    pub(crate) slirp: Slirp,
    owner: Owner,
}

/// How a sandbox gets its isolated network.
#[derive(Debug)]
pub(crate) enum Net {
    /// Join this namespace (see the module documentation).
    Joined(Lease),
    /// A new namespace at clone; [`attach`] starts its slirp4netns before the sandbox runs.
    Attach,
}

/// The slirp4netns binary: `MISTRY_SLIRP4NETNS`, else the first on PATH (or the usual places).
pub fn slirp4netns_path() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("MISTRY_SLIRP4NETNS").filter(|p| !p.is_empty()) {
                return Some(PathBuf::from(p));
            }
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain(["/usr/bin", "/bin", "/usr/local/bin"].map(PathBuf::from))
                .map(|d| d.join("slirp4netns"))
                .find(|p| p.is_file())
        })
        .clone()
}

fn slirp_binary() -> Result<PathBuf, Error> {
    slirp4netns_path().ok_or_else(|| {
        Error::Network(
            "isolated network: slirp4netns is not installed (Debian: apt-get install \
             slirp4netns; or set the project's network to \"none\")"
                .into(),
        )
    })
}

/// The owner of the namespaces sandboxes of the default id mapping join now, and the held user
/// namespace's descriptor; `None` when they cannot join a made one (rootless without a holder).
fn current_owner() -> Option<(Owner, Option<Arc<OwnedFd>>, u32)> {
    let (mapping, _) = idmap::try_choose(crate::IdMapping::Auto).ok()?;
    match holder::userns_for(&mapping) {
        Some(userns) => {
            let ino = inode(userns.as_raw_fd())?;
            Some((Owner::Held(ino), Some(userns), mapping.max_id()))
        }
        None if nix::unistd::geteuid().is_root() => Some((Owner::Root, None, u32::MAX >> 1)),
        None => None,
    }
}

fn inode(fd: RawFd) -> Option<u64> {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

/// Make a namespace and its slirp4netns now, on the calling thread (which the slirp4netns dies
/// with).
fn make_lease(owner: Owner, userns: Option<&Arc<OwnedFd>>, max_id: u32) -> Result<Lease, Error> {
    let binary = slirp_binary()?;
    let userns_fd = userns.map(std::os::fd::AsRawFd::as_raw_fd);
    let (netns, sysfs) = netns::make(userns_fd, max_id)?;
    let slirp = Slirp::start(
        &binary,
        slirp::Target::Netns {
            netns: netns.as_raw_fd(),
            userns: userns_fd,
        },
        egress::egress_policy(),
    )?;
    slirp.arm();
    Ok(Lease {
        netns,
        sysfs,
        slirp,
        owner,
    })
}

// ---- The pool ----

#[derive(Debug, Default)]
struct PoolState {
    ready: VecDeque<Lease>,
    /// Workers making one now.
    making: usize,
    closed: bool,
    /// Why the last attempt failed (for `mistryd doctor` and logs), and since when it fails.
    failing: Option<(String, Instant)>,
}

#[derive(Debug)]
struct Pool {
    size: usize,
    state: Mutex<PoolState>,
    cond: Condvar,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

/// Workers making namespaces at once: making one is mostly waiting (for slirp4netns to start,
/// for the kernel to register the TAP device), so a few in parallel keep up with jobs that
/// follow each other closely.
const WORKERS: usize = 3;

/// How long a sandbox waits for a namespace a worker is making before it makes its own.
const WAIT_FOR_WORKER: Duration = Duration::from_millis(250);

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A ready namespace for `owner`, waiting a little for one being made; `None`: make one.
    fn take(&self, owner: Owner) -> Option<Lease> {
        let deadline = Instant::now() + WAIT_FOR_WORKER;
        // Dropped once the lock is released (closing a namespace's descriptors takes time).
        let mut discarded = Vec::new();
        let mut st = self.lock();
        loop {
            while let Some(lease) = st.ready.pop_front() {
                self.cond.notify_all();
                if lease.owner == owner && lease.slirp.alive() {
                    return Some(lease);
                }
                // Made for a held namespace since replaced, or its slirp4netns died: discarded.
                tracing::debug!(slirp = lease.slirp.pid(), "a pooled network is discarded");
                discarded.push(lease);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if st.closed || st.making == 0 || left.is_zero() || st.failing.is_some() {
                return None;
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// A worker: keep `size` namespaces ready until closed. After a failure it waits (1 s,
    /// doubling up to a minute) before the next attempt.
    fn work(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            {
                let mut st = self.lock();
                while !st.closed && st.ready.len() + st.making >= self.size {
                    st = self
                        .cond
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if st.closed {
                    return;
                }
                st.making += 1;
            }
            let started = Instant::now();
            let made = match current_owner() {
                Some((owner, userns, max_id)) => make_lease(owner, userns.as_ref(), max_id),
                None => Err(Error::Network(
                    "isolated network: no held user namespace to make namespaces in".into(),
                )),
            };
            let failed = {
                let mut st = self.lock();
                st.making -= 1;
                let failed = match made {
                    Ok(lease) if !st.closed => {
                        tracing::debug!(took = ?started.elapsed(), ready = st.ready.len() + 1, "isolated network made ahead");
                        st.ready.push_back(lease);
                        st.failing = None;
                        None
                    }
                    Ok(lease) => {
                        drop(st);
                        lease.slirp.stop_and_join();
                        return;
                    }
                    Err(e) => {
                        let first = st.failing.is_none();
                        st.failing = Some((e.to_string(), Instant::now()));
                        Some((e, first))
                    }
                };
                self.cond.notify_all();
                failed
            };
            match failed {
                None => backoff = Duration::from_secs(1),
                Some((e, first)) => {
                    if first {
                        tracing::warn!(error = %e, "isolated networks cannot be made ahead");
                    }
                    let st = self.lock();
                    let _ = self
                        .cond
                        .wait_timeout_while(st, backoff, |s| !s.closed)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    fn close(&self) {
        let ready: Vec<Lease> = {
            let mut st = self.lock();
            st.closed = true;
            self.cond.notify_all();
            st.ready.drain(..).collect()
        };
        let workers: Vec<_> = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        for w in workers {
            let _ = w.join();
        }
        for lease in ready {
            lease.slirp.stop_and_join();
        }
    }
}

/// Keep `size` isolated network namespaces ready for the sandboxes of this process (0: make
/// each when a sandbox needs it). Replaces a pool configured before. The workers start at once:
/// call this where isolated networks will be used (a daemon whose projects use them).
pub fn configure(size: usize) {
    stop();
    if size == 0 {
        return;
    }
    let pool = Arc::new(Pool {
        size,
        state: Mutex::new(PoolState::default()),
        cond: Condvar::new(),
        workers: Mutex::new(Vec::new()),
    });
    let mut workers = Vec::new();
    for i in 0..size.min(WORKERS) {
        let p = Arc::clone(&pool);
        match std::thread::Builder::new()
            .name(format!("mistry-netpool-{i}"))
            .stack_size(256 << 10)
            .spawn(move || p.work())
        {
            Ok(h) => workers.push(h),
            Err(e) => tracing::warn!(error = %e, "starting an isolated network pool worker"),
        }
    }
    *pool
        .workers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = workers;
    *POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pool);
}

/// Stop the pool: its workers end and every namespace not taken is discarded, its slirp4netns
/// killed and reaped (the daemon's shutdown; namespaces in use go with their sandboxes).
pub fn stop() {
    let pool = POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(p) = pool {
        p.close();
    }
}

/// How many namespaces are ready now (tests, diagnostics).
pub fn ready_count() -> usize {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map_or(0, |p| p.lock().ready.len())
}

/// How the sandbox about to start with held user namespace `held` (if any; its ids `0..=max_id`
/// mapped) gets its network.
pub(crate) fn acquire(held: Option<&Arc<OwnedFd>>, max_id: u32) -> Result<Net, Error> {
    let (owner, max_id) = match held {
        Some(userns) => {
            let ino = inode(userns.as_raw_fd()).ok_or_else(|| {
                Error::Network("isolated network: the held user namespace is gone".into())
            })?;
            (Owner::Held(ino), max_id)
        }
        None if nix::unistd::geteuid().is_root() => (Owner::Root, u32::MAX >> 1),
        None => {
            slirp_binary()?;
            return Ok(Net::Attach);
        }
    };
    let started = Instant::now();
    let pool = POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(lease) = pool.and_then(|p| p.take(owner)) {
        tracing::debug!(took = ?started.elapsed(), "isolated network from the pool");
        return Ok(Net::Joined(lease));
    }
    let lease = make_lease(owner, held, max_id)?;
    tracing::debug!(took = ?started.elapsed(), "isolated network made now");
    Ok(Net::Joined(lease))
}

/// Start the slirp4netns of a sandbox that made its own network namespace ([`Net::Attach`]):
/// `pid` is its init, its id maps written, not yet running.
pub(crate) fn attach(pid: libc::pid_t) -> Result<Slirp, Error> {
    let slirp = Slirp::start(
        &slirp_binary()?,
        slirp::Target::Pid(pid),
        egress::egress_policy(),
    )?;
    slirp.arm();
    Ok(slirp)
}

/// Check that an isolated network can be started here: a namespace made and torn down (for
/// `mistryd doctor`). Returns what was started.
pub fn check() -> Result<String, Error> {
    let binary = slirp_binary()?;
    match current_owner() {
        Some((owner, userns, max_id)) => {
            let lease = make_lease(owner, userns.as_ref(), max_id)?;
            let how = match owner {
                Owner::Root => "a namespace of the host's user namespace",
                Owner::Held(_) => "a namespace of the held user namespace",
            };
            lease.slirp.stop_and_join();
            Ok(format!("{} started for {how}", binary.display()))
        }
        None => Ok(format!(
            "{} found (sandboxes start it one by one: no held user namespace)",
            binary.display()
        )),
    }
}

// ---- /etc/resolv.conf and /etc/hosts of isolated sandboxes ----

/// The DNS forwarder and the sandbox's own address on slirp4netns' network.
const DNS: &str = "10.0.2.3";
const GUEST: &str = "10.0.2.100";

#[derive(Debug)]
struct Files {
    dir: PathBuf,
    resolv: PathBuf,
    hosts: HashMap<String, PathBuf>,
}

static FILES: Mutex<Option<Files>> = Mutex::new(None);

/// The resolv.conf text: slirp4netns' forwarder, and the host's search domains and options.
fn resolv_text(host: &str) -> String {
    let mut text = format!("nameserver {DNS}\n");
    for line in host.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "search" | "domain" | "options") {
            text.push_str(line.trim());
            text.push('\n');
        }
    }
    text
}

fn hosts_text(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{GUEST}\t{hostname}\n"
    )
}

fn file_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        what: format!("isolated network: writing {}", path.display()),
        source: e,
    }
}

fn write_new(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| file_err(path, e))
}

/// The files bound at `/etc/resolv.conf` and `/etc/hosts` of an isolated sandbox with host name
/// `hostname`, written once per process into a private directory of the temporary directory.
pub(crate) fn etc_files(hostname: &str) -> Result<(PathBuf, PathBuf), Error> {
    let mut files = FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if files.is_none() {
        use std::os::unix::fs::DirBuilderExt;
        sweep_files(&std::env::temp_dir());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("mistry-net-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .map_err(|e| file_err(&dir, e))?;
        let resolv = dir.join("resolv.conf");
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        write_new(&resolv, &resolv_text(&host))?;
        *files = Some(Files {
            dir,
            resolv,
            hosts: HashMap::new(),
        });
    }
    let Some(files) = files.as_mut() else {
        return Err(Error::Network("isolated network: no files".into()));
    };
    if !files.hosts.contains_key(hostname) {
        let path = files.dir.join(format!("hosts.{}", files.hosts.len()));
        write_new(&path, &hosts_text(hostname))?;
        files.hosts.insert(hostname.to_string(), path);
    }
    let hosts = files.hosts[hostname].clone();
    Ok((files.resolv.clone(), hosts))
}

/// Remove what processes of ours that died without [`remove_files`] (killed) left in `tmp`.
fn sweep_files(tmp: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mistry-net-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours =
            std::fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Remove the generated files (at shutdown).
pub fn remove_files() {
    if let Some(f) = FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
}

// ---- Entering a namespace on the calling thread (root daemons) ----

/// The calling thread in another network namespace until dropped, when it returns to its own.
/// Network namespaces are per thread; a thread that cannot return would run the daemon's code
/// in a job's network, so the process aborts then (it cannot happen to root, which may always
/// enter the namespace it came from).
pub(crate) struct ThreadNetns {
    own: OwnedFd,
}

impl ThreadNetns {
    /// The calling thread, already in another network namespace, returns to `own` when this is
    /// dropped.
    pub(crate) fn returning_to(own: OwnedFd) -> ThreadNetns {
        ThreadNetns { own }
    }

    pub(crate) fn enter(netns: RawFd) -> Result<ThreadNetns, Error> {
        let own = sys::open_read(c"/proc/thread-self/ns/net").map_err(|e| {
            Error::Network(format!(
                "isolated network: opening this thread's network namespace: {}",
                crate::errno_text(e)
            ))
        })?;
        // SAFETY: open returned this descriptor to us; nothing else owns it.
        let own = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(own) };
        sys::setns(netns, libc::CLONE_NEWNET).map_err(|e| {
            Error::Network(format!(
                "isolated network: entering the namespace: {}",
                crate::errno_text(e)
            ))
        })?;
        Ok(ThreadNetns { own })
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        if let Err(e) = sys::setns(self.own.as_raw_fd(), libc::CLONE_NEWNET) {
            tracing::error!(
                error = %crate::errno_text(e),
                "cannot return a thread to the daemon's network namespace: aborting"
            );
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_dead_processes_are_swept() {
        let tmp = std::env::temp_dir().join(format!("mistry-sweep-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // pid_max is at most 2^22: no process has this pid.
        let dead = tmp.join("mistry-net-99999999-0000abcd");
        let alive = tmp.join(format!("mistry-net-{}-0000abcd", std::process::id()));
        let other = tmp.join("mistry-network-1");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("hosts.0"), "x").unwrap();
        }
        sweep_files(&tmp);
        assert!(!dead.exists());
        assert!(alive.join("hosts.0").exists() && other.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn generated_files() {
        assert_eq!(
            resolv_text(
                "nameserver 127.0.0.53\nsearch example.com corp\noptions edns0 trust-ad\n# x\n"
            ),
            "nameserver 10.0.2.3\nsearch example.com corp\noptions edns0 trust-ad\n"
        );
        assert_eq!(resolv_text(""), "nameserver 10.0.2.3\n");
        assert!(hosts_text("mistry").ends_with("\n10.0.2.100\tmistry\n"));
        let (r1, h1) = etc_files("one").unwrap();
        let (r2, h2) = etc_files("two").unwrap();
        assert_eq!(r1, r2);
        assert_ne!(h1, h2);
        assert_eq!(etc_files("one").unwrap().1, h1);
        assert!(std::fs::read_to_string(&h2).unwrap().contains("\ttwo\n"));
        assert!(std::fs::read_to_string(&r1)
            .unwrap()
            .starts_with("nameserver 10.0.2.3\n"));
    }
}
