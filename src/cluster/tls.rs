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

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `prefer` and `allow`.
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The allowed values, for messages.
    pub const ALLOWED: &'static str = "disable, allow, prefer, require, verify-ca, verify-full";

    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of {}",
                    SslMode::ALLOWED
                ))
            }
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
    File(PathBuf),
}

/// The TLS settings of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root: Option<RootCert>,
}

/// Take libpq's `sslmode` and `sslrootcert` out of `url` (a URL or a key=value string): the
/// string left for tokio-postgres, and the settings. Errors are one line, without the URL.
pub fn split(url: &str) -> Result<(String, TlsSettings), String> {
    let (rest, params) = if let Some(scheme_end) = url_prefix_len(url) {
        split_url(url, scheme_end)?
    } else {
        split_key_values(url)?
    };
    let mut mode = None;
    let mut root = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            _ => {
                root = match value.as_str() {
                    "" => None,
                    "system" => Some(RootCert::System),
                    path => Some(RootCert::File(PathBuf::from(path))),
                }
            }
        }
    }
    let mode = match (mode, &root) {
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
            return Err(format!(
                "weak sslmode {:?} may not be used with sslrootcert=system (use \"verify-full\")",
                m.name()
            ))
        }
        (Some(m), _) => m,
    };
    Ok((rest, TlsSettings { mode, root }))
}

/// The parameters [`split`] takes out.
fn ours(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// `postgres://` or `postgresql://`: its length.
fn url_prefix_len(url: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))
        .map(|p| p.len())
}

/// Where a URL's query starts (its `?`), as tokio-postgres reads it: the credentials end at the
/// first `@`, the host and path at the first `?` after them.
fn query_start(url: &str, prefix: usize) -> Option<usize> {
    let after = &url[prefix..];
    let from = prefix + after.find('@').map_or(0, |at| at + 1);
    url[from..].find('?').map(|q| from + q)
}

fn split_url(url: &str, prefix: usize) -> Result<(String, Vec<(String, String)>), String> {
    let Some(q) = query_start(url, prefix) else {
        return Ok((url.to_string(), Vec::new()));
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|e| format!("{s:?}: {e}"))
    };
    let mut kept = Vec::new();
    let mut params = Vec::new();
    for kv in url[q + 1..].split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let key = decode(k)?;
        if ours(&key) {
            params.push((key, decode(v)?));
        } else {
            kept.push(kv);
        }
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, params))
}

/// A key=value string's parameters, as tokio-postgres (and libpq) read them: the span of each
/// (from its key to the end of its value), its key and its unescaped value.
fn key_values(s: &str) -> Result<Vec<(std::ops::Range<usize>, String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if it.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("expected \"=\" after {key:?}"));
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = false;
        while let Some(&(_, c)) = it.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                break;
            }
            it.next();
            if c == '\\' {
                if let Some((_, escaped)) = it.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if quoted {
            closed = it.next_if(|(_, c)| *c == '\'').is_some();
        }
        if quoted && !closed {
            return Err(format!("the value of {key:?} has no closing quote"));
        }
        let end = it.peek().map_or(s.len(), |&(i, _)| i);
        out.push((start..end, key, value));
    }
}

fn split_key_values(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut rest = String::new();
    let mut params = Vec::new();
    for (span, key, value) in key_values(s)? {
        if ours(&key) {
            params.push((key, value));
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&s[span]);
        }
    }
    Ok((rest, params))
}

/// A key=value string with the value of every `password` replaced by `***` (`None`: it does
/// not parse as key=value).
pub(crate) fn redact_key_values(s: &str) -> Option<String> {
    let params = key_values(s).ok()?;
    let mut out = String::new();
    for (span, key, _) in params {
        if !out.is_empty() {
            out.push(' ');
        }
        if key == "password" {
            out.push_str("password=***");
        } else {
            out.push_str(&s[span]);
        }
    }
    Some(out)
}

/// The TLS connector of [`TlsSettings`]: the CA file is read and the rustls configuration made
/// here, once. Errors are one line naming the file.
pub fn connector(settings: &TlsSettings) -> Result<MakeRustls, String> {
    if settings.mode == SslMode::Disable {
        return Ok(MakeRustls {
            config: None,
            roots: Arc::from(""),
        });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let check_chain =
        matches!(settings.mode, SslMode::VerifyCa | SslMode::VerifyFull) || settings.root.is_some();
    let (verifier, roots): (Arc<dyn ServerCertVerifier>, String) = if check_chain {
        let (store, roots) = match &settings.root {
            Some(RootCert::File(path)) => (
                roots_of_file(path)?,
                format!("sslrootcert {}", path.display()),
            ),
            Some(RootCert::System) | None => (system_roots()?, "the system's CA store".to_string()),
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| format!("the CA certificates of {roots}: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if settings.mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        };
        (verifier, roots)
    } else {
        (Arc::new(AnyCertificate(provider.clone())), String::new())
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // PostgreSQL 17 checks it with `sslnegotiation=direct`; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustls {
        config: Some(Arc::new(config)),
        roots: Arc::from(roots),
    })
}

/// The CA certificates of a PEM file.
fn roots_of_file(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {shown}: {e}"))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("sslrootcert {shown}: {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("sslrootcert {shown}: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("sslrootcert {shown} holds no PEM certificate"));
    }
    Ok(store)
}

/// The system's CA certificates (`rustls-native-certs`: `SSL_CERT_FILE`, `SSL_CERT_DIR`, else
/// the distribution's store).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "no CA certificate in the system's store{why} (give one with sslrootcert=PATH)"
        ));
    }
    Ok(store)
}

/// `require`/`prefer` without `sslrootcert`: any certificate (the handshake's signatures are
/// still checked: the server holds the key of the certificate it shows).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain, not the name (webpki checks the chain first, then the name).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's `MakeTlsConnect` over rustls; `Clone` (the pool makes a connection with it
/// each time). With `sslmode=disable` it holds no configuration and is never asked to connect.
#[derive(Clone)]
pub struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
    /// Where the CA certificates come from, for messages (empty: none are checked).
    roots: Arc<str>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            roots: Arc::clone(&self.roots),
            domain: domain.to_string(),
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    roots: Arc<str>,
    domain: String,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS is disabled (sslmode=disable)"))?;
            let name = ServerName::try_from(self.domain.clone()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("host name {:?}: {e}", self.domain),
                )
            })?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(RustlsStream)
                .map_err(|e| explain(e, &self.domain, &self.roots))
        })
    }
}

/// A failed handshake, said plainly when the server's certificate is the reason.
fn explain(e: io::Error, domain: &str, roots: &str) -> io::Error {
    let Some(rustls::Error::InvalidCertificate(why)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    else {
        return e;
    };
    let text = match why {
        CertificateError::UnknownIssuer => format!(
            "the server's certificate is not signed by a trusted CA (unknown CA; trusted: {roots})"
        ),
        CertificateError::NotValidForNameContext { presented, .. } => format!(
            "the server's certificate does not match the host name {domain:?} \
             (host name mismatch; it is for {}; sslmode=verify-full)",
            if presented.is_empty() {
                "no name".to_string()
            } else {
                presented.join(", ")
            }
        ),
        CertificateError::NotValidForName => format!(
            "the server's certificate does not match the host name {domain:?} \
             (host name mismatch; sslmode=verify-full)"
        ),
        other => format!("the server's certificate does not verify: {other}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// A TLS connection to the database.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert.as_ref()))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// RFC 5929's `tls-server-end-point` of a DER certificate: its hash by the hash of its
/// signature algorithm (SHA-256 for MD5 and SHA-1); `None` for other algorithms (RSA-PSS,
/// EdDSA: no channel binding).
fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, .. }, .. }
    let (cert, _) = der_element(der, 0x30)?;
    let (_, after_tbs) = der_element(cert, 0x30)?;
    let (algorithm, _) = der_element(after_tbs, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let bits = match oid.split_last()? {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256/384/512WithRSAEncryption
        (4 | 5 | 11, prefix) if prefix == RSA => 256,
        (12, prefix) if prefix == RSA => 384,
        (13, prefix) if prefix == RSA => 512,
        // ecdsa-with-SHA256/384/512
        (2, prefix) if prefix == ECDSA => 256,
        (3, prefix) if prefix == ECDSA => 384,
        (4, prefix) if prefix == ECDSA => 512,
        // ecdsa-with-SHA1 (1.2.840.10045.4.1)
        _ if oid == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => 256,
        _ => return None,
    };
    Some(match bits {
        256 => sha2::Sha256::digest(der).to_vec(),
        384 => sha2::Sha384::digest(der).to_vec(),
        _ => sha2::Sha512::digest(der).to_vec(),
    })
}

/// The content of the DER element with `tag` at the start of `der`, and what follows it.
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
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
            split("host=db sslmode='").unwrap_err(),
            "the value of \"sslmode\" has no closing quote"
        );
    }

    #[test]
    fn bad_modes_are_named_with_the_allowed_ones() {
        assert_eq!(
            split("postgres://db/m?sslmode=verify").unwrap_err(),
            "sslmode \"verify\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        assert_eq!(
            split("host=db sslmode=require sslrootcert=system").unwrap_err(),
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
            e,
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
            e,
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
