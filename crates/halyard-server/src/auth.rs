//! Authentication (password files) and the reloadable security state.
//!
//! Passwords are checked in the connection task, on a blocking thread, before the CONNECT is
//! forwarded to the broker task: PBKDF2 and Argon2 cost milliseconds by design, and the broker
//! task serves every client. Refused clients get CONNACK with:
//!
//! | case | MQTT 3.x | MQTT 5 |
//! |---|---|---|
//! | unknown user, wrong or missing password | 0x04 bad user name or password | 0x86 |
//! | no user name while anonymous access is off | 0x05 not authorized | 0x87 |
//! | an Authentication Method the server does not offer | 0x05 | 0x8C |
//!
//! (`auth_chain.rs` has the full list of sources and `enhanced_auth.rs` the SCRAM cases.)
//!
//! Password files use Mosquitto's format, one `user:hash` per line, so existing files work
//! unchanged: `$7$` (PBKDF2-HMAC-SHA512, `$7$iterations$salt$hash`, what `mosquitto_passwd`
//! writes by default), `$6$` (`$6$salt$hash`, SHA-512 of password then salt, Mosquitto 1.x)
//! and Argon2 PHC strings (`$argon2id$...`, what `halyard passwd` writes). A fourth form,
//! `SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey` (RFC 5803, what `halyard passwd
//! --scram` writes; see `scram.rs`), serves both SCRAM-SHA-256 enhanced authentication and
//! the CONNECT password.
//!
//! JWT (`jwt.rs`) and the HTTP hook (`http_auth.rs`) are further sources; `auth_chain.rs`
//! asks them in the configured order.
//!
//! The password database and the ACL live behind locks holding `Arc`s so that SIGHUP can
//! swap them while clients stay connected; a file that fails to parse leaves the old one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use halyard_codec::ReasonCode;
use halyard_core::{Access, Acl, Authorizer, ClientInfo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::{Digest, Sha512};
use tracing::info;

use crate::auth_chain::{AuthSource, DEFAULT_CHAIN};
use crate::connection_auth::Connections;
use crate::constant_time::secrets_equal;
use crate::http_auth::{HttpAuth, HttpAuthConfig};
use crate::jwt::{JwtConfig, JwtVerifier};
use crate::metrics::ReasonLabel;
use crate::scram::ScramCredential;

/// The `[auth]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Whether clients without a user name may connect. `None` means the default: allowed
    /// only when no password file is configured (an open broker stays open, a broker with
    /// users does not silently admit strangers).
    pub allow_anonymous: Option<bool>,
    /// Mosquitto-format password file.
    pub password_file: Option<PathBuf>,
    /// Mosquitto-format ACL file; without one every topic is open to every client.
    pub acl_file: Option<PathBuf>,
    /// Order in which the sources are asked; empty means [`DEFAULT_CHAIN`].
    pub chain: Vec<AuthSource>,
    /// JWT as the password, if configured.
    pub jwt: Option<JwtConfig>,
    /// HTTP authentication and ACL hook, if configured.
    pub http: Option<HttpAuthConfig>,
}

impl AuthConfig {
    /// `allow_anonymous` with its default applied.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.has_sources())
    }

    /// Whether any source can check credentials.
    pub fn has_sources(&self) -> bool {
        self.password_file.is_some()
            || self.jwt.is_some()
            || self.http.as_ref().is_some_and(|http| http.url.is_some())
    }

    /// The chain with its default applied.
    pub fn chain(&self) -> &[AuthSource] {
        if self.chain.is_empty() {
            &DEFAULT_CHAIN
        } else {
            &self.chain
        }
    }
}

/// Why a security file could not be used; names the file and, for content, the line.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The file could not be read.
    // The cause is part of the message, not a `source`, for the reason given at `Acl`.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// A password file line is not `user:hash` with a known hash format.
    #[error("password file {path}, line {line}: {message}")]
    Password {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The ACL file has an error.
    // The parse error is part of the message rather than a `source`, so that logs printing
    // only the top error still show the line, and `{:#}` chains do not repeat it.
    #[error("ACL file {path}, {error}")]
    Acl {
        /// The file.
        path: PathBuf,
        /// The parse error (with its line).
        error: halyard_core::AclError,
    },
    /// A TLS certificate, key or CA file is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A password could not be hashed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
    /// `[auth.jwt]` or `[auth.http]` is unusable.
    #[error("{0}")]
    Source(String),
}

/// One stored password hash.
#[derive(Clone, PartialEq, Eq)]
enum StoredHash {
    /// Mosquitto `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// Mosquitto `$6$`: SHA-512(password || salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// An Argon2 (or other PHC) string, verified by the argon2 crate.
    Phc(String),
    /// A SCRAM-SHA-256 credential.
    Scram(ScramCredential),
}

impl std::fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print hashes into logs.
        let kind = match self {
            StoredHash::Pbkdf2Sha512 { .. } => "$7$",
            StoredHash::Sha512 { .. } => "$6$",
            StoredHash::Phc(_) => "argon2",
            StoredHash::Scram(_) => "SCRAM-SHA-256",
        };
        f.write_str(kind)
    }
}

impl StoredHash {
    fn parse(text: &str) -> Result<StoredHash, String> {
        let b64 = |part: &str, what: &str| {
            BASE64
                .decode(part)
                .map_err(|error| format!("bad base64 {what}: {error}"))
        };
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash must be $7$iterations$salt$hash".to_owned());
            };
            let iterations: u32 = iterations
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("bad iteration count `{iterations}`"))?;
            return Ok(StoredHash::Pbkdf2Sha512 {
                iterations,
                salt: b64(salt, "salt")?,
                hash: b64(hash, "hash")?,
            });
        }
        if let Some(rest) = text.strip_prefix("$6$") {
            let Some((salt, hash)) = rest.split_once('$') else {
                return Err("a $6$ hash must be $6$salt$hash".to_owned());
            };
            return Ok(StoredHash::Sha512 {
                salt: b64(salt, "salt")?,
                hash: b64(hash, "hash")?,
            });
        }
        if ScramCredential::is_entry(text) {
            return ScramCredential::parse(text).map(StoredHash::Scram);
        }
        if text.starts_with("$argon2") {
            let parsed =
                PasswordHash::new(text).map_err(|error| format!("bad argon2 hash: {error}"))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err("bad argon2 hash: no salt or no hash".to_owned());
            }
            return Ok(StoredHash::Phc(text.to_owned()));
        }
        Err(
            "unknown hash format (expected $7$, $6$, $argon2id$ or SCRAM-SHA-256$; plain-text \
             passwords are not accepted)"
                .to_owned(),
        )
    }

    /// Costly (by design): call from a blocking thread.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            StoredHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut derived = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut derived);
                secrets_equal(&derived, hash)
            }
            StoredHash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                secrets_equal(&digest.finalize(), hash)
            }
            StoredHash::Phc(phc) => PasswordHash::new(phc)
                .is_ok_and(|parsed| Argon2::default().verify_password(password, &parsed).is_ok()),
            StoredHash::Scram(credential) => credential.verify_password(password),
        }
    }
}

/// A SCRAM-SHA-256 password-file entry for `password` (`halyard passwd --scram`), usable
/// by SCRAM clients and as a CONNECT password.
pub fn scram_entry(password: &str, iterations: u32) -> Result<String, SecurityError> {
    ScramCredential::new(password, iterations)
        .map(|credential| credential.to_entry())
        .map_err(|error| SecurityError::Hash(error.to_string()))
}

/// Hashes `password` as an Argon2id PHC string with a random salt (the default Argon2
/// parameters of the `argon2` crate), the form `halyard passwd` writes.
pub fn hash_password(password: &str) -> Result<String, SecurityError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt)
        .map_err(|error| SecurityError::Hash(format!("no randomness for a salt: {error}")))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|error| SecurityError::Hash(format!("salt: {error}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| SecurityError::Hash(format!("argon2: {error}")))
}

/// A parsed password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, StoredHash>,
}

impl PasswordFile {
    /// Parses `user:hash` lines; blank lines and lines starting with `#` are skipped.
    /// Errors name the line (`path` is only used in the error).
    pub fn parse(path: &Path, text: &str) -> Result<PasswordFile, SecurityError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let error = |message: String| SecurityError::Password {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(error("expected `user:hash`".to_owned()));
            };
            if user.is_empty() {
                return Err(error("empty user name".to_owned()));
            }
            let hash = StoredHash::parse(hash.trim()).map_err(error)?;
            users.insert(user.to_owned(), hash);
        }
        Ok(PasswordFile { users })
    }

    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<PasswordFile, SecurityError> {
        PasswordFile::parse(path, &read(path)?)
    }

    /// Whether `password` is right for `user`. Costly: call from a blocking thread.
    ///
    /// An unknown user costs as much as a known one (a hash from the file is computed and
    /// its result ignored), so the time to refuse does not tell which user names exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(decoy) = self.users.values().next() {
                    std::hint::black_box(decoy.verify(password));
                }
                false
            }
        }
    }

    /// Whether `user` has an entry (the file source knows the user and decides).
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The SCRAM credential of `user`, if its entry is one.
    pub(crate) fn scram_credential(&self, user: &str) -> Option<ScramCredential> {
        match self.users.get(user) {
            Some(StoredHash::Scram(credential)) => Some(credential.clone()),
            _ => None,
        }
    }

    /// Number of users, for logs.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file holds no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Adds or replaces `user` in the text of a password file, keeping every other line
    /// as it is (for `halyard passwd`).
    pub fn upsert_line(text: &str, user: &str, hash: &str) -> String {
        let mut out = String::with_capacity(text.len() + user.len() + hash.len() + 2);
        let mut replaced = false;
        for line in text.lines() {
            if line.split_once(':').is_some_and(|(name, _)| name == user) {
                if !replaced {
                    out.push_str(&format!("{user}:{hash}\n"));
                    replaced = true;
                }
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        if !replaced {
            out.push_str(&format!("{user}:{hash}\n"));
        }
        out
    }
}

fn read(path: &Path) -> Result<String, SecurityError> {
    std::fs::read_to_string(path).map_err(|error| SecurityError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Why a CONNECT was refused before reaching the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Unknown user, wrong or missing password.
    BadCredentials,
    /// Anonymous access is off, or the exchange broke down.
    NotAuthorized,
    /// An MQTT 5 Authentication Method the server does not offer [MQTT-4.12.0-1].
    BadMethod,
}

impl Refusal {
    /// The CONNACK code for the client's protocol version.
    pub(crate) fn code(self, v5: bool) -> ReasonCode {
        match (self, v5) {
            (Refusal::BadCredentials, true) => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            (Refusal::BadCredentials, false) => ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD,
            (Refusal::NotAuthorized, true) => ReasonCode::NOT_AUTHORIZED,
            (Refusal::NotAuthorized | Refusal::BadMethod, false) => ReasonCode::V3_NOT_AUTHORIZED,
            (Refusal::BadMethod, true) => ReasonCode::BAD_AUTHENTICATION_METHOD,
        }
    }
}

/// A freshly read password database and ACL (each optional).
type LoadedFiles = (Option<Arc<PasswordFile>>, Option<Arc<Acl>>);

/// The security state of a running server: configuration plus the current password
/// database and ACL, swappable by [`Security::reload`].
#[derive(Debug)]
pub struct Security {
    pub(crate) config: AuthConfig,
    pub(crate) passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<Acl>>>,
    /// Password checks running at once: one per core, so that a flood of CONNECTs with
    /// passwords queues up instead of occupying every blocking thread and core.
    hashing: tokio::sync::Semaphore,
    /// The JWT keys and rules in force (reloadable).
    pub(crate) jwt: RwLock<Option<Arc<JwtVerifier>>>,
    /// The HTTP hook.
    pub(crate) http: Option<Arc<HttpAuth>>,
    /// What the server knows of each authenticated connection (re-authentication, token
    /// expiry, token ACLs, HTTP ACL identities).
    pub(crate) connections: Connections,
    /// Key for the decoy SCRAM credentials of unknown users.
    pub(crate) decoy_secret: [u8; 32],
    /// Refusals by reason, once the server's metrics are attached.
    refusals: OnceLock<Family<ReasonLabel, Counter>>,
}

impl Default for Security {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let mut decoy_secret = [0u8; 32];
        // Without randomness the decoys are still consistent per name; they only become
        // predictable, which tells an attacker a name is unknown, nothing more.
        let _ = getrandom::getrandom(&mut decoy_secret);
        Security {
            config: AuthConfig::default(),
            passwords: RwLock::default(),
            acl: RwLock::default(),
            hashing: tokio::sync::Semaphore::new(cores),
            jwt: RwLock::default(),
            http: None,
            connections: Connections::default(),
            decoy_secret,
            refusals: OnceLock::new(),
        }
    }
}

impl Security {
    /// Loads the configured files; any error is fatal at start-up.
    pub fn load(config: AuthConfig) -> Result<Security, SecurityError> {
        let http = match &config.http {
            Some(http) => Some(Arc::new(
                HttpAuth::new(http.clone()).map_err(SecurityError::Source)?,
            )),
            None => None,
        };
        let security = Security {
            config,
            http,
            ..Security::default()
        };
        let (passwords, acl) = security.read_files()?;
        *write_lock(&security.passwords) = passwords;
        *write_lock(&security.acl) = acl;
        if let Some(jwt) = &security.config.jwt {
            let verifier = JwtVerifier::load(jwt).map_err(SecurityError::Source)?;
            info!(key_file = %jwt.key_file.display(), "JWT keys loaded");
            *write_lock(&security.jwt) = Some(Arc::new(verifier));
        }
        Ok(security)
    }

    /// Counts refusals in `family` (the server's `auth_refused` metric) from now on.
    pub(crate) fn attach_metrics(&self, family: Family<ReasonLabel, Counter>) {
        let _ = self.refusals.set(family);
    }

    /// Counts one refusal with its reason label.
    pub(crate) fn count_refusal(&self, reason: &'static str) {
        if let Some(family) = self.refusals.get() {
            family.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    /// The JWT verifier in force, if JWT is configured.
    pub(crate) fn jwt(&self) -> Option<Arc<JwtVerifier>> {
        read_lock(&self.jwt).clone()
    }

    /// The password file in force, if one is configured.
    pub(crate) fn passwords(&self) -> Option<Arc<PasswordFile>> {
        read_lock(&self.passwords).clone()
    }

    /// Whether SCRAM-SHA-256 enhanced authentication is offered: there is a password file
    /// to hold credentials.
    pub(crate) fn scram_enabled(&self) -> bool {
        self.config.password_file.is_some()
    }

    /// The SCRAM credential of `user`, or a decoy for a user without one.
    pub(crate) fn scram_credential(&self, user: &str) -> ScramCredential {
        self.passwords()
            .and_then(|file| file.scram_credential(user))
            .unwrap_or_else(|| ScramCredential::decoy(&self.decoy_secret, user))
    }

    /// The configuration in force.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    fn read_files(&self) -> Result<LoadedFiles, SecurityError> {
        let passwords = match &self.config.password_file {
            Some(path) => {
                let file = PasswordFile::load(path)?;
                info!(path = %path.display(), users = file.len(), "password file loaded");
                Some(Arc::new(file))
            }
            None => None,
        };
        let acl = match &self.config.acl_file {
            Some(path) => {
                let acl = Acl::parse(&read(path)?).map_err(|source| SecurityError::Acl {
                    path: path.clone(),
                    error: source,
                })?;
                info!(path = %path.display(), rules = acl.rule_count(), "ACL file loaded");
                Some(Arc::new(acl))
            }
            None => None,
        };
        Ok((passwords, acl))
    }

    /// Re-reads the password and ACL files, each on its own: a file that fails to read or
    /// parse keeps its previous version in force and its error is returned (for the caller
    /// to log); a good file is swapped in even if the other one is bad.
    pub fn reload(&self) -> Vec<SecurityError> {
        let mut errors = Vec::new();
        if let Some(path) = &self.config.password_file {
            match PasswordFile::load(path) {
                Ok(file) => {
                    info!(path = %path.display(), users = file.len(), "password file reloaded");
                    *write_lock(&self.passwords) = Some(Arc::new(file));
                }
                Err(error) => errors.push(error),
            }
        }
        if let Some(path) = &self.config.acl_file {
            let parsed = read(path).and_then(|text| {
                Acl::parse(&text).map_err(|source| SecurityError::Acl {
                    path: path.clone(),
                    error: source,
                })
            });
            match parsed {
                Ok(acl) => {
                    info!(path = %path.display(), rules = acl.rule_count(), "ACL file reloaded");
                    *write_lock(&self.acl) = Some(Arc::new(acl));
                }
                Err(error) => errors.push(error),
            }
        }
        if let Some(config) = &self.config.jwt {
            match JwtVerifier::load(config) {
                Ok(verifier) => {
                    info!(key_file = %config.key_file.display(), "JWT keys reloaded");
                    *write_lock(&self.jwt) = Some(Arc::new(verifier));
                }
                Err(error) => errors.push(SecurityError::Source(error)),
            }
        }
        errors
    }

    /// Waits for a turn to hash a password (see the `hashing` field).
    pub(crate) async fn hashing_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.hashing.acquire().await.ok()
    }

    /// Whether CONNECTs need [`Security::authenticate`] at all (an open broker skips the
    /// blocking-thread hop).
    pub(crate) fn checks_connect(&self) -> bool {
        self.config.has_sources() || !self.config.anonymous_allowed()
    }

    /// The authorizer to install in the broker core: it reads the current ACL on every
    /// check, so a reload takes effect for connected clients too.
    pub fn authorizer(self: &Arc<Security>) -> Arc<dyn Authorizer> {
        Arc::new(SecurityAuthorizer(Arc::clone(self)))
    }
}

pub(crate) fn read_lock<T: Clone>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is
    // still a whole Arc, so it is safe to keep using it.
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`Authorizer`] over the reloadable ACL of a [`Security`].
#[derive(Debug)]
struct SecurityAuthorizer(Arc<Security>);

/// Topic access, first rule that applies: the client's token ACL (`jwt.rs`), the HTTP ACL
/// hook (publish and subscribe; deliveries of subscriptions it allowed are not asked
/// again), the ACL file, else allowed.
impl Authorizer for SecurityAuthorizer {
    fn authorize(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool {
        let security = &self.0;
        if let Some(acl) = security.connections.claim_acl(client.client_id) {
            return acl.allows(access, topic);
        }
        if let Some(http) = security
            .http
            .as_ref()
            .filter(|h| h.config().acl_url.is_some())
        {
            let Some(action) = crate::connection_auth::acl_action(access) else {
                return true;
            };
            let request = crate::http_auth::AclRequest {
                client_id: client.client_id.to_owned(),
                username: client.username.map(str::to_owned),
                topic: topic.to_owned(),
                action,
            };
            return http.cached_acl(&request).unwrap_or(false);
        }
        match read_lock(&security.acl).as_ref() {
            Some(acl) => acl.check(client, access, topic),
            None => true,
        }
    }

    fn allows_everything(&self) -> bool {
        let config = &self.0.config;
        config.acl_file.is_none()
            && config.jwt.is_none()
            && config
                .http
                .as_ref()
                .is_none_or(|http| http.acl_url.is_none())
    }

    fn server_authenticates(&self, method: &str) -> bool {
        method == crate::scram::METHOD && self.0.scram_enabled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::Connect;

    /// Written by Debian's `mosquitto_passwd` 2.0.11 (see tests/fixtures/README.md):
    /// alice (`$7$`, default), bob (`-H sha512`, `$6$`), carol (`$7$`, a password with a
    /// space).
    const MOSQUITTO: &str = include_str!("../tests/fixtures/mosquitto_passwd.txt");

    fn connect(user: Option<&str>, password: Option<&str>) -> Connect {
        Connect {
            protocol: halyard_codec::ProtocolVersion::V3_1_1,
            clean_start: true,
            keep_alive: 0,
            client_id: "c".to_owned(),
            will: None,
            username: user.map(str::to_owned),
            password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
            properties: Default::default(),
        }
    }

    #[test]
    fn mosquitto_hashes_verify() {
        let file = PasswordFile::parse(Path::new("pw"), MOSQUITTO).expect("parses");
        assert_eq!(file.len(), 3);
        assert!(file.verify("alice", b"alicepw"));
        assert!(!file.verify("alice", b"alicepw "));
        assert!(file.verify("bob", b"bobpw"));
        assert!(!file.verify("bob", b"alicepw"));
        assert!(file.verify("carol", b"c@rol pw"));
        assert!(!file.verify("dave", b"anything"));
    }

    #[test]
    fn argon2_hashes_round_trip() {
        let hash = hash_password("s3cret").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = PasswordFile::upsert_line("", "eve", &hash);
        let file = PasswordFile::parse(Path::new("pw"), &text).expect("parses");
        assert!(file.verify("eve", b"s3cret"));
        assert!(!file.verify("eve", b"s3cret!"));
        // An unknown user is checked against a decoy hash for timing, never accepted by it.
        assert!(!file.verify("mallory", b"s3cret"));
    }

    #[test]
    fn upsert_replaces_only_that_user() {
        let text = "# users\nalice:$6$a$b\nbob:$6$c$d\n";
        let out = PasswordFile::upsert_line(text, "alice", "$6$x$y");
        assert_eq!(out, "# users\nalice:$6$x$y\nbob:$6$c$d\n");
        let out = PasswordFile::upsert_line(text, "carol", "$6$x$y");
        assert!(out.ends_with("bob:$6$c$d\ncarol:$6$x$y\n"), "{out}");
    }

    #[test]
    fn bad_lines_name_the_line() {
        let cases = [
            ("alice:$7$101$abc\n", "$7$iterations"),
            ("\nbob:plaintext\n", "unknown hash format"),
            ("carol\n", "user:hash"),
            ("dave:$6$!!$abc\n", "base64"),
            ("erin:$argon2id$nonsense\n", "argon2"),
        ];
        for (text, needle) in cases {
            let error = PasswordFile::parse(Path::new("pw.txt"), text)
                .expect_err(text)
                .to_string();
            assert!(error.contains(needle), "{error}");
            assert!(error.contains("pw.txt, line"), "{error}");
        }
        let error = PasswordFile::parse(Path::new("p"), "\n\nbob:plaintext").expect_err("bad");
        assert!(error.to_string().contains("line 3"), "{error}");
    }

    fn check(s: &Arc<Security>, user: Option<&str>, password: Option<&str>) -> Result<(), Refusal> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(s.admit(&mut connect(user, password), None, None))
            .map(drop)
            .map_err(|refused| refused.refusal)
    }

    #[test]
    fn connect_decisions() {
        let dir = std::env::temp_dir().join(format!("halyard-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pw = dir.join("pw");
        std::fs::write(&pw, MOSQUITTO).expect("write");
        let with_file = Arc::new(
            Security::load(AuthConfig {
                password_file: Some(pw.clone()),
                ..AuthConfig::default()
            })
            .expect("loads"),
        );
        assert!(with_file.checks_connect());
        assert_eq!(check(&with_file, Some("alice"), Some("alicepw")), Ok(()));
        assert_eq!(
            check(&with_file, Some("alice"), Some("nope")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            check(&with_file, Some("alice"), None),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            check(&with_file, Some("mallory"), Some("alicepw")),
            Err(Refusal::BadCredentials)
        );
        // With a password file, anonymous access is off unless asked for.
        assert_eq!(check(&with_file, None, None), Err(Refusal::NotAuthorized));
        assert_eq!(Refusal::BadCredentials.code(false), ReasonCode(0x04));
        assert_eq!(Refusal::BadCredentials.code(true), ReasonCode(0x86));
        assert_eq!(Refusal::NotAuthorized.code(false), ReasonCode(0x05));
        assert_eq!(Refusal::NotAuthorized.code(true), ReasonCode(0x87));

        let open_with_file = Arc::new(
            Security::load(AuthConfig {
                allow_anonymous: Some(true),
                password_file: Some(pw.clone()),
                ..AuthConfig::default()
            })
            .expect("loads"),
        );
        assert_eq!(check(&open_with_file, None, None), Ok(()));
        assert_eq!(
            check(&open_with_file, Some("alice"), Some("x")),
            Err(Refusal::BadCredentials)
        );

        let open = Arc::new(Security::load(AuthConfig::default()).expect("loads"));
        assert!(!open.checks_connect());
        assert_eq!(check(&open, Some("anyone"), None), Ok(()));

        // A certificate identity replaces the user name and needs no password.
        let mut c = connect(Some("claimed"), None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let admitted = runtime.block_on(with_file.admit(&mut c, Some("cert-cn"), None));
        assert!(admitted.is_ok());
        assert_eq!(c.username.as_deref(), Some("cert-cn"));

        // A broken file on reload leaves the old database in force.
        std::fs::write(&pw, "alice:garbage\n").expect("write");
        let errors = with_file.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("line 1"), "{}", errors[0]);
        assert_eq!(check(&with_file, Some("alice"), Some("alicepw")), Ok(()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
