//! RUN's flags as BuildKit reads them: `--mount=type=cache|bind|tmpfs|secret,...` (several per
//! RUN), `--network=default|none|host` and `--security` (refused unless `sandbox`).
//!
//! This module only parses (after variable substitution) into [`Mount`]s; `run.rs` prepares
//! them (cache directories, sources resolved by fd, secret files) and mounts them.

use std::path::{Path, PathBuf};

use sandbox::NetworkMode;

/// How steps share a cache mount (`sharing=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sharing {
    /// Every step using the id sees the same directory at once (the default).
    Shared,
    /// A step that finds the directory in use gets another one of its own.
    Private,
    /// Steps using the id wait for each other.
    Locked,
}

/// One `--mount`, with Docker's defaults filled in. Paths are absolute inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mount {
    Cache {
        target: PathBuf,
        id: String,
        sharing: Sharing,
        /// A stage or image whose `source` seeds a new cache directory.
        from: Option<String>,
        source: String,
        mode: u32,
        uid: u32,
        gid: u32,
        read_only: bool,
    },
    Bind {
        target: PathBuf,
        /// A path inside the context (no `from`) or inside the stage or image `from`.
        source: String,
        from: Option<String>,
        /// Writable; what the step writes is thrown away after it.
        rw: bool,
    },
    Tmpfs {
        target: PathBuf,
        size: Option<u64>,
    },
    Secret {
        id: String,
        /// Where the file is mounted; None with only `env=`.
        target: Option<PathBuf>,
        env: Option<String>,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

impl Mount {
    /// The mount point inside the sandbox, if it has one.
    pub(super) fn target(&self) -> Option<&Path> {
        match self {
            Mount::Cache { target, .. } | Mount::Bind { target, .. } => Some(target),
            Mount::Tmpfs { target, .. } => Some(target),
            Mount::Secret { target, .. } => target.as_deref(),
        }
    }
}

/// RUN's flags, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct RunFlags {
    pub mounts: Vec<Mount>,
    /// `--network`: None for `default` (the build's network).
    pub network: Option<NetworkMode>,
}

/// Why RUN's flags (`--mount`, `--network`, `--security`) are refused; the text names the flag
/// and what is wrong with it (the build reports it as the step's error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FlagError {
    #[error("unterminated quote in --mount={0}")]
    UnterminatedQuote(String),
    #[error("invalid value {value:?} for {key} (expected true or false)")]
    Bool { key: String, value: String },
    #[error("invalid {key} {value:?} (expected an octal mode like 0755)")]
    Octal { key: String, value: String },
    #[error("invalid {key} {value:?} (expected a number)")]
    Id { key: String, value: String },
    #[error("invalid size {0:?} (expected bytes, e.g. 65536 or 64m)")]
    Size(String),
    #[error(
        "--mount=type=ssh is not supported: mistry has no SSH agent forwarding (use a \
         secret mount for a key, or fetch sources before the build)"
    )]
    Ssh,
    #[error("unknown mount type {0:?} (expected bind, cache, tmpfs or secret)")]
    MountType(String),
    #[error("unknown option {key:?} for --mount=type={kind}")]
    MountOption { key: String, kind: String },
    #[error("--mount option {0} needs a value ({0}=...)")]
    OptionValue(String),
    #[error("invalid sharing {0:?} (expected shared, private or locked)")]
    Sharing(String),
    #[error("--mount=type={0} needs a target")]
    NoTarget(String),
    #[error("--mount=type=secret needs an id")]
    NoSecretId,
    #[error("invalid secret id {0:?}")]
    SecretId(String),
    #[error("invalid env {0:?} for a secret")]
    SecretEnv(String),
    #[error("--{0} needs a value (--{0}=...)")]
    FlagValue(String),
    /// One `--mount` value and what is wrong with it.
    #[error("--mount={value}: {source}")]
    Mount {
        value: String,
        #[source]
        source: Box<FlagError>,
    },
    #[error("--network={0}: unknown network (expected default, none or host)")]
    Network(String),
    #[error(
        "--security=insecure is not supported: RUN steps always run \
                                in mistry's rootless sandbox, without extra privileges"
    )]
    Insecure,
    #[error("--security={0}: unknown value (expected sandbox)")]
    Security(String),
    #[error("unknown flag --{0} for RUN")]
    Flag(String),
    #[error("a mount cannot have / as its target")]
    RootTarget,
    #[error("two mounts on {}", .0.display())]
    TwoMounts(PathBuf),
}

/// Split a CSV field list as BuildKit's `--mount` value (`encoding/csv`): commas separate
/// fields, a field may be double-quoted (`"target=/a,b"`), `""` inside quotes is a quote.
fn csv_fields(value: &str) -> Result<Vec<String>, FlagError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted => {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                }
            }
            '"' if cur.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(FlagError::UnterminatedQuote(value.to_string()));
    }
    out.push(cur);
    Ok(out)
}

fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, FlagError> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(v) => Err(FlagError::Bool {
            key: key.to_string(),
            value: v.to_string(),
        }),
    }
}

fn parse_octal(key: &str, v: &str) -> Result<u32, FlagError> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| FlagError::Octal {
            key: key.to_string(),
            value: v.to_string(),
        })
}

fn parse_id(key: &str, v: &str) -> Result<u32, FlagError> {
    v.parse().map_err(|_| FlagError::Id {
        key: key.to_string(),
        value: v.to_string(),
    })
}

/// A size as BuildKit's tmpfs `size=` (`units.RAMInBytes`): bytes, or with a k/m/g/t suffix
/// (binary, an optional trailing `b`/`ib`).
fn parse_size(v: &str) -> Result<u64, FlagError> {
    let bad = || FlagError::Size(v.to_string());
    let lower = v.trim().to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(bad());
    }
    Ok((n * mult as f64) as u64)
}

/// The absolute mount point: a relative target is relative to the working directory.
fn target_path(target: &str, workdir: &str) -> PathBuf {
    let base = if workdir.is_empty() { "/" } else { workdir };
    sandbox::paths::normalize_inside(&Path::new(base).join(target))
}

/// Parse one `--mount` value (after substitution). `workdir` is the step's working directory.
pub(super) fn parse_mount(value: &str, workdir: &str) -> Result<Mount, FlagError> {
    let mut fields: Vec<(String, Option<String>)> = Vec::new();
    for f in csv_fields(value)? {
        let f = f.trim();
        if f.is_empty() {
            continue;
        }
        match f.split_once('=') {
            Some((k, v)) => fields.push((k.trim().to_ascii_lowercase(), Some(v.to_string()))),
            None => fields.push((f.to_ascii_lowercase(), None)),
        }
    }
    let kind = fields
        .iter()
        .find(|(k, _)| k == "type")
        .map_or_else(|| "bind".into(), |(_, v)| v.clone().unwrap_or_default());
    let allowed: &[&str] = match kind.as_str() {
        "bind" => &[
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "rw",
            "readwrite",
            "ro",
            "readonly",
        ],
        "cache" => &[
            "target",
            "dst",
            "destination",
            "id",
            "sharing",
            "from",
            "source",
            "src",
            "mode",
            "uid",
            "gid",
            "ro",
            "readonly",
        ],
        "tmpfs" => &["target", "dst", "destination", "size"],
        "secret" => &[
            "id",
            "target",
            "dst",
            "destination",
            "required",
            "mode",
            "uid",
            "gid",
            "env",
        ],
        "ssh" => return Err(FlagError::Ssh),
        other => return Err(FlagError::MountType(other.to_string())),
    };
    let mut target: Option<String> = None;
    let mut source: Option<String> = None;
    let mut from = None;
    let mut id = None;
    let mut sharing = Sharing::Shared;
    let mut mode = None;
    let mut uid = 0;
    let mut gid = 0;
    let mut read_only = None;
    let mut required = false;
    let mut size = None;
    let mut env = None;
    for (k, v) in &fields {
        if k == "type" {
            continue;
        }
        if !allowed.contains(&k.as_str()) {
            return Err(FlagError::MountOption {
                key: k.clone(),
                kind,
            });
        }
        let is_flag = matches!(
            k.as_str(),
            "rw" | "readwrite" | "ro" | "readonly" | "required"
        );
        let val = match v {
            Some(v) => v.as_str(),
            None if is_flag => "",
            None => return Err(FlagError::OptionValue(k.clone())),
        };
        match k.as_str() {
            "target" | "dst" | "destination" => target = Some(val.to_string()),
            "source" | "src" => source = Some(val.to_string()),
            "from" => from = Some(val.to_string()),
            "id" => id = Some(val.to_string()),
            "sharing" => {
                sharing = match val {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    other => return Err(FlagError::Sharing(other.to_string())),
                }
            }
            "mode" => mode = Some(parse_octal(k, val)?),
            "uid" => uid = parse_id(k, val)?,
            "gid" => gid = parse_id(k, val)?,
            "rw" | "readwrite" => read_only = Some(!parse_bool(k, v.as_deref())?),
            "ro" | "readonly" => read_only = Some(parse_bool(k, v.as_deref())?),
            "required" => required = parse_bool(k, v.as_deref())?,
            "size" => size = Some(parse_size(val)?),
            "env" => env = Some(val.to_string()),
            _ => {}
        }
    }
    let need_target = |t: Option<String>| {
        t.filter(|t| !t.is_empty())
            .ok_or_else(|| FlagError::NoTarget(kind.clone()))
    };
    Ok(match kind.as_str() {
        "bind" => Mount::Bind {
            target: target_path(&need_target(target)?, workdir),
            source: source.unwrap_or_default(),
            from,
            rw: read_only == Some(false),
        },
        "cache" => {
            let target = target_path(&need_target(target)?, workdir);
            Mount::Cache {
                id: id
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| target.display().to_string()),
                target,
                sharing,
                from,
                source: source.unwrap_or_default(),
                mode: mode.unwrap_or(0o755),
                uid,
                gid,
                read_only: read_only.unwrap_or(false),
            }
        }
        "tmpfs" => Mount::Tmpfs {
            target: target_path(&need_target(target)?, workdir),
            size,
        },
        _ => {
            // secret: the id defaults to the target's file name; the target to
            // /run/secrets/<id>, unless only an environment variable is asked for.
            let id = match (id.filter(|i| !i.is_empty()), &target) {
                (Some(id), _) => id,
                (None, Some(t)) => Path::new(t)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or(FlagError::NoSecretId)?,
                (None, None) => return Err(FlagError::NoSecretId),
            };
            if id.contains('/') || id == "." || id == ".." {
                return Err(FlagError::SecretId(id));
            }
            let target = match (target, &env) {
                (Some(t), _) => Some(target_path(&t, workdir)),
                (None, Some(_)) => None,
                (None, None) => Some(PathBuf::from("/run/secrets").join(&id)),
            };
            if let Some(e) = &env {
                if e.is_empty() || e.contains('=') {
                    return Err(FlagError::SecretEnv(e.clone()));
                }
            }
            Mount::Secret {
                id,
                target,
                env,
                required,
                mode: mode.unwrap_or(0o400),
                uid,
                gid,
            }
        }
    })
}

/// Parse RUN's `--network` and `--security` values and every `--mount` (already substituted);
/// `workdir` is the step's working directory.
pub(super) fn parse_flags(
    flags: &[(String, Option<String>)],
    workdir: &str,
) -> Result<RunFlags, FlagError> {
    let mut out = RunFlags::default();
    for (k, v) in flags {
        let value = match v {
            Some(v) => v.clone(),
            None => return Err(FlagError::FlagValue(k.clone())),
        };
        match k.as_str() {
            "mount" => {
                let m = parse_mount(&value, workdir).map_err(|e| FlagError::Mount {
                    value: value.clone(),
                    source: Box::new(e),
                })?;
                out.mounts.push(m);
            }
            "network" => {
                out.network = match value.as_str() {
                    "default" => None,
                    "none" => Some(NetworkMode::None),
                    "host" => Some(NetworkMode::Host),
                    other => return Err(FlagError::Network(other.to_string())),
                }
            }
            "security" => match value.as_str() {
                "sandbox" => {}
                "insecure" => return Err(FlagError::Insecure),
                other => return Err(FlagError::Security(other.to_string())),
            },
            other => return Err(FlagError::Flag(other.to_string())),
        }
    }
    // Two mounts on one target: BuildKit refuses them too.
    let mut seen: Vec<&Path> = Vec::new();
    for m in &out.mounts {
        if let Some(t) = m.target() {
            if t == Path::new("/") {
                return Err(FlagError::RootTarget);
            }
            if seen.contains(&t) {
                return Err(FlagError::TwoMounts(t.to_path_buf()));
            }
            seen.push(t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: &[&str]) -> Vec<(String, Option<String>)> {
        v.iter()
            .map(|f| {
                let (k, v) = f.split_once('=').unwrap();
                (k.to_string(), Some(v.to_string()))
            })
            .collect()
    }

    fn parse(v: &[&str]) -> Result<RunFlags, FlagError> {
        parse_flags(&flags(v), "/work")
    }

    #[test]
    fn cache_defaults_and_options() {
        let f = parse(&["mount=type=cache,target=/var/cache/apt,sharing=locked"]).unwrap();
        assert_eq!(
            f.mounts,
            vec![Mount::Cache {
                target: "/var/cache/apt".into(),
                id: "/var/cache/apt".into(),
                sharing: Sharing::Locked,
                from: None,
                source: String::new(),
                mode: 0o755,
                uid: 0,
                gid: 0,
                read_only: false,
            }]
        );
        let f = parse(&["mount=type=cache,id=npm,dst=.npm,mode=0700,uid=1000,gid=100,ro"]).unwrap();
        assert_eq!(
            f.mounts,
            vec![Mount::Cache {
                target: "/work/.npm".into(),
                id: "npm".into(),
                sharing: Sharing::Shared,
                from: None,
                source: String::new(),
                mode: 0o700,
                uid: 1000,
                gid: 100,
                read_only: true,
            }]
        );
    }

    #[test]
    fn bind_tmpfs_secret() {
        let f = parse(&[
            "mount=target=/src",
            "mount=type=bind,from=build,source=/out,target=/in,rw",
            "mount=type=tmpfs,target=/scratch,size=64m",
            "mount=type=secret,id=token",
            "mount=type=secret,id=k,env=KEY",
            "mount=type=secret,target=/etc/npmrc,required=true,mode=0440,uid=1",
        ])
        .unwrap();
        assert_eq!(
            f.mounts,
            vec![
                Mount::Bind {
                    target: "/src".into(),
                    source: String::new(),
                    from: None,
                    rw: false
                },
                Mount::Bind {
                    target: "/in".into(),
                    source: "/out".into(),
                    from: Some("build".into()),
                    rw: true
                },
                Mount::Tmpfs {
                    target: "/scratch".into(),
                    size: Some(64 << 20)
                },
                Mount::Secret {
                    id: "token".into(),
                    target: Some("/run/secrets/token".into()),
                    env: None,
                    required: false,
                    mode: 0o400,
                    uid: 0,
                    gid: 0
                },
                Mount::Secret {
                    id: "k".into(),
                    target: None,
                    env: Some("KEY".into()),
                    required: false,
                    mode: 0o400,
                    uid: 0,
                    gid: 0
                },
                Mount::Secret {
                    id: "npmrc".into(),
                    target: Some("/etc/npmrc".into()),
                    env: None,
                    required: true,
                    mode: 0o440,
                    uid: 1,
                    gid: 0
                },
            ]
        );
    }

    #[test]
    fn network_and_security() {
        assert_eq!(
            parse(&["network=none"]).unwrap().network,
            Some(NetworkMode::None)
        );
        assert_eq!(
            parse(&["network=host"]).unwrap().network,
            Some(NetworkMode::Host)
        );
        assert_eq!(parse(&["network=default"]).unwrap().network, None);
        assert!(parse(&["security=sandbox"]).is_ok());
        assert_eq!(
            parse(&["network=bridge"]).unwrap_err().to_string(),
            "--network=bridge: unknown network (expected default, none or host)"
        );
        assert!(parse(&["security=insecure"])
            .unwrap_err()
            .to_string()
            .starts_with("--security=insecure is not supported"));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = |v: &str| parse(&[v]).unwrap_err().to_string();
        assert_eq!(
            e("mount=type=cache,target=/x,colour=red"),
            "--mount=type=cache,target=/x,colour=red: unknown option \"colour\" for --mount=type=cache"
        );
        assert_eq!(
            e("mount=type=volume,target=/x"),
            "--mount=type=volume,target=/x: unknown mount type \"volume\" (expected bind, cache, tmpfs or secret)"
        );
        assert!(e("mount=type=ssh").contains("type=ssh is not supported"));
        assert!(e("mount=type=cache").ends_with("needs a target"));
        assert!(e("mount=type=cache,target=/x,sharing=sometimes").contains("invalid sharing"));
        assert!(e("mount=type=cache,target=/x,mode=999").contains("invalid mode"));
        assert!(e("mount=type=tmpfs,target=/x,size=lots").contains("invalid size"));
        assert_eq!(
            parse(&["mount=type=tmpfs,target=/x", "mount=type=cache,target=/x"])
                .unwrap_err()
                .to_string(),
            "two mounts on /x"
        );
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(
            csv_fields(r#"type=bind,"target=/a,b",source=x"#).unwrap(),
            vec!["type=bind", "target=/a,b", "source=x"]
        );
        assert!(csv_fields(r#""target=/a"#).is_err());
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    }
}
