//! TLS for `tls` and `wss` listeners: rustls with the `ring` provider, PEM files, optional
//! client certificates (mutual TLS), and reloading on SIGHUP.
//!
//! Each listener keeps its rustls configuration in a lock holding an `Arc`; every accepted
//! socket takes the current one, so a reload affects new connections only and never
//! disturbs established sessions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use x509_parser::asn1_rs::{BmpString, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{AttributeTypeAndValue, FromDer, X509Certificate};

use crate::auth::SecurityError;

/// The files a TLS listener is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub(crate) cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub(crate) key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one.
    pub(crate) client_ca_file: Option<PathBuf>,
}

/// A listener's current TLS configuration, swappable by [`TlsHandle::reload`].
#[derive(Debug)]
pub(crate) struct TlsHandle {
    files: TlsFiles,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsHandle {
    /// Loads the files; errors name the file.
    pub(crate) fn load(files: TlsFiles) -> Result<TlsHandle, SecurityError> {
        let config = build(&files)?;
        Ok(TlsHandle {
            files,
            config: RwLock::new(config),
        })
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Re-reads the files; on error the old configuration stays.
    pub(crate) fn reload(&self) -> Result<(), SecurityError> {
        let config = build(&self.files)?;
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }

    /// The certificate file, for logs.
    pub(crate) fn cert_file(&self) -> &Path {
        &self.files.cert_file
    }
}

fn tls_error(path: &Path, what: &str, error: impl std::fmt::Display) -> SecurityError {
    SecurityError::Tls(format!("{what} {}: {error}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|error| tls_error(path, "cannot read certificates from", error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| tls_error(path, "bad certificate in", error))?;
    if certs.is_empty() {
        return Err(tls_error(path, "no certificate in", "empty PEM file"));
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, SecurityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|error| tls_error(&files.key_file, "cannot read the private key from", error))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| SecurityError::Tls(error.to_string()))?;
    let builder = match &files.client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_file)? {
                roots
                    .add(cert)
                    .map_err(|error| tls_error(ca_file, "bad CA certificate in", error))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| tls_error(ca_file, "unusable client CA file", error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|error| tls_error(&files.cert_file, "certificate and key do not fit", error))?;
    Ok(Arc::new(config))
}

/// The user name a client certificate stands for: its subject Common Name, or else its first
/// Subject Alternative Name (e-mail address, DNS name or URI). `None` if it has neither, if
/// the name is not a string type that decodes to UTF-8 (a BMPString is UTF-16, and is
/// decoded as such by x509-parser), or if the certificate cannot be parsed (rustls verified
/// it before, so that means an unusual layout).
pub(crate) fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    if let Some(name) = certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(attribute_text)
    {
        return Some(name);
    }
    let alternative = certificate.subject_alternative_name().ok()??;
    alternative
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::RFC822Name(text) | GeneralName::DNSName(text) | GeneralName::URI(text) => {
                Some((*text).to_owned())
            }
            _ => None,
        })
}

/// The text of a name attribute: the UTF-8 string types as they are, a BMPString decoded
/// from UTF-16.
fn attribute_text(attribute: &AttributeTypeAndValue<'_>) -> Option<String> {
    if let Ok(text) = attribute.as_str() {
        return Some(text.to_owned());
    }
    let value = attribute.attr_value();
    if value.tag() != Tag::BmpString {
        return None;
    }
    BmpString::try_from(value.clone())
        .ok()
        .map(|bmp| bmp.string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(cn: Option<&str>, sans: Vec<String>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(sans).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Halyard tests");
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn identity_is_the_common_name_else_the_first_san() {
        let der = cert_with(Some("device-42"), vec!["dns.example".to_owned()]);
        assert_eq!(certificate_identity(&der).as_deref(), Some("device-42"));
        let der = cert_with(None, vec!["sensor.example".to_owned()]);
        assert_eq!(
            certificate_identity(&der).as_deref(),
            Some("sensor.example")
        );
        let der = cert_with(None, vec![]);
        assert_eq!(certificate_identity(&der), None);
    }

    #[test]
    fn a_bmp_string_common_name_is_decoded_as_utf16() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let bmp = rcgen::BmpString::try_from("gerät-7").expect("bmp");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, rcgen::DnValue::BmpString(bmp));
        let key = rcgen::KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("sign").der().to_vec();
        assert_eq!(certificate_identity(&der).as_deref(), Some("gerät-7"));
    }

    #[test]
    fn garbage_never_panics() {
        let der = cert_with(Some("x"), vec![]);
        for len in 0..der.len() {
            let _ = certificate_identity(&der[..len]);
        }
        assert_eq!(
            certificate_identity(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]),
            None
        );
        assert_eq!(certificate_identity(&[]), None);
    }
}
