//! Binary-side glue of the operations features (issue 5): turning the `[http]` table and
//! the command line into the server's HTTP settings, and the configuration the admin API
//! shows, with secrets redacted.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use halyard_server::{HttpConfig, Server, ServerError};
use serde_json::Value;
use tracing::warn;

use crate::config::{FileConfig, HttpSection, DEFAULT_HTTP_LISTEN, PLACEHOLDER_TOKEN};

/// What `serve` binds for HTTP: the settings, and whether the address was chosen by the
/// operator (an explicit address that is in use is an error; the default one only a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPlan {
    /// Listener address and token.
    pub config: HttpConfig,
    /// Whether the address came from the file, the environment or `--http-listen`.
    pub explicit: bool,
}

/// Resolves the HTTP settings: `--no-http` and `http.enabled = false` turn HTTP off;
/// `--http-listen` beats `http.listen`; the token comes from `http.token` or `token_file`.
pub fn http_settings(
    section: &HttpSection,
    cli_listen: Option<SocketAddr>,
    no_http: bool,
) -> Result<Option<HttpPlan>> {
    if no_http || (section.enabled == Some(false) && cli_listen.is_none()) {
        return Ok(None);
    }
    let token = match (&section.token, &section.token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read http.token_file {}", path.display()))?
                .trim_end()
                .to_owned();
            if token == PLACEHOLDER_TOKEN {
                bail!(
                    "http.token_file {}: `{PLACEHOLDER_TOKEN}` is a published placeholder: \
                     put a secret token there",
                    path.display()
                );
            }
            Some(token)
        }
        (None, None) if section.generate_token => Some(generated_token()?),
        (None, None) => None,
    };
    let explicit = cli_listen.or(section.listen);
    let default: SocketAddr = DEFAULT_HTTP_LISTEN
        .parse()
        .context("built-in default http address")?;
    Ok(Some(HttpPlan {
        config: HttpConfig {
            listen: explicit.unwrap_or(default),
            token,
        },
        explicit: explicit.is_some(),
    }))
}

/// A random admin API token for this run (`http.generate_token`), logged once so the
/// operator can use it: 32 bytes from the operating system, hex-encoded.
fn generated_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).context("cannot generate an http token")?;
    let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    warn!(
        token = %token,
        "http.token not set: generated an admin API token for this run (set http.token_file \
         or HALYARD_HTTP_TOKEN to choose one and keep it out of the logs)"
    );
    Ok(token)
}

/// Binds the HTTP listener of `server` per `plan`; `Ok(None)` when HTTP is off, or when the
/// default address is taken (logged: another broker on this host likely has it).
pub async fn bind_http(server: &mut Server, plan: Option<HttpPlan>) -> Result<Option<SocketAddr>> {
    let Some(plan) = plan else {
        return Ok(None);
    };
    let listen = plan.config.listen;
    match server.bind_http(plan.config).await {
        Ok(addr) => Ok(Some(addr)),
        Err(ServerError::Bind { source, .. })
            if !plan.explicit && source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            warn!(%listen, "default http address in use; serving without HTTP (set http.listen)");
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// Key names whose values `/api/v1/config` never shows.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["token", "password", "secret", "private_key"]
        .iter()
        .any(|word| key.contains(word))
        && !key.ends_with("_file")
}

fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if is_secret(key) && !value.is_null() {
                    *value = Value::String("<redacted>".to_owned());
                } else {
                    redact(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The effective configuration as JSON, with every secret-looking value replaced by
/// `"<redacted>"` (keys containing token, password, secret or private_key; paths to such
/// files are shown).
pub fn redacted_config(config: &FileConfig) -> Value {
    let mut value = serde_json::to_value(config).unwrap_or(Value::Null);
    redact(&mut value);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let mut config = FileConfig::default();
        config.http.token = Some("s3cret".to_owned());
        let value = redacted_config(&config);
        assert_eq!(value["http"]["token"], "<redacted>");
        assert!(!value.to_string().contains("s3cret"));
        assert_eq!(value["sys_interval"], 10);
    }

    #[test]
    fn http_defaults_and_overrides() {
        let section = HttpSection::default();
        let plan = http_settings(&section, None, false)
            .expect("ok")
            .expect("on by default");
        assert_eq!(plan.config.listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert!(!plan.explicit);
        let cli: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let plan = http_settings(&section, Some(cli), false)
            .expect("ok")
            .expect("on");
        assert_eq!(plan.config.listen, cli);
        assert!(plan.explicit);
        assert!(http_settings(&section, None, true).expect("ok").is_none());
        let off = HttpSection {
            enabled: Some(false),
            ..HttpSection::default()
        };
        assert!(http_settings(&off, None, false).expect("ok").is_none());
    }
}
