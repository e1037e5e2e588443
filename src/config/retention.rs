//! The `retention` key: how long build results stay in `build_path`.
//!
//! ```json
//! "retention": {
//!   "keep": 10,          // the last N ready builds of each project and group
//!   "max_age": "14d",    // builds older than this go (Go duration, or whole days "7d")
//!   "min_free": "20GiB", // free-disk low-water mark of build_path ("10%" of its size works too)
//!   "interval": "10m"    // how often the daemon applies it in full (also after each job)
//! }
//! ```
//!
//! The targets of `latest` and `groups/<group>` and running builds are never removed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// How often the daemon applies its retention in full when `interval` is not set.
pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// The file's form of [`Retention`].
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct RawRetention {
    keep: Option<usize>,
    max_age: Option<String>,
    min_free: Option<serde_json::Value>,
    interval: Option<String>,
}

/// A free-disk low-water mark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// At least this many bytes free.
    Bytes(u64),
    /// Percent of the filesystem's size.
    Percent(f64),
}

impl MinFree {
    /// The mark in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{}", human_bytes(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What the daemon (and `mistryd purge` without flags) keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// The last N ready builds of each project and group (by start time).
    pub keep: Option<usize>,
    /// Builds that started longer ago go.
    pub max_age: Option<Duration>,
    /// Free space of `build_path` below which the oldest builds go until it is above again.
    pub min_free: Option<MinFree>,
    /// How often the daemon applies it in full.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: None,
            max_age: None,
            min_free: None,
            interval: DEFAULT_INTERVAL,
        }
    }
}

impl Retention {
    /// Whether anything is ever removed.
    pub fn is_enabled(&self) -> bool {
        self.keep.is_some() || self.max_age.is_some() || self.min_free.is_some()
    }

    pub(super) fn parse(raw: &RawRetention) -> Result<Retention> {
        let max_age = match &raw.max_age {
            Some(s) => Some(parse_age(s).context("retention.max_age")?),
            None => None,
        };
        let min_free = match &raw.min_free {
            None => None,
            Some(serde_json::Value::Number(n)) => match n.as_u64() {
                Some(b) if b > 0 => Some(MinFree::Bytes(b)),
                _ => bail!("retention.min_free: {n} is not a positive number of bytes"),
            },
            Some(serde_json::Value::String(s)) => {
                Some(parse_min_free(s).context("retention.min_free")?)
            }
            Some(other) => bail!("retention.min_free: {other} is not a size or a percentage"),
        };
        let interval = match &raw.interval {
            Some(s) => {
                let d = parse_age(s).context("retention.interval")?;
                if d.is_zero() {
                    bail!("retention.interval must be positive");
                }
                d
            }
            None => DEFAULT_INTERVAL,
        };
        Ok(Retention {
            keep: raw.keep,
            max_age,
            min_free,
            interval,
        })
    }
}

/// An age: a Go duration (`36h`, `90m`, `1h30m`) or whole days (`7d`).
pub fn parse_age(s: &str) -> Result<Duration> {
    let t = s.trim();
    if let Some(days) = t.strip_suffix('d') {
        if let Ok(n) = days.parse::<u64>() {
            return n
                .checked_mul(86_400)
                .map(Duration::from_secs)
                .with_context(|| format!("{s:?} is too long"));
        }
    }
    crate::duration::parse(t).map_err(|e| anyhow::anyhow!("{e} (examples: 7d, 36h, 90m)"))
}

/// `"20GiB"` (see [`crate::security::parse_size`]) or `"10%"`.
pub fn parse_min_free(s: &str) -> Result<MinFree> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid percentage {s:?}"))?;
        if !(v > 0.0 && v < 100.0) {
            bail!("{s:?} is not between 0% and 100%");
        }
        return Ok(MinFree::Percent(v));
    }
    crate::security::parse_size(s).map(MinFree::Bytes)
}

/// `1.5GiB`, `300MiB`, `12KiB`, `17B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_sizes_and_percentages() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("36h").unwrap(), Duration::from_secs(36 * 3600));
        assert_eq!(parse_age("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_age("soon").is_err());
        assert_eq!(parse_min_free("10%").unwrap(), MinFree::Percent(10.0));
        assert_eq!(parse_min_free("2GiB").unwrap(), MinFree::Bytes(2 << 30));
        assert!(parse_min_free("150%").is_err());
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(17), "17B");
    }

    #[test]
    fn parses_the_key() {
        let raw: RawRetention = serde_json::from_str(
            r#"{"keep": 3, "max_age": "7d", "min_free": "5%", "interval": "30s"}"#,
        )
        .unwrap();
        let r = Retention::parse(&raw).unwrap();
        assert_eq!(
            r,
            Retention {
                keep: Some(3),
                max_age: Some(Duration::from_secs(7 * 86_400)),
                min_free: Some(MinFree::Percent(5.0)),
                interval: Duration::from_secs(30),
            }
        );
        assert!(r.is_enabled());
        assert!(!Retention::default().is_enabled());
        let raw: RawRetention = serde_json::from_str(r#"{"min_free": 1048576}"#).unwrap();
        assert_eq!(
            Retention::parse(&raw).unwrap().min_free,
            Some(MinFree::Bytes(1 << 20))
        );
        let raw: RawRetention = serde_json::from_str(r#"{"max_age": "later"}"#).unwrap();
        let e = format!("{:#}", Retention::parse(&raw).unwrap_err());
        assert!(e.starts_with("retention.max_age: "), "{e}");
    }
}
