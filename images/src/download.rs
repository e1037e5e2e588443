//! `ADD <url>` downloads, under the build's network policy.
//!
//! - The caller refuses URLs outright when the build has no network (`network: none`).
//! - A size limit ([`DownloadPolicy::max_bytes`]) is enforced while the body streams in.
//! - Redirects are followed up to [`DownloadPolicy::max_redirects`]; every hop is a new
//!   connection that goes through the same address check.
//! - The host name is resolved once per connection by our resolver, which drops every address
//!   the daemon itself listens on ([`DownloadPolicy::deny_connect`]; for `0.0.0.0:P`/`[::]:P`
//!   port `P` on every local address: loopback, unspecified and the host's interfaces) and, for
//!   a project with an isolated network ([`DownloadPolicy::egress`]), every address the egress
//!   policy of isolated networks refuses (`sandbox::egress`: loopback, the host's addresses,
//!   link-local, the operator's `network_deny`...); the connection is made to exactly the
//!   addresses it returned: no DNS-rebinding gap.
//! - Proxies from the environment are not used (they would connect on our behalf, unchecked).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};

/// Limits of `ADD <url>` downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadPolicy {
    /// Largest body accepted, in bytes. Default 1 GiB.
    pub max_bytes: u64,
    /// Redirects followed at most. Default 10.
    pub max_redirects: u32,
    /// Addresses never connected to: the daemon's own listening addresses.
    pub deny_connect: Vec<SocketAddr>,
    /// Refuse every address the isolated networks' egress policy refuses
    /// (`sandbox::egress_policy()`): the project's network is `isolated`.
    pub egress: bool,
    /// Wall-clock limit of one download, redirects included (a server trickling bytes cannot
    /// hold a build forever). Default 10 minutes.
    pub timeout: Duration,
}

impl Default for DownloadPolicy {
    fn default() -> Self {
        DownloadPolicy {
            max_bytes: 1 << 30,
            max_redirects: 10,
            deny_connect: Vec::new(),
            egress: false,
            timeout: Duration::from_secs(600),
        }
    }
}

/// The addresses of the host's own interfaces (empty if they cannot be listed).
fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether connecting to `addr` could reach a socket listening at one of `deny`.
pub(crate) fn denied(addr: &SocketAddr, deny: &[SocketAddr], local: &[IpAddr]) -> bool {
    let ip = canonical(addr.ip());
    let is_local =
        ip.is_loopback() || ip.is_unspecified() || local.iter().any(|l| canonical(*l) == ip);
    deny.iter()
        .any(|d| d.port() == addr.port() && (canonical(d.ip()) == ip || is_local))
}

#[derive(Debug)]
struct CheckedResolver {
    deny: Vec<SocketAddr>,
    egress: Option<std::sync::Arc<sandbox::egress::EgressPolicy>>,
}

impl CheckedResolver {
    /// Why `addr` may not be connected to, if it may not.
    fn refusal(&self, addr: &SocketAddr, local: &[IpAddr]) -> Option<String> {
        if denied(addr, &self.deny, local) {
            return Some("the build server's own address".into());
        }
        let policy = self.egress.as_ref()?;
        policy.check(*addr).err().map(|r| r.to_string())
    }
}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = DefaultResolver::default().resolve(uri, config, timeout)?;
        if self.deny.is_empty() && self.egress.is_none() {
            return Ok(all);
        }
        let local = interface_addrs();
        let mut out = self.empty();
        let mut refused = Vec::new();
        for a in &all {
            match self.refusal(a, &local) {
                None => out.push(*a),
                Some(why) => refused.push(format!("{a}: {why}")),
            }
        }
        if out.is_empty() {
            return Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is refused ({})",
                    uri.authority()
                        .map_or("", ureq::http::uri::Authority::as_str),
                    refused.join(", ")
                ),
            )));
        }
        Ok(out)
    }
}

/// Why `ADD <url>` could not download its file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DownloadError {
    #[error("downloading {url}: more than {max} redirects")]
    Redirects { url: String, max: u32 },
    #[error("downloading {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("downloading {url}: the file is larger than the limit of {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error("{}: {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("downloading {url}: {source}")]
    Write {
        url: String,
        #[source]
        source: io::Error,
    },
}

/// Download `url` to the new file `dest` under `policy`.
pub(crate) fn download(
    url: &str,
    dest: &Path,
    policy: &DownloadPolicy,
) -> Result<(), DownloadError> {
    let config = ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(policy.max_redirects)
        .max_redirects_will_error(true)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_global(Some(policy.timeout))
        .build();
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CheckedResolver {
            deny: policy.deny_connect.clone(),
            egress: policy.egress.then(sandbox::egress_policy),
        },
    );
    let mut resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::TooManyRedirects => DownloadError::Redirects {
            url: url.to_string(),
            max: policy.max_redirects,
        },
        e => DownloadError::Request {
            url: url.to_string(),
            source: Box::new(e),
        },
    })?;
    let too_big = || DownloadError::TooLarge {
        url: url.to_string(),
        max: policy.max_bytes,
    };
    let write = |source: io::Error| DownloadError::Write {
        url: url.to_string(),
        source,
    };
    if resp
        .body()
        .content_length()
        .is_some_and(|n| n > policy.max_bytes)
    {
        return Err(too_big());
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| DownloadError::Create {
            path: dest.to_path_buf(),
            source,
        })?;
    // Read one byte past the limit to tell "exactly at the limit" from "over it".
    let mut reader = resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .take(policy.max_bytes.saturating_add(1));
    let n = io::copy(&mut reader, &mut out).map_err(write)?;
    if n > policy.max_bytes {
        drop(out);
        let _ = std::fs::remove_file(dest);
        return Err(too_big());
    }
    out.flush().map_err(write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_addresses() {
        let local: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap()];
        let any: Vec<SocketAddr> = vec!["0.0.0.0:8462".parse().unwrap()];
        let lo: Vec<SocketAddr> = vec!["127.0.0.1:8462".parse().unwrap()];
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for d in [&any, &lo] {
            assert!(denied(&a("127.0.0.1:8462"), d, &local));
            assert!(denied(&a("127.1.2.3:8462"), d, &local));
            assert!(denied(&a("0.0.0.0:8462"), d, &local));
            assert!(denied(&a("10.1.2.3:8462"), d, &local));
            assert!(denied(&a("[::1]:8462"), d, &local));
            assert!(denied(&a("[::ffff:127.0.0.1]:8462"), d, &local));
            assert!(!denied(&a("127.0.0.1:8463"), d, &local));
            assert!(!denied(&a("93.184.216.34:8462"), d, &local));
        }
        assert!(!denied(&a("127.0.0.1:80"), &[], &local));
    }
}
