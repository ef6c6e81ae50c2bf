//! The `[auth]` table and the `[[listener]]` array of the configuration file (issue 4),
//! and their translation into the server's types.

use std::net::SocketAddr;
use std::path::PathBuf;

use halyard_server::{AuthConfig, ListenerConfig, ListenerKind, SecurityError, ServerError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `[auth]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Whether clients without a user name may connect. Without a password file, a user name is
    /// taken as given (for ACLs) when this is true and refused when false.
    #[schemars(extend("x-default" = "`true` without `password_file`, else `false`"))]
    pub allow_anonymous: Option<bool>,
    /// Mosquitto-format file, one `user:hash` per line (`#` comments): `$7$` (PBKDF2-SHA512, what
    /// `mosquitto_passwd` writes), `$6$` (Mosquitto 1.x salted SHA-512) and `$argon2id$` (what
    /// `halyard passwd` writes). Existing Mosquitto files work unchanged.
    pub password_file: Option<PathBuf>,
    /// Mosquitto-format ACL file (below). Without one, every client may use every topic.
    pub acl_file: Option<PathBuf>,
}

impl AuthSection {
    /// Whether clients must prove who they are; then, with no `listen` set, the broker
    /// listens on every interface (see `config::default_listen`). A new authentication
    /// method belongs here too.
    pub fn configures_authentication(&self) -> bool {
        self.password_file.is_some()
    }
}

impl From<&AuthSection> for AuthConfig {
    fn from(section: &AuthSection) -> AuthConfig {
        AuthConfig {
            allow_anonymous: section.allow_anonymous,
            password_file: section.password_file.clone(),
            acl_file: section.acl_file.clone(),
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
}

/// Writes an Argon2id entry for the user, keeping every other line of the file.
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
    let hash = halyard_server::hash_password(&password)?;
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
