//! `mistryd token create/list/revoke/generate`: the access tokens of the configuration
//! ([`crate::access`]). A token is printed once, when it is made; only its SHA-256 is kept.
//! `create` and `revoke` edit the `tokens_file` the configuration names (entries written in the
//! configuration's own `tokens` are the operator's to edit: `create` prints the entry to add).
//! The daemon reads tokens at start: restart it after a change.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::access::{self, RawAccess, RawToken};

/// What to do with tokens.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token: print it once, and add its entry to the tokens file (or print the entry
    /// to add to `tokens`).
    Create {
        /// Who holds it (unique; audit lines name it).
        #[arg(long)]
        name: String,
        /// read, build or admin (each includes those before it).
        #[arg(long, default_value = "read")]
        scope: String,
        /// A glob of project names (`payments-*`, `*`); repeatable.
        #[arg(long = "project", required = true)]
        projects: Vec<String>,
        /// Refused after this long (`30d`, `12h`).
        #[arg(long, value_name = "AGE")]
        expires: Option<String>,
    },
    /// The tokens' names, scopes, projects and expiry (never their hashes).
    List,
    /// Remove a token from the tokens file.
    Revoke {
        /// Its name.
        name: String,
    },
    /// Print a new random token without an entry (for `cluster_token_file`).
    Generate,
}

/// The configuration's access keys and its directory (the file is read as JSON only: the
/// rest of the configuration is not checked here).
fn raw_access(config: &Path) -> Result<(RawAccess, PathBuf)> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let raw: RawAccess =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let base = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok((raw, base))
}

/// Run `cmd` against the configuration file `config`, writing to `out`: the exit code.
pub fn run(config: &Path, cmd: &TokenCommand, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        TokenCommand::Generate => {
            writeln!(out, "{}", access::generate_token()?)?;
            Ok(0)
        }
        TokenCommand::Create {
            name,
            scope,
            projects,
            expires,
        } => create(config, name, scope, projects, expires.as_deref(), out),
        TokenCommand::List => {
            let (raw, base) = raw_access(config)?;
            let file = raw.tokens_path(&base);
            let from_file = match &file {
                Some(p) => access::read_tokens_file(p)?,
                None => Vec::new(),
            };
            let now = access::now();
            writeln!(out, "NAME\tSCOPES\tPROJECTS\tEXPIRES\tIN")?;
            let inline = raw.tokens.iter().map(|t| (t, config.display().to_string()));
            let filed = from_file
                .iter()
                .map(|t| (t, file.as_deref().unwrap_or(config).display().to_string()));
            for (t, source) in inline.chain(filed) {
                let expires = match &t.expires {
                    None => "never".to_string(),
                    Some(e) => match chrono::DateTime::parse_from_rfc3339(e) {
                        Ok(at) if at.timestamp() <= now => format!("{e} (expired)"),
                        _ => e.clone(),
                    },
                };
                writeln!(
                    out,
                    "{}\t{}\t{}\t{expires}\t{source}",
                    t.name,
                    t.scopes.join(","),
                    t.projects.join(",")
                )?;
            }
            Ok(0)
        }
        TokenCommand::Revoke { name } => {
            let (raw, base) = raw_access(config)?;
            if raw.tokens.iter().any(|t| &t.name == name) {
                bail!(
                    "token {name} is in {}'s tokens: remove its entry there, then restart mistryd",
                    config.display()
                );
            }
            let Some(file) = raw.tokens_path(&base) else {
                bail!(
                    "no token named {name} ({} names no tokens_file)",
                    config.display()
                );
            };
            let mut all = access::read_tokens_file(&file)?;
            let before = all.len();
            all.retain(|t| &t.name != name);
            if all.len() == before {
                bail!("no token named {name} in {}", file.display());
            }
            access::write_tokens_file(&file, &all)?;
            tracing::info!(target: "audit", token = %name, file = %file.display(), "token revoked");
            writeln!(
                out,
                "revoked {name} (removed from {}); reload mistryd to apply (kill -HUP, systemctl reload)",
                file.display()
            )?;
            Ok(0)
        }
    }
}

fn create(
    config: &Path,
    name: &str,
    scope: &str,
    projects: &[String],
    expires: Option<&str>,
    out: &mut dyn Write,
) -> Result<i32> {
    let (raw, base) = raw_access(config)?;
    let expires = match expires {
        Some(age) => {
            let d: Duration = crate::config::parse_age(age).context("--expires")?;
            let secs = i64::try_from(d.as_secs()).context("--expires")?;
            let at = chrono::DateTime::from_timestamp(access::now().saturating_add(secs), 0)
                .context("--expires: too far")?;
            Some(at.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        }
        None => None,
    };
    let token = access::generate_token()?;
    let entry = RawToken {
        name: name.to_string(),
        hash: hex::encode(access::hash_token(&token)),
        scopes: vec![scope.to_string()],
        projects: projects.to_vec(),
        expires,
    };
    // The entry among the others must be valid (scope, globs, a unique name).
    let mut check = raw.clone();
    check.tokens = raw.all_tokens(&base)?;
    check.tokens.push(entry.clone());
    check.tokens_file = None;
    check.cluster_token_file = None;
    access::Access::parse(&check, &base)?;
    writeln!(out, "token: {token}")?;
    writeln!(out, "(shown once: only its hash is kept)")?;
    match raw.tokens_path(&base) {
        Some(file) => {
            let mut all = access::read_tokens_file(&file)?;
            all.push(entry);
            access::write_tokens_file(&file, &all)?;
            tracing::info!(target: "audit", token = %name, scope, projects = %projects.join(","), file = %file.display(), "token created");
            writeln!(
                out,
                "added {name} to {}; reload mistryd to apply (kill -HUP, systemctl reload)",
                file.display()
            )?;
        }
        None => {
            writeln!(
                out,
                "add this entry to \"tokens\" in {}, then restart mistryd:",
                config.display()
            )?;
            writeln!(out, "{}", serde_json::to_string_pretty(&entry)?)?;
        }
    }
    Ok(0)
}
