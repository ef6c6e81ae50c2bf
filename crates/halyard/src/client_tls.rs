//! TLS for `halyard pub` / `halyard sub`, with mosquitto_pub's flags: `--cafile` turns TLS
//! on and names the CA certificates to trust, `--cert` / `--key` present a client
//! certificate, `--insecure` skips the check that the certificate names the host (the
//! chain is still verified, as in mosquitto). rustls on `ring`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The TLS flags.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM CA certificates to trust; connects over TLS.
    #[arg(long = "cafile", value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// PEM client certificate (with --key), for brokers that require one.
    #[arg(long = "cert", value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long = "key", value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Do not check that the broker's certificate names the host (the chain is verified).
    #[arg(long = "insecure")]
    insecure: bool,
}

/// A byte stream to the broker: plain TCP or TLS.
pub trait BrokerStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> BrokerStream for T {}

impl TlsArgs {
    /// Connects to `host:port`, over TLS if `--cafile` is given.
    pub async fn open(&self, host: &str, port: u16) -> Result<Box<dyn BrokerStream>> {
        if self.cafile.is_none() && (self.cert.is_some() || self.insecure) {
            bail!("--cert, --key and --insecure need --cafile (TLS)");
        }
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        tcp.set_nodelay(true).ok();
        let Some(cafile) = &self.cafile else {
            return Ok(Box::new(tcp));
        };
        let config = self.client_config(cafile)?;
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("`{host}` is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {host}:{port} failed"))?;
        Ok(Box::new(tls))
    }

    fn client_config(&self, cafile: &std::path::Path) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(cafile)
            .with_context(|| format!("cannot read {}", cafile.display()))?
        {
            let cert = cert.with_context(|| format!("bad certificate in {}", cafile.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("unusable CA certificate in {}", cafile.display()))?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .context("cannot build the certificate verifier")?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?;
        let builder = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyHostName(verifier)))
        } else {
            builder.with_webpki_verifier(verifier)
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("bad certificate in {}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("cannot read the key in {}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("client certificate and key do not fit")
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// `--insecure`: the web PKI checks, except that the certificate need not name the host.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
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
