//! The `[auth]` table and the `[[listener]]` array of the configuration file (issue 4),
//! and their translation into the server's types.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use halyard_server::{
    AuthConfig, AuthSource, HttpAuthConfig, JwtConfig, ListenerConfig, ListenerKind, SecurityError,
    ServerError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `[auth]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Whether clients without a user name (and without a password) may connect. Without any
    /// source, a user name is taken as given (for ACLs) when this is true and refused when
    /// false.
    #[schemars(extend(
        "x-default" = "`true` without any source (`password_file`, `[auth.jwt]`, `[auth.http]` `url`), else `false`"
    ))]
    pub allow_anonymous: Option<bool>,
    /// Mosquitto-format file, one `user:hash` per line (`#` comments): `$7$` (PBKDF2-SHA512, what
    /// `mosquitto_passwd` writes), `$6$` (Mosquitto 1.x salted SHA-512), `$argon2id$` (what
    /// `halyard passwd` writes) and `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (base64 parts, the RFC 5803 form PostgreSQL also uses; what `halyard passwd --scram`
    /// writes). Existing Mosquitto files work unchanged. A SCRAM entry serves both
    /// SCRAM-SHA-256 clients and CONNECT passwords; it holds a random salt, at least 4096
    /// PBKDF2 iterations and the stored and server keys, never the password.
    pub password_file: Option<PathBuf>,
    /// Mosquitto-format ACL file (below). Without one, every client may use every topic.
    pub acl_file: Option<PathBuf>,
    /// Order in which the sources are asked about a CONNECT's user name and password. The
    /// first source that knows the client decides (allows or refuses); the others are not
    /// asked. The file knows the users it lists; JWT knows any password shaped like a token;
    /// the HTTP hook knows everyone. A client no source knows is refused.
    #[schemars(with = "Option<Vec<String>>")]
    #[schemars(extend("x-default" = "`[\"file\", \"jwt\", \"http\"]`"))]
    pub chain: Option<Vec<AuthSource>>,
    /// The `[auth.jwt]` table: JWT as the password.
    pub jwt: Option<JwtSection>,
    /// The `[auth.http]` table: the HTTP authentication and ACL hook.
    pub http: Option<HttpSection>,
}

/// The `[auth.jwt]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// A JWKS (`{"keys": [...]}`; the key is picked by the token's `kid`, or the only key), a
    /// PEM public key (RSA; EC when `algorithms` names `ES256`/`ES384`), or else the HMAC
    /// secret itself (its bytes without a final newline, at least 32). Reloaded on SIGHUP.
    pub key_file: PathBuf,
    /// Accepted `alg` values; they must fit the key. `alg: none` is always refused.
    #[serde(default)]
    #[schemars(extend(
        "x-default" = "the key's own: `[\"HS256\"]` for a secret, `[\"RS256\"]` for an RSA key or a JWKS, `[\"ES256\"]` for an EC key"
    ))]
    pub algorithms: Vec<String>,
    /// Claim holding the user name. It becomes the client's user name; a CONNECT that also
    /// sends a user name must send this one.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Required `aud`, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Disconnect a client when its token expires (at `exp` plus the leeway): MQTT 5 clients
    /// get DISCONNECT 0xA0 Maximum connect time.
    #[serde(default)]
    pub disconnect_on_expiry: bool,
    /// Claim holding the client's ACL, `{"pub": [filters], "sub": [filters]}`: a publish needs
    /// its topic to match a `pub` filter, a subscription (checked as if it were a topic) and
    /// each delivery a `sub` filter; everything else is denied, and wildcards never match `$`
    /// topics. It replaces the other ACLs for that client id, also for its offline session,
    /// until its next CONNECT. A malformed claim refuses the token; a token with a claim needs
    /// a client id (an empty one gets 0x87).
    #[serde(default = "default_acl_claim")]
    pub acl_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Tokens must carry `exp`.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
}

fn default_username_claim() -> String {
    JwtConfig::default().username_claim
}

fn default_acl_claim() -> String {
    JwtConfig::default().acl_claim
}

fn default_leeway_secs() -> u64 {
    JwtConfig::default().leeway_secs
}

/// The `[auth.http]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Authentication endpoint (POST per CONNECT).
    pub url: Option<String>,
    /// ACL endpoint (POST per publish or subscribe decision not cached).
    pub acl_url: Option<String>,
    /// Time allowed per call, in milliseconds.
    pub timeout_ms: u64,
    /// How long an ACL answer is reused, in milliseconds.
    pub cache_ttl_ms: u64,
    /// ACL answers kept; the oldest go first.
    pub cache_max_entries: usize,
    /// The answer when the service times out or fails (deny by default).
    pub default_allow: bool,
}

impl Default for HttpSection {
    fn default() -> Self {
        let defaults = HttpAuthConfig::default();
        HttpSection {
            url: None,
            acl_url: None,
            timeout_ms: defaults.timeout.as_millis() as u64,
            cache_ttl_ms: defaults.cache_ttl.as_millis() as u64,
            cache_max_entries: defaults.cache_max_entries,
            default_allow: defaults.default_allow,
        }
    }
}

impl AuthSection {
    /// Whether clients must prove who they are; then, with no `listen` set, the broker
    /// listens on every interface (see `config::default_listen`). A new authentication
    /// method belongs here too.
    pub fn configures_authentication(&self) -> bool {
        self.password_file.is_some()
            || self.jwt.is_some()
            || self.http.as_ref().is_some_and(|http| http.url.is_some())
    }
}

impl From<&AuthSection> for AuthConfig {
    fn from(section: &AuthSection) -> AuthConfig {
        AuthConfig {
            allow_anonymous: section.allow_anonymous,
            password_file: section.password_file.clone(),
            acl_file: section.acl_file.clone(),
            chain: section.chain.clone().unwrap_or_default(),
            jwt: section.jwt.as_ref().map(|jwt| JwtConfig {
                key_file: jwt.key_file.clone(),
                algorithms: jwt.algorithms.clone(),
                username_claim: jwt.username_claim.clone(),
                audience: jwt.audience.clone(),
                issuer: jwt.issuer.clone(),
                disconnect_on_expiry: jwt.disconnect_on_expiry,
                acl_claim: jwt.acl_claim.clone(),
                leeway_secs: jwt.leeway_secs,
            }),
            http: section.http.as_ref().map(|http| HttpAuthConfig {
                url: http.url.clone(),
                acl_url: http.acl_url.clone(),
                timeout: Duration::from_millis(http.timeout_ms),
                cache_ttl: Duration::from_millis(http.cache_ttl_ms),
                cache_max_entries: http.cache_max_entries,
                default_allow: http.default_allow,
            }),
        }
    }
}

/// `kind` of a `[[listener]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KindName {
    /// Plain TCP.
    Tcp,
    /// TLS.
    Tls,
    /// WebSocket.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl From<KindName> for ListenerKind {
    fn from(kind: KindName) -> ListenerKind {
        match kind {
            KindName::Tcp => ListenerKind::Tcp,
            KindName::Tls => ListenerKind::Tls,
            KindName::Ws => ListenerKind::Ws,
            KindName::Wss => ListenerKind::Wss,
        }
    }
}

/// One `[[listener]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// `"tcp"`, `"tls"`, `"ws"` (WebSocket) or `"wss"` (WebSocket over TLS).
    pub kind: KindName,
    /// `IP:PORT` to bind (port 0 = a free port).
    #[serde(deserialize_with = "crate::address::one")]
    pub address: SocketAddr,
    /// PEM certificate chain and private key; required for `tls` and `wss` (rustls with the `ring`
    /// provider; TLS 1.2 and 1.3).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`; required for `tls` and `wss`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: clients must then present a certificate signed by one (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Use the client certificate's Common Name (or, without one, its first Subject Alternative
    /// Name) as the MQTT user name: such clients need no password and get that user's ACL section.
    /// Needs `client_ca_file`.
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// WebSocket endpoint; other paths get HTTP 404. The `mqtt` subprotocol is selected when
    /// offered; a client offering only other subprotocols is refused.
    #[serde(default = "default_path")]
    pub path: String,
    /// Connections open at once on this listener; 0 = only the global `max_connections` applies.
    #[serde(default)]
    pub max_connections: usize,
}

fn default_path() -> String {
    "/mqtt".to_owned()
}

impl From<&ListenerSection> for ListenerConfig {
    fn from(section: &ListenerSection) -> ListenerConfig {
        ListenerConfig {
            kind: section.kind.into(),
            address: section.address,
            cert_file: section.cert_file.clone(),
            key_file: section.key_file.clone(),
            client_ca_file: section.client_ca_file.clone(),
            use_identity_as_username: section.use_identity_as_username,
            path: section.path.clone(),
            max_connections: section.max_connections,
        }
    }
}

/// Checks what the types cannot: the error names the key (`listener.cert_file`, ...).
pub fn validate(listeners: &[ListenerSection]) -> Result<(), (&'static str, String)> {
    for listener in listeners {
        let tls = matches!(listener.kind, KindName::Tls | KindName::Wss);
        if tls && (listener.cert_file.is_none() || listener.key_file.is_none()) {
            return Err((
                "listener.kind",
                format!(
                    "listener {}: kind \"{}\" needs cert_file and key_file",
                    listener.address,
                    ListenerKind::from(listener.kind).name()
                ),
            ));
        }
        if !tls && (listener.cert_file.is_some() || listener.client_ca_file.is_some()) {
            return Err((
                "listener.cert_file",
                format!(
                    "listener {}: certificates need kind \"tls\" or \"wss\"",
                    listener.address
                ),
            ));
        }
        if listener.use_identity_as_username && listener.client_ca_file.is_none() {
            return Err((
                "listener.use_identity_as_username",
                format!(
                    "listener {}: use_identity_as_username needs client_ca_file",
                    listener.address
                ),
            ));
        }
        if !listener.path.starts_with('/') {
            return Err((
                "listener.path",
                format!("listener {}: path must start with /", listener.address),
            ));
        }
    }
    Ok(())
}

/// Security settings taken from the file before it is turned into a `ServerConfig`.
#[derive(Debug)]
pub struct Prepared {
    security: halyard_server::Security,
    listeners: Vec<ListenerConfig>,
    limits: halyard_server::ConnectionLimits,
}

impl Prepared {
    /// Loads the password and ACL files named in `[auth]` (before anything else is opened,
    /// so a bad file stops start-up early) and collects the `[[listener]]` and
    /// connection-limit settings.
    pub fn load(file: &crate::config::FileConfig) -> anyhow::Result<Prepared> {
        let security = halyard_server::Security::load(AuthConfig::from(&file.auth))
            .map_err(|error| name_auth_key(error, &file.auth))?;
        Ok(Prepared {
            security,
            listeners: file.listener.iter().map(ListenerConfig::from).collect(),
            limits: halyard_server::ConnectionLimits {
                max_connections: file.max_connections,
                max_connection_rate_per_ip: file.max_connection_rate_per_ip,
            },
        })
    }

    /// Installs authentication and the ACL, binds the extra listeners and sets the limits.
    /// Returns the extra listeners as bound, for the `listening` lines.
    pub async fn install(
        self,
        server: &mut halyard_server::Server,
    ) -> anyhow::Result<Vec<(ListenerKind, SocketAddr)>> {
        server.set_security(std::sync::Arc::new(self.security));
        server.set_connection_limits(self.limits);
        server
            .bind_listeners(&self.listeners)
            .await
            .map_err(|error| name_listener_key(error, &self.listeners))?;
        Ok(server.listener_addrs())
    }
}

/// Prefixes a password or ACL file error with its `[auth]` key (`auth.password_file: cannot
/// read ...`), so the operator knows which setting to fix.
fn name_auth_key(error: SecurityError, auth: &AuthSection) -> anyhow::Error {
    let path = match &error {
        SecurityError::Read { path, .. }
        | SecurityError::Password { path, .. }
        | SecurityError::Acl { path, .. } => Some(path),
        _ => None,
    };
    let key = if path.is_some() && path == auth.password_file.as_ref() {
        Some("auth.password_file")
    } else if path.is_some() && path == auth.acl_file.as_ref() {
        Some("auth.acl_file")
    } else {
        None
    };
    match key {
        Some(key) => anyhow::Error::new(error).context(key),
        None => error.into(),
    }
}

/// Prefixes a TLS file error of a `[[listener]]` with the key naming that file
/// (`listener.cert_file`, `listener.key_file` or `listener.client_ca_file`).
fn name_listener_key(error: ServerError, listeners: &[ListenerConfig]) -> anyhow::Error {
    let ServerError::Security(SecurityError::Tls(message)) = &error else {
        return error.into();
    };
    let key = listeners.iter().find_map(|listener| {
        [
            ("listener.cert_file", listener.cert_file.as_ref()),
            ("listener.key_file", listener.key_file.as_ref()),
            ("listener.client_ca_file", listener.client_ca_file.as_ref()),
        ]
        .into_iter()
        .find(|(_, path)| path.is_some_and(|path| message.contains(&*path.to_string_lossy())))
        .map(|(key, _)| (key, listener.address))
    });
    match key {
        Some((key, address)) => {
            let context = format!("{key} (listener {address})");
            anyhow::Error::new(error).context(context)
        }
        None => error.into(),
    }
}

/// The stdout line announcing one bound listener: exactly `halyard listening on ADDR` for
/// TCP (scripts and tests parse it), `halyard KIND listening on ADDR` for the others.
pub fn listening_line(kind: ListenerKind, addr: SocketAddr) -> String {
    match kind {
        ListenerKind::Tcp => format!("halyard listening on {addr}"),
        other => format!("halyard {} listening on {addr}", other.name()),
    }
}

/// Reloads certificates, the password file and the ACL file on every SIGHUP, for the life
/// of the process. A file that fails keeps its previous version (see `ReloadHandle`).
#[cfg(unix)]
pub fn reload_on_sighup(handle: halyard_server::ReloadHandle) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading certificates, passwords and ACL");
            let handle = handle.clone();
            // File reads and parsing are blocking work.
            let errors = tokio::task::spawn_blocking(move || handle.reload()).await;
            match errors {
                Ok(errors) if errors.is_empty() => tracing::info!("reload complete"),
                Ok(errors) => tracing::warn!(rejected = errors.len(), "reload partly rejected"),
                Err(error) => tracing::error!(%error, "reload failed to run"),
            }
        }
    });
    Ok(())
}

/// No SIGHUP outside Unix: nothing to install.
#[cfg(not(unix))]
pub fn reload_on_sighup(_handle: halyard_server::ReloadHandle) -> anyhow::Result<()> {
    Ok(())
}

/// `halyard passwd`: adds or updates a user in a Mosquitto-format password file.
#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// The password file; created (mode 0600) if it does not exist.
    pub file: PathBuf,
    /// The user name to add or update.
    pub user: String,
    /// The password. Without it, the password is prompted for on a terminal (not echoed)
    /// or read as the first line of standard input.
    #[arg(long)]
    pub password: Option<String>,
    /// Write a SCRAM-SHA-256 entry (salt, StoredKey, ServerKey): it serves SCRAM clients
    /// through MQTT 5 enhanced authentication and CONNECT passwords alike.
    #[arg(long)]
    pub scram: bool,
    /// PBKDF2 iterations of a `--scram` entry (at least 4096).
    #[arg(long, default_value_t = halyard_server::scram::MIN_ITERATIONS, requires = "scram")]
    pub iterations: u32,
}

/// Writes an Argon2id (or, with `--scram`, a SCRAM-SHA-256) entry for the user, keeping
/// every other line of the file.
pub fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    use anyhow::{bail, Context as _};
    if args.user.is_empty() || args.user.contains(':') {
        bail!("the user name must be non-empty and must not contain `:`");
    }
    let password = match args.password {
        Some(password) => password,
        None => read_password().context("cannot read the password")?,
    };
    if password.is_empty() {
        bail!("empty password");
    }
    if args.scram && args.iterations < halyard_server::scram::MIN_ITERATIONS {
        bail!(
            "--iterations must be at least {}",
            halyard_server::scram::MIN_ITERATIONS
        );
    }
    let hash = if args.scram {
        halyard_server::scram_entry(&password, args.iterations)?
    } else {
        halyard_server::hash_password(&password)?
    };
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", args.file.display()))
        }
    };
    let text = halyard_server::PasswordFile::upsert_line(
        existing.as_deref().unwrap_or_default(),
        &args.user,
        &hash,
    );
    // Written beside the file and renamed over it, so a crash never leaves half a file.
    let tmp = args.file.with_extension("halyard-tmp");
    write_private(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.file)
        .with_context(|| format!("cannot replace {}", args.file.display()))?;
    eprintln!(
        "{} user {} in {}",
        if existing.is_some_and(|t| t.lines().any(|l| l.starts_with(&format!("{}:", args.user)))) {
            "updated"
        } else {
            "added"
        },
        args.user,
        args.file.display()
    );
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Prompts on a terminal with echo off, or reads the first line of a pipe.
fn read_password() -> std::io::Result<String> {
    use std::io::{BufRead as _, IsTerminal as _};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    if terminal {
        eprint!("Password: ");
    }
    let _echo = terminal.then(EchoOff::new);
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if terminal {
        eprintln!();
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Turns terminal echo off until dropped (Unix); elsewhere does nothing.
struct EchoOff {
    #[cfg(unix)]
    saved: Option<libc::termios>,
}

impl EchoOff {
    #[cfg(unix)]
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed, then kernel-filled, termios.
        unsafe {
            let mut term: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut term) != 0 {
                return EchoOff { saved: None };
            }
            let saved = term;
            term.c_lflag &= !libc::ECHO;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &term);
            EchoOff { saved: Some(saved) }
        }
    }

    #[cfg(not(unix))]
    fn new() -> EchoOff {
        EchoOff {}
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}
