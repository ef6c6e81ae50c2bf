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
/// Subject Alternative Name (DNS name, e-mail address or URI). `None` if it has neither or
/// cannot be parsed (it was verified by rustls before, so that means an unusual layout).
pub(crate) fn certificate_identity(der: &[u8]) -> Option<String> {
    let (certificate, _) = der::element(der, der::SEQUENCE)?;
    let (tbs, _) = der::element(certificate, der::SEQUENCE)?;
    let mut rest = tbs;
    // Optional [0] version.
    if rest.first() == Some(&0xA0) {
        rest = der::skip(rest)?;
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = der::skip(rest)?;
    }
    let (subject, after_subject) = der::element(rest, der::SEQUENCE)?;
    if let Some(cn) = common_name(subject) {
        return Some(cn);
    }
    // subjectPublicKeyInfo, then optional [1], [2] unique ids and [3] extensions.
    let mut rest = der::skip(after_subject)?;
    while let Some(&tag) = rest.first() {
        if tag == 0xA3 {
            let (explicit, _) = der::element(rest, 0xA3)?;
            let (extensions, _) = der::element(explicit, der::SEQUENCE)?;
            return first_san(extensions);
        }
        rest = der::skip(rest)?;
    }
    None
}

/// OID 2.5.4.3 (commonName).
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// OID 2.5.29.17 (subjectAltName).
const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];

fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = name;
    while !rdns.is_empty() {
        let (set, next) = der::element(rdns, der::SET)?;
        rdns = next;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, next) = der::element(attributes, der::SEQUENCE)?;
            attributes = next;
            let (oid, value) = der::element(attribute, der::OID)?;
            if oid == OID_CN {
                let (_, content, _) = der::any(value)?;
                return String::from_utf8(content.to_vec()).ok();
            }
        }
    }
    None
}

fn first_san(extensions: &[u8]) -> Option<String> {
    let mut rest = extensions;
    while !rest.is_empty() {
        let (extension, next) = der::element(rest, der::SEQUENCE)?;
        rest = next;
        let (oid, mut fields) = der::element(extension, der::OID)?;
        if oid != OID_SAN {
            continue;
        }
        // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
        if fields.first() == Some(&0x01) {
            fields = der::skip(fields)?;
        }
        let (octets, _) = der::element(fields, 0x04)?;
        let (mut names, _) = der::element(octets, der::SEQUENCE)?;
        while !names.is_empty() {
            let (tag, content, next) = der::any(names)?;
            names = next;
            // [1] rfc822Name, [2] dNSName, [6] URI: IA5 strings.
            if matches!(tag, 0x81 | 0x82 | 0x86) {
                return String::from_utf8(content.to_vec()).ok();
            }
        }
    }
    None
}

/// Just enough DER reading for the certificate fields above; every access is checked, so
/// odd input yields `None`, never a panic.
mod der {
    pub(super) const SEQUENCE: u8 = 0x30;
    pub(super) const SET: u8 = 0x31;
    pub(super) const OID: u8 = 0x06;

    /// The first element: (tag, content, rest after it).
    pub(super) fn any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(count)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, &byte| (len << 8) | usize::from(byte))
        };
        let (content, after) = rest.split_at_checked(len)?;
        Some((tag, content, after))
    }

    /// The first element if it has tag `tag`: (content, rest).
    pub(super) fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (found, content, rest) = any(input)?;
        (found == tag).then_some((content, rest))
    }

    /// The input after its first element.
    pub(super) fn skip(input: &[u8]) -> Option<&[u8]> {
        any(input).map(|(_, _, rest)| rest)
    }
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
