//! TLS to the cluster's database, with libpq's connection parameters: `sslmode` (`disable`,
//! `allow`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file of CA
//! certificates, or `system`), in the URL's query (`postgres://h/db?sslmode=verify-full`) or in
//! a key=value string (`host=h sslmode=verify-full`). tokio-postgres knows only `disable`,
//! `prefer` and `require` and no `sslrootcert`: [`split`] takes both out of the string before it
//! reaches tokio-postgres, and [`MakeRustls`] is the `MakeTlsConnect` (rustls, the aws-lc-rs
//! provider) that verifies what the mode asks for.
//!
//! What each mode checks, as libpq:
//! - `disable`: no TLS;
//! - `allow`, `prefer` (the default): TLS when the server offers it, else plain (tokio-postgres
//!   has no "plain first" mode: `allow` is `prefer`); the certificate is not checked unless
//!   `sslrootcert` is given (then its chain is, as `verify-ca`);
//! - `require`: TLS or no connection; the certificate is not checked unless `sslrootcert` is
//!   given (then its chain is: libpq's rule when a root certificate exists);
//! - `verify-ca`: TLS, the chain must lead to a CA of `sslrootcert` (else the system's store);
//! - `verify-full`: that and the host name (or IP address) the URL connects to must be in the
//!   certificate.
//!
//! `sslrootcert=system` (libpq 16) uses the system's CA store and makes `verify-full` the default;
//! a weaker mode with it is refused, as libpq does. Without `sslrootcert`, `verify-ca` and
//! `verify-full` use the system's store (`/etc/ssl/certs` on Debian; libpq would look for
//! `~/.postgresql/root.crt`, which mistryd does not read). Unix sockets never use TLS (libpq
//! ignores `sslmode` there). Channel binding (`SCRAM-SHA-256-PLUS`) is offered over TLS:
//! `tls-server-end-point`, for certificates signed with RSA PKCS#1 or ECDSA.
//!
//! The files: `mod.rs` the settings and errors; `params.rs` the parameters taken out of the URL
//! (and the key=value parser `db.rs`'s redaction uses); `verify.rs` the connector, the CA
//! certificates and the certificate checks of each mode; `stream.rs` the connection
//! (`MakeTlsConnect`, the stream, channel binding).

use std::path::PathBuf;

mod params;
mod stream;
mod verify;

pub(crate) use params::redact_key_values;
pub use params::split;
pub use stream::{MakeRustls, RustlsConnect, RustlsStream};
pub use verify::connector;

/// What is wrong with a database URL's TLS parameters (one line, without the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A percent-encoded query parameter of the URL that does not decode to UTF-8.
    #[error("{text:?}: {source}")]
    Encoding {
        /// The parameter's text as written.
        text: String,
        /// The decoding error.
        source: std::str::Utf8Error,
    },
    /// A key=value string with a key not followed by `=`; names the key.
    #[error("expected \"=\" after {0:?}")]
    NoEquals(String),
    /// A key=value string whose quoted value does not end; names the key.
    #[error("the value of {0:?} has no closing quote")]
    Unclosed(String),
    /// An `sslmode` value that is not one of [`SslMode::ALLOWED`]; names the value.
    #[error("sslmode {0:?} is not one of {all}", all = SslMode::ALLOWED)]
    BadMode(String),
    /// `sslrootcert=system` with an `sslmode` other than `verify-full`, as libpq refuses;
    /// names the mode.
    #[error("weak sslmode {0:?} may not be used with sslrootcert=system (use \"verify-full\")")]
    WeakMode(&'static str),
}

/// Why the TLS connector could not be made (one line naming the file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The `sslrootcert` file could not be read.
    #[error("cannot read sslrootcert {}: {source}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The `sslrootcert` file is not valid PEM.
    #[error("sslrootcert {}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate of the `sslrootcert` file that rustls does not accept as a CA.
    #[error("sslrootcert {}: {source}", path.display())]
    Cert {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The `sslrootcert` file parses but holds no certificate; names the file.
    #[error("sslrootcert {} holds no PEM certificate", .0.display())]
    NoCa(PathBuf),
    /// `sslrootcert=system`, or `verify-ca`/`verify-full` without `sslrootcert`, and the
    /// system's store (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's) has no usable
    /// certificate.
    #[error("no CA certificate in the system's store{why} (give one with sslrootcert=PATH)")]
    NoSystemCa {
        /// `: ` and the first error met loading the store, or empty.
        why: String,
    },
    /// rustls could not build a certificate verifier from the CA certificates.
    #[error("the CA certificates of {roots}: {source}")]
    Verifier {
        /// Where they came from: `sslrootcert <path>` or `the system's CA store`.
        roots: String,
        /// rustls' reason.
        source: rustls::client::VerifierBuilderError,
    },
    /// rustls refused the client configuration (its provider's protocol versions).
    #[error("TLS: {0}")]
    Config(rustls::Error),
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// `disable`: no TLS.
    Disable,
    /// `prefer` and `allow`.
    Prefer,
    /// `require`: TLS or no connection; the chain is checked only when `sslrootcert` is given.
    Require,
    /// `verify-ca`: TLS, and the chain must lead to a CA of `sslrootcert` (else the system's).
    VerifyCa,
    /// `verify-full`: as `verify-ca`, and the host name or IP address connected to must be in
    /// the certificate.
    VerifyFull,
}

impl SslMode {
    /// The allowed values, for messages.
    pub const ALLOWED: &'static str = "disable, allow, prefer, require, verify-ca, verify-full";

    fn parse(s: &str) -> Result<SslMode, ParamError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ParamError::BadMode(other.to_string())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The mode tokio-postgres negotiates with (it checks no certificate itself).
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// libpq's `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=system`.
    System,
    /// `sslrootcert=PATH`: a PEM file of CA certificates.
    File(PathBuf),
}

/// The TLS settings of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The mode; without `sslmode`, `prefer`, or `verify-full` with `sslrootcert=system`.
    pub mode: SslMode,
    /// `None`: no `sslrootcert` (or an empty one).
    pub root: Option<RootCert>,
}

#[cfg(test)]
mod tests {
    use super::stream::der_element;
    use super::*;

    fn settings(mode: SslMode, root: Option<RootCert>) -> TlsSettings {
        TlsSettings { mode, root }
    }

    #[test]
    fn urls_lose_the_libpq_parameters_and_keep_the_others() {
        assert_eq!(
            split("postgres://mistry@db.example/mistry?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem")
                .unwrap(),
            (
                "postgres://mistry@db.example/mistry".to_string(),
                settings(SslMode::VerifyFull, Some(RootCert::File("/etc/ca x.pem".into())))
            )
        );
        assert_eq!(
            split("postgresql://u:p?w@db/m?connect_timeout=3&sslmode=require&application_name=x")
                .unwrap(),
            (
                "postgresql://u:p?w@db/m?connect_timeout=3&application_name=x".to_string(),
                settings(SslMode::Require, None)
            )
        );
        assert_eq!(
            split("postgres://db/m").unwrap(),
            (
                "postgres://db/m".to_string(),
                settings(SslMode::Prefer, None)
            )
        );
        assert_eq!(
            split("postgres://db/m?sslmode=allow").unwrap().1,
            settings(SslMode::Prefer, None)
        );
        assert_eq!(
            split("postgres://db/m?sslrootcert=system").unwrap().1,
            settings(SslMode::VerifyFull, Some(RootCert::System))
        );
    }

    #[test]
    fn key_value_strings_lose_the_libpq_parameters_too() {
        assert_eq!(
            split("host=db  sslmode = 'verify-ca' user=mistry sslrootcert='/a b/c\\'a.pem' password='x y'")
                .unwrap(),
            (
                "host=db user=mistry password='x y'".to_string(),
                settings(SslMode::VerifyCa, Some(RootCert::File("/a b/c'a.pem".into())))
            )
        );
        assert_eq!(
            split("host=db sslmode='").unwrap_err().to_string(),
            "the value of \"sslmode\" has no closing quote"
        );
    }

    #[test]
    fn bad_modes_are_named_with_the_allowed_ones() {
        assert_eq!(
            split("postgres://db/m?sslmode=verify").unwrap_err().to_string(),
            "sslmode \"verify\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        assert_eq!(
            split("host=db sslmode=require sslrootcert=system").unwrap_err().to_string(),
            "weak sslmode \"require\" may not be used with sslrootcert=system (use \"verify-full\")"
        );
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let e = connector(&settings(
            SslMode::VerifyFull,
            Some(RootCert::File("/nonexistent/ca.pem".into())),
        ))
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "cannot read sslrootcert /nonexistent/ca.pem: No such file or directory (os error 2)"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = connector(&settings(
            SslMode::VerifyCa,
            Some(RootCert::File(empty.clone())),
        ))
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            format!("sslrootcert {} holds no PEM certificate", empty.display())
        );
    }

    #[test]
    fn passwords_in_key_values_are_redacted_even_quoted() {
        assert_eq!(
            redact_key_values("host=db password='a b\\' c' user=m").unwrap(),
            "host=db password=*** user=m"
        );
    }

    #[test]
    fn der_elements_are_read_with_long_lengths() {
        let mut der = vec![0x30, 0x82, 0x01, 0x00];
        der.extend(std::iter::repeat_n(7u8, 256));
        der.push(0x05);
        let (content, rest) = der_element(&der, 0x30).unwrap();
        assert_eq!((content.len(), rest), (256, &[0x05u8][..]));
        assert_eq!(der_element(&der[..100], 0x30), None);
    }
}
