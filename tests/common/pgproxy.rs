//! A TCP proxy in front of PostgreSQL that a fault test controls (agents connect to it instead
//! of the server): it forwards bytes both ways until told to
//!
//! - **partition** ([`PgProxy::partition`]): every connection through it is cut and new ones are
//!   closed at once, until [`PgProxy::heal`] — an agent cut off from the database while the
//!   database and the other agents go on;
//! - **stall** ([`PgProxy::stall`]): nothing is forwarded either way, connections stay open and
//!   new ones are accepted, until [`PgProxy::heal`] — packets lost and retransmitted later (a
//!   network that drops without resets, a paused link): statements hang, then complete late;
//! - **lose a reply** ([`PgProxy::lose_reply_to`]): the next statement whose text contains a
//!   marker is forwarded, the server executes it (autocommit: it is committed), and its
//!   answer is dropped with the connection — the reply lost between a write and its answer;
//! - **delay a reply** ([`PgProxy::delay_reply_to`]): the same, but the answer is held for a
//!   while, then delivered — a client that gives up meanwhile.
//!
//! tokio-postgres sends a statement's text in a Parse message (the prepare round trip), then
//! Bind/Execute/Sync in the next write; a simple query (`Q`) carries its text and executes at
//! once. The proxy drops the first bytes the server sends after the executing write, so the
//! statement was processed (PostgreSQL answers after it ran, and flushes at Sync, after the
//! commit). Included with `#[path = "common/pgproxy.rs"] mod pgproxy;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    partitioned: AtomicBool,
    stalled: AtomicBool,
    stop: AtomicBool,
    /// The marker of the statement whose reply is to be lost (taken by the first match).
    lose: Mutex<Option<Vec<u8>>>,
    /// Replies lost so far.
    lost: AtomicUsize,
    /// The marker of the statement whose reply is to be held (taken by the first match).
    delay: Mutex<Option<Vec<u8>>>,
    /// How long it is held.
    delay_for: Mutex<Duration>,
    /// Replies being held or delayed so far.
    holding: AtomicUsize,
    /// Replies delayed so far.
    delayed: AtomicUsize,
    /// Every live connection's two sockets (to cut them).
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
}

/// The proxy: listening on 127.0.0.1 on a free port, forwarding to `127.0.0.1:<upstream>`.
pub(crate) struct PgProxy {
    pub(crate) port: u16,
    shared: Arc<Shared>,
}

impl PgProxy {
    pub(crate) fn start(upstream: u16) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.partitioned.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c), Ok(sv)) = (client.try_clone(), server.try_clone()) {
                    s.conns.lock().unwrap().push((c, sv));
                }
                // 0: nothing armed; 1: the marked statement was parsed; 2: it executes — its
                // answer is lost.
                let armed = Arc::new(AtomicU8::new(0));
                let (s1, a1) = (Arc::clone(&s), Arc::clone(&armed));
                let (c1, sv1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || upstream_pump(c1, sv1, &s1, &a1));
                let (s2, a2) = (Arc::clone(&s), armed);
                std::thread::spawn(move || downstream_pump(server, client, &s2, &a2));
            }
        });
        PgProxy { port, shared }
    }

    /// The database URL through the proxy (`postgres://mistry@127.0.0.1:PORT/mistry`).
    pub(crate) fn url(&self) -> String {
        format!("postgres://mistry@127.0.0.1:{}/mistry", self.port)
    }

    /// Cut every connection and refuse new ones until [`PgProxy::heal`].
    pub(crate) fn partition(&self) {
        self.shared.partitioned.store(true, Ordering::SeqCst);
        self.cut_all();
    }

    /// Forward nothing, either way, until [`PgProxy::heal`] (what was sent meanwhile is
    /// delivered then).
    pub(crate) fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    /// Forward again.
    pub(crate) fn heal(&self) {
        self.shared.partitioned.store(false, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// Cut every live connection (they reconnect).
    pub(crate) fn cut_all(&self) {
        for (c, s) in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Lose the reply to the next statement whose text contains `marker` (a statement is
    /// prepared once per connection: its text goes through again on a new one, see
    /// [`PgProxy::cut_all`]).
    pub(crate) fn lose_reply_to(&self, marker: &str) {
        *self.shared.lose.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    /// How many replies were lost so far.
    pub(crate) fn lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// Hold the reply to the next statement whose text contains `marker` for `delay` (the
    /// statement executes at once; see [`PgProxy::lose_reply_to`] for when its text goes
    /// through).
    pub(crate) fn delay_reply_to(&self, marker: &str, delay: Duration) {
        *self.shared.delay_for.lock().unwrap() = delay;
        *self.shared.delay.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    /// How many replies are held now or were delayed so far (counted as soon as one is held).
    pub(crate) fn holding(&self) -> usize {
        self.shared.holding.load(Ordering::SeqCst)
    }

    /// How many replies were delayed so far (counted once delivered).
    pub(crate) fn delayed(&self) -> usize {
        self.shared.delayed.load(Ordering::SeqCst)
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut_all();
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        );
    }
}

fn wait_while_stalled(s: &Shared) {
    while s.stalled.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Client → server: forwarded; a write carrying the marked statement's text arms the loss or
/// the delay (a simple query executes at once; a Parse executes with the next write). `armed`:
/// 0 nothing, 1/2 a loss armed/executing, 3/4 a delay armed/executing.
fn upstream_pump(mut client: TcpStream, mut server: TcpStream, s: &Shared, armed: &AtomicU8) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_while_stalled(s);
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        match armed.load(Ordering::SeqCst) {
            1 => armed.store(2, Ordering::SeqCst),
            3 => armed.store(4, Ordering::SeqCst),
            _ => {
                let mut lose = s.lose.lock().unwrap();
                let mut delay = s.delay.lock().unwrap();
                let now = chunk[0] == b'Q';
                if lose.as_deref().is_some_and(|m| contains(chunk, m)) {
                    *lose = None;
                    armed.store(if now { 2 } else { 1 }, Ordering::SeqCst);
                } else if delay.as_deref().is_some_and(|m| contains(chunk, m)) {
                    *delay = None;
                    armed.store(if now { 4 } else { 3 }, Ordering::SeqCst);
                }
            }
        }
        wait_while_stalled(s);
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Server → client: forwarded, but the first answer to an executing marked statement is
/// dropped and the connection cut, or held for the delay asked.
fn downstream_pump(mut server: TcpStream, mut client: TcpStream, s: &Shared, armed: &AtomicU8) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_while_stalled(s);
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match armed.load(Ordering::SeqCst) {
            2 => {
                s.lost.fetch_add(1, Ordering::SeqCst);
                break;
            }
            4 => {
                s.holding.fetch_add(1, Ordering::SeqCst);
                let d = *s.delay_for.lock().unwrap();
                std::thread::sleep(d);
                armed.store(0, Ordering::SeqCst);
                s.delayed.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        wait_while_stalled(s);
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}
