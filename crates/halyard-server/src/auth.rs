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
//!
//! Password files use Mosquitto's format, one `user:hash` per line, so existing files work
//! unchanged: `$7$` (PBKDF2-HMAC-SHA512, `$7$iterations$salt$hash`, what `mosquitto_passwd`
//! writes by default), `$6$` (`$6$salt$hash`, SHA-512 of password then salt, Mosquitto 1.x)
//! and Argon2 PHC strings (`$argon2id$...`, what `halyard passwd` writes).
//!
//! The password database and the ACL live behind locks holding `Arc`s so that SIGHUP can
//! swap them while clients stay connected; a file that fails to parse leaves the old one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use halyard_codec::{Connect, ReasonCode};
use halyard_core::{Access, Acl, Authorizer, ClientInfo};
use sha2::{Digest, Sha512};
use tracing::{info, warn};

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
}

impl AuthConfig {
    /// `allow_anonymous` with its default applied.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.password_file.is_none())
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
}

impl std::fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print hashes into logs.
        let kind = match self {
            StoredHash::Pbkdf2Sha512 { .. } => "$7$",
            StoredHash::Sha512 { .. } => "$6$",
            StoredHash::Phc(_) => "argon2",
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
        if text.starts_with("$argon2") {
            let parsed =
                PasswordHash::new(text).map_err(|error| format!("bad argon2 hash: {error}"))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err("bad argon2 hash: no salt or no hash".to_owned());
            }
            return Ok(StoredHash::Phc(text.to_owned()));
        }
        Err(
            "unknown hash format (expected $7$, $6$ or $argon2id$; plain-text passwords \
             are not accepted)"
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
                constant_time_eq(&derived, hash)
            }
            StoredHash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                constant_time_eq(&digest.finalize(), hash)
            }
            StoredHash::Phc(phc) => PasswordHash::new(phc)
                .is_ok_and(|parsed| Argon2::default().verify_password(password, &parsed).is_ok()),
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of a hash matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    /// Anonymous access is off.
    NotAuthorized,
}

impl Refusal {
    /// The CONNACK code for the client's protocol version.
    pub(crate) fn code(self, v5: bool) -> ReasonCode {
        match (self, v5) {
            (Refusal::BadCredentials, true) => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            (Refusal::BadCredentials, false) => ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD,
            (Refusal::NotAuthorized, true) => ReasonCode::NOT_AUTHORIZED,
            (Refusal::NotAuthorized, false) => ReasonCode::V3_NOT_AUTHORIZED,
        }
    }
}

/// A freshly read password database and ACL (each optional).
type LoadedFiles = (Option<Arc<PasswordFile>>, Option<Arc<Acl>>);

/// The security state of a running server: configuration plus the current password
/// database and ACL, swappable by [`Security::reload`].
#[derive(Debug)]
pub struct Security {
    config: AuthConfig,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<Acl>>>,
    /// Password checks running at once: one per core, so that a flood of CONNECTs with
    /// passwords queues up instead of occupying every blocking thread and core.
    hashing: tokio::sync::Semaphore,
}

impl Default for Security {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Security {
            config: AuthConfig::default(),
            passwords: RwLock::default(),
            acl: RwLock::default(),
            hashing: tokio::sync::Semaphore::new(cores),
        }
    }
}

impl Security {
    /// Loads the configured files; any error is fatal at start-up.
    pub fn load(config: AuthConfig) -> Result<Security, SecurityError> {
        let security = Security {
            config,
            ..Security::default()
        };
        let (passwords, acl) = security.read_files()?;
        *write_lock(&security.passwords) = passwords;
        *write_lock(&security.acl) = acl;
        Ok(security)
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
        errors
    }

    /// Decides a CONNECT. `identity` is the user name taken from a verified client
    /// certificate (`use_identity_as_username`): such a client is authenticated already and
    /// its CONNECT user name is replaced. Costly (password hashing): run it on a blocking
    /// thread.
    pub(crate) fn authenticate(
        &self,
        connect: &mut Connect,
        identity: Option<&str>,
    ) -> Result<(), Refusal> {
        if let Some(identity) = identity {
            connect.username = Some(identity.to_owned());
            return Ok(());
        }
        let passwords = read_lock(&self.passwords).clone();
        match (&connect.username, passwords) {
            (None, _) if self.config.anonymous_allowed() => Ok(()),
            (None, _) => Err(Refusal::NotAuthorized),
            (Some(user), Some(file)) => {
                let password = connect.password.as_deref().unwrap_or_default();
                if connect.password.is_some() && file.verify(user, password) {
                    Ok(())
                } else {
                    warn!(user = %user, "authentication failed");
                    Err(Refusal::BadCredentials)
                }
            }
            // No password file: the name cannot be checked. It is taken as given (for ACLs,
            // as Mosquitto does) when anonymous access is allowed, refused otherwise.
            (Some(_), None) if self.config.anonymous_allowed() => Ok(()),
            (Some(_), None) => Err(Refusal::BadCredentials),
        }
    }

    /// Waits for a turn to hash a password (see the `hashing` field).
    pub(crate) async fn hashing_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.hashing.acquire().await.ok()
    }

    /// Whether CONNECTs need [`Security::authenticate`] at all (an open broker skips the
    /// blocking-thread hop).
    pub(crate) fn checks_connect(&self) -> bool {
        self.config.password_file.is_some() || !self.config.anonymous_allowed()
    }

    /// The authorizer to install in the broker core: it reads the current ACL on every
    /// check, so a reload takes effect for connected clients too.
    pub fn authorizer(self: &Arc<Security>) -> Arc<dyn Authorizer> {
        Arc::new(SecurityAuthorizer(Arc::clone(self)))
    }
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
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

impl Authorizer for SecurityAuthorizer {
    fn authorize(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool {
        match read_lock(&self.0.acl).as_ref() {
            Some(acl) => acl.check(client, access, topic),
            None => true,
        }
    }

    fn allows_everything(&self) -> bool {
        self.0.config.acl_file.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn connect_decisions() {
        let dir = std::env::temp_dir().join(format!("halyard-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pw = dir.join("pw");
        std::fs::write(&pw, MOSQUITTO).expect("write");
        let with_file = Security::load(AuthConfig {
            password_file: Some(pw.clone()),
            ..AuthConfig::default()
        })
        .expect("loads");
        assert!(with_file.checks_connect());
        let check =
            |s: &Security, user, password| s.authenticate(&mut connect(user, password), None);
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

        let open_with_file = Security::load(AuthConfig {
            allow_anonymous: Some(true),
            password_file: Some(pw.clone()),
            ..AuthConfig::default()
        })
        .expect("loads");
        assert_eq!(check(&open_with_file, None, None), Ok(()));
        assert_eq!(
            check(&open_with_file, Some("alice"), Some("x")),
            Err(Refusal::BadCredentials)
        );

        let open = Security::load(AuthConfig::default()).expect("loads");
        assert!(!open.checks_connect());
        assert_eq!(check(&open, Some("anyone"), None), Ok(()));

        // A certificate identity replaces the user name and needs no password.
        let mut c = connect(Some("claimed"), None);
        assert_eq!(with_file.authenticate(&mut c, Some("cert-cn")), Ok(()));
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
