//! The TLS connection to the database: tokio-postgres's `MakeTlsConnect` over rustls, the
//! stream, and channel binding (`tls-server-end-point`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// tokio-postgres's `MakeTlsConnect` over rustls; `Clone` (the pool makes a connection with it
/// each time). With `sslmode=disable` it holds no configuration and is never asked to connect.
#[derive(Clone)]
pub struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
    /// Where the CA certificates come from, for messages (empty: none are checked).
    roots: Arc<str>,
}

impl MakeRustls {
    pub(super) fn new(config: Option<Arc<ClientConfig>>, roots: Arc<str>) -> MakeRustls {
        MakeRustls { config, roots }
    }
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
pub(super) fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
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
