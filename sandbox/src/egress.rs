//! Where an isolated network may connect: the one egress policy of mistry.
//!
//! Two places make outbound connections on behalf of project code and check them here:
//!
//! - the supervisor of each isolated network's `slirp4netns` (see `net`), which stops every
//!   `connect`, and every `sendto`/`sendmsg` with a destination, of that process and answers it
//!   with this policy;
//! - `ADD <url>` downloads of the image builder (the `images` crate), which resolve a name,
//!   check every address here and connect to exactly the addresses that passed.
//!
//! Refused, always: loopback (`127.0.0.0/8`, `::1`), unspecified (`0.0.0.0/8`, `::`),
//! link-local (`169.254.0.0/16`, `fe80::/10`: cloud metadata services), multicast and the
//! limited broadcast, and every address of the host's own interfaces (and their broadcast
//! addresses), read fresh at most once a second: the daemon listens on them (`0.0.0.0:8462` by
//! default), and so may every other service of the host. Then the operator's list
//! (`network_deny`) and the addresses the daemon adds while it runs ([`EgressPolicy::set_dynamic`]:
//! the cluster's database and the other agents). IPv4-mapped IPv6 addresses are checked as the
//! IPv4 address they are.
//!
//! One exception, for slirp4netns alone ([`EgressPolicy::check_slirp`]): port 53 of a name
//! server of the host's `/etc/resolv.conf`, where it forwards the DNS queries a job sends to
//! `10.0.2.3` (a host resolver on `127.0.0.53` is loopback, yet must answer).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use ipnet::IpNet;

/// Why a destination is refused (the text names the address and the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 127.0.0.0/8 or `::1` (the host's own services).
    #[error("{0} is a loopback address")]
    Loopback(IpAddr),
    /// 0.0.0.0/8 or `::`, which reach this host.
    #[error("{0} is unspecified (this host)")]
    Unspecified(IpAddr),
    /// 169.254.0.0/16 or fe80::/10 (cloud metadata services live there).
    #[error("{0} is link-local (e.g. a cloud metadata service)")]
    LinkLocal(IpAddr),
    /// A multicast address, or the IPv4 broadcast address.
    #[error("{0} is a multicast or broadcast address")]
    Multicast(IpAddr),
    /// An address of one of this host's interfaces (or its broadcast address).
    #[error("{0} is an address of this host")]
    Host(IpAddr),
    /// Inside a denied network: the operator's, or one added while running (e.g. the cluster's
    /// database and agents); the address, then the network.
    #[error("{0} is in the denied network {1}")]
    Denied(IpAddr, IpNet),
    /// A socket address of another family than IPv4 and IPv6 (a Unix socket, a netlink...).
    #[error("address family {0} is not allowed")]
    Family(u16),
}

/// What the policy knows of the host: its interfaces' addresses and its name servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Addresses of the host's interfaces, and their broadcast addresses.
    pub addrs: Vec<IpAddr>,
    /// The `nameserver` entries of `/etc/resolv.conf`.
    pub nameservers: Vec<IpAddr>,
}

impl HostFacts {
    /// Read them now.
    pub fn read() -> HostFacts {
        let mut addrs = Vec::new();
        if let Ok(list) = nix::ifaddrs::getifaddrs() {
            for a in list {
                for sa in [a.address, a.broadcast].into_iter().flatten() {
                    if let Some(v4) = sa.as_sockaddr_in() {
                        addrs.push(IpAddr::V4(v4.ip()));
                    } else if let Some(v6) = sa.as_sockaddr_in6() {
                        addrs.push(IpAddr::V6(v6.ip()));
                    }
                }
            }
        }
        addrs.sort();
        addrs.dedup();
        let nameservers = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| nameservers(&t))
            .unwrap_or_default();
        HostFacts { addrs, nameservers }
    }
}

/// The `nameserver` addresses of a resolv.conf text.
pub(crate) fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                // A scoped IPv6 address (fe80::1%eth0) is checked without its scope.
                .and_then(|w| w.split('%').next())
                .and_then(|w| w.parse::<IpAddr>().ok())
        })
        .map(canonical)
        .collect()
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; every other address as it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The rules, given what is known of the host (pure: the unit tests call it). `dns`: let port
/// 53 of the host's name servers through (slirp4netns' forwarder).
pub(crate) fn check_with(
    addr: SocketAddr,
    facts: &HostFacts,
    deny: &[IpNet],
    dynamic: &[IpNet],
    dns: bool,
) -> Result<(), Refusal> {
    let ip = canonical(addr.ip());
    if dns && addr.port() == 53 && facts.nameservers.contains(&ip) {
        return Ok(());
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.octets()[0] == 0 {
                return Err(Refusal::Unspecified(ip));
            }
            if v4.is_loopback() {
                return Err(Refusal::Loopback(ip));
            }
            if v4.is_link_local() {
                return Err(Refusal::LinkLocal(ip));
            }
            if v4.is_multicast() || v4 == Ipv4Addr::BROADCAST {
                return Err(Refusal::Multicast(ip));
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                return Err(Refusal::Unspecified(ip));
            }
            if v6.is_loopback() {
                return Err(Refusal::Loopback(ip));
            }
            if is_link_local_v6(&v6) {
                return Err(Refusal::LinkLocal(ip));
            }
            if v6.is_multicast() {
                return Err(Refusal::Multicast(ip));
            }
        }
    }
    if facts.addrs.iter().any(|a| canonical(*a) == ip) {
        return Err(Refusal::Host(ip));
    }
    if let Some(net) = deny.iter().chain(dynamic).find(|n| n.contains(&ip)) {
        return Err(Refusal::Denied(ip, *net));
    }
    Ok(())
}

fn is_link_local_v6(v6: &Ipv6Addr) -> bool {
    (v6.segments()[0] & 0xffc0) == 0xfe80
}

/// How long the host's addresses and name servers are reused before they are read again.
const FACTS_TTL: Duration = Duration::from_secs(1);

/// The egress policy of isolated networks and `ADD <url>` (see the module documentation).
#[derive(Debug, Default)]
pub struct EgressPolicy {
    deny: Vec<IpNet>,
    dynamic: RwLock<Vec<IpNet>>,
    facts: Mutex<Option<(Instant, Arc<HostFacts>)>>,
}

impl EgressPolicy {
    /// The built-in rules plus the operator's networks `deny`.
    pub fn new(deny: Vec<IpNet>) -> EgressPolicy {
        EgressPolicy {
            deny,
            ..EgressPolicy::default()
        }
    }

    /// The operator's networks.
    pub fn denied(&self) -> &[IpNet] {
        &self.deny
    }

    /// Replace the networks the daemon denies while it runs (the cluster's database and the
    /// other agents' addresses).
    pub fn set_dynamic(&self, nets: Vec<IpNet>) {
        *self
            .dynamic
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = nets;
    }

    /// The host's addresses and name servers, read at most once a second.
    fn facts(&self) -> Arc<HostFacts> {
        let mut cached = self
            .facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, facts)) = cached.as_ref() {
            if at.elapsed() < FACTS_TTL {
                return Arc::clone(facts);
            }
        }
        let facts = Arc::new(HostFacts::read());
        *cached = Some((Instant::now(), Arc::clone(&facts)));
        facts
    }

    /// May a download of the daemon (`ADD <url>`) connect to `addr`?
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        self.check_as(addr, false)
    }

    /// May an isolated network's slirp4netns connect or send to `addr`? As [`Self::check`],
    /// and port 53 of the host's name servers for its DNS forwarder (`10.0.2.3`).
    pub fn check_slirp(&self, addr: SocketAddr) -> Result<(), Refusal> {
        self.check_as(addr, true)
    }

    fn check_as(&self, addr: SocketAddr, dns: bool) -> Result<(), Refusal> {
        let facts = self.facts();
        let dynamic = self
            .dynamic
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        check_with(addr, &facts, &self.deny, &dynamic, dns)
    }
}

static POLICY: RwLock<Option<Arc<EgressPolicy>>> = RwLock::new(None);

/// Set the egress policy of this process's isolated networks and downloads (default: the
/// built-in rules alone).
pub fn set_egress_policy(policy: Arc<EgressPolicy>) {
    *POLICY
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(policy);
}

/// The egress policy in force (see [`set_egress_policy`]).
pub fn egress_policy() -> Arc<EgressPolicy> {
    let mut slot = POLICY
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Arc::clone(slot.get_or_insert_with(|| Arc::new(EgressPolicy::default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn facts() -> HostFacts {
        HostFacts {
            addrs: vec![
                "192.0.2.2".parse().unwrap(),
                "192.0.2.255".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ],
            nameservers: vec![
                "127.0.0.53".parse().unwrap(),
                "10.255.255.53".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn built_in_rules() {
        let f = facts();
        let check = |s: &str| check_with(a(s), &f, &[], &[], true);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            check("127.0.0.1:8462"),
            Err(Refusal::Loopback(ip("127.0.0.1")))
        );
        assert_eq!(
            check("127.3.4.5:5432"),
            Err(Refusal::Loopback(ip("127.3.4.5")))
        );
        assert_eq!(check("[::1]:80"), Err(Refusal::Loopback(ip("::1"))));
        assert_eq!(
            check("[::ffff:127.0.0.1]:80"),
            Err(Refusal::Loopback(ip("127.0.0.1")))
        );
        assert_eq!(
            check("0.0.0.0:80"),
            Err(Refusal::Unspecified(ip("0.0.0.0")))
        );
        assert_eq!(
            check("0.1.2.3:80"),
            Err(Refusal::Unspecified(ip("0.1.2.3")))
        );
        assert_eq!(check("[::]:80"), Err(Refusal::Unspecified(ip("::"))));
        assert_eq!(
            check("169.254.169.254:80"),
            Err(Refusal::LinkLocal(ip("169.254.169.254")))
        );
        assert_eq!(
            check("[fe80::1]:80"),
            Err(Refusal::LinkLocal(ip("fe80::1")))
        );
        assert_eq!(
            check("[febf::1]:80"),
            Err(Refusal::LinkLocal(ip("febf::1")))
        );
        assert_eq!(
            check("224.0.0.1:5353"),
            Err(Refusal::Multicast(ip("224.0.0.1")))
        );
        assert_eq!(
            check("255.255.255.255:67"),
            Err(Refusal::Multicast(ip("255.255.255.255")))
        );
        assert_eq!(
            check("[ff02::1]:80"),
            Err(Refusal::Multicast(ip("ff02::1")))
        );
        // The host's own addresses (the daemon listens on 0.0.0.0) and broadcast address.
        assert_eq!(check("192.0.2.2:8462"), Err(Refusal::Host(ip("192.0.2.2"))));
        assert_eq!(
            check("192.0.2.255:9"),
            Err(Refusal::Host(ip("192.0.2.255")))
        );
        assert_eq!(check("[fd00::2]:22"), Err(Refusal::Host(ip("fd00::2"))));
        assert_eq!(
            check("[::ffff:192.0.2.2]:22"),
            Err(Refusal::Host(ip("192.0.2.2")))
        );
        // Elsewhere: allowed, also the host's neighbours.
        assert_eq!(check("192.0.2.1:443"), Ok(()));
        assert_eq!(check("93.184.216.34:443"), Ok(()));
        assert_eq!(check("[2001:db8::1]:443"), Ok(()));
        assert_eq!(check("[fec0::1]:443"), Ok(()));
        // DNS: port 53 of a name server, and nothing else of it.
        assert_eq!(check("127.0.0.53:53"), Ok(()));
        assert_eq!(check("10.255.255.53:53"), Ok(()));
        assert_eq!(
            check("127.0.0.53:8462"),
            Err(Refusal::Loopback(ip("127.0.0.53")))
        );
        assert_eq!(
            check("127.0.0.1:53"),
            Err(Refusal::Loopback(ip("127.0.0.1")))
        );
        // Downloads of the daemon resolve names themselves: no exception.
        assert_eq!(
            check_with(a("127.0.0.53:53"), &f, &[], &[], false),
            Err(Refusal::Loopback(ip("127.0.0.53")))
        );
    }

    #[test]
    fn operator_and_dynamic_networks() {
        let f = facts();
        let deny: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd12::/16".parse().unwrap()];
        let dynamic: Vec<IpNet> = vec!["198.51.100.7/32".parse().unwrap()];
        let check = |s: &str| check_with(a(s), &f, &deny, &dynamic, true);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            check("10.1.2.3:5432"),
            Err(Refusal::Denied(ip("10.1.2.3"), deny[0]))
        );
        assert_eq!(
            check("[::ffff:10.1.2.3]:5432"),
            Err(Refusal::Denied(ip("10.1.2.3"), deny[0]))
        );
        assert_eq!(
            check("[fd12::9]:80"),
            Err(Refusal::Denied(ip("fd12::9"), deny[1]))
        );
        assert_eq!(
            check("198.51.100.7:8462"),
            Err(Refusal::Denied(ip("198.51.100.7"), dynamic[0]))
        );
        assert_eq!(check("198.51.100.8:8462"), Ok(()));
        // The name server's port 53 stays reachable inside a denied network.
        assert_eq!(check("10.255.255.53:53"), Ok(()));
        assert_eq!(
            check("10.255.255.53:80"),
            Err(Refusal::Denied(ip("10.255.255.53"), deny[0]))
        );
    }

    #[test]
    fn resolv_conf_name_servers() {
        let text =
            "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n\
                    nameserver\nnameserver bogus\noptions edns0\n nameserver 10.0.0.2\n";
        assert_eq!(
            nameservers(text),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn the_policy_reads_the_hosts_addresses() {
        let p = EgressPolicy::new(vec!["203.0.113.0/24".parse().unwrap()]);
        assert!(matches!(
            p.check(a("127.0.0.1:1")),
            Err(Refusal::Loopback(_))
        ));
        assert!(matches!(
            p.check(a("203.0.113.9:1")),
            Err(Refusal::Denied(..))
        ));
        // Every address of this host's interfaces is refused.
        for ip in HostFacts::read().addrs {
            assert!(p.check(SocketAddr::new(ip, 8462)).is_err(), "{ip}");
        }
        p.set_dynamic(vec!["198.51.100.0/24".parse().unwrap()]);
        assert!(p.check(a("198.51.100.1:1")).is_err());
        p.set_dynamic(Vec::new());
        assert_eq!(p.check(a("198.51.100.1:1")), Ok(()));
    }
}
