//! JSON Web Tokens as the CONNECT password (`[auth.jwt]`), checked with the `jsonwebtoken`
//! crate (9.x, which verifies with `ring`).
//!
//! The key file holds one of: a JWKS (`{"keys": [...]}`, the key picked by the token's
//! `kid`, or the only key), a PEM public key (RSA, or EC for `ES256`/`ES384`), or else the
//! HMAC secret itself (its bytes, without a final newline). `alg = none` never verifies:
//! the header is read before anything else and `none` is refused by name, and no algorithm
//! outside `algorithms` is accepted. `exp` is required; `exp` and `nbf` are checked with
//! `leeway_secs` of leeway for clock skew (default [`DEFAULT_LEEWAY_SECS`]), and a client
//! whose token expires while it is connected is disconnected that long after `exp`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::claim_acl::ClaimAcl;

/// Clock skew tolerated on `exp` and `nbf` unless configured.
pub const DEFAULT_LEEWAY_SECS: u64 = 10;

/// The `[auth.jwt]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// HS256 secret, PEM public key or JWKS file.
    pub key_file: PathBuf,
    /// Accepted `alg` values; empty means the key's natural one (`HS256` for a secret,
    /// `RS256` for an RSA key or a JWKS, `ES256` for an EC key).
    pub algorithms: Vec<String>,
    /// Claim holding the user name.
    pub username_claim: String,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Disconnect the client (MQTT 5: DISCONNECT 0xA0) when its token expires.
    pub disconnect_on_expiry: bool,
    /// Claim holding the client's ACL (see `claim_acl.rs`); none if it is absent.
    pub acl_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            key_file: PathBuf::new(),
            algorithms: Vec::new(),
            username_claim: "sub".to_owned(),
            audience: None,
            issuer: None,
            disconnect_on_expiry: false,
            acl_claim: "acl".to_owned(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// Why a token was refused; [`JwtError::reason`] is its metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// `alg: none`.
    #[error("unsigned token (alg none)")]
    AlgNone,
    /// An algorithm outside `algorithms`, or one the key cannot check.
    #[error("algorithm not accepted")]
    Algorithm,
    /// Past `exp` (with leeway).
    #[error("token expired")]
    Expired,
    /// Before `nbf` (with leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` is not the configured audience.
    #[error("wrong audience")]
    Audience,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    Issuer,
    /// Bad signature, shape, claims or key id.
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl JwtError {
    /// The `reason` label of the refusal counter.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            JwtError::AlgNone => "jwt_alg_none",
            JwtError::Algorithm => "jwt_algorithm",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::Audience => "jwt_audience",
            JwtError::Issuer => "jwt_issuer",
            JwtError::Invalid(_) => "jwt_invalid",
        }
    }
}

/// What a verified token says about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JwtIdentity {
    /// The `username_claim` value.
    pub(crate) username: String,
    /// `exp`.
    pub(crate) expires_at: SystemTime,
    /// The ACL claim, if the token has one.
    pub(crate) acl: Option<ClaimAcl>,
}

/// The keys a token may be signed with.
enum Keys {
    /// One key (secret or PEM).
    Single(DecodingKey),
    /// A JWKS, by `kid`.
    Set(JwkSet),
}

/// A loaded `[auth.jwt]`: keys and validation rules.
pub(crate) struct JwtVerifier {
    config: JwtConfig,
    keys: Keys,
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys into logs.
        f.debug_struct("JwtVerifier")
            .field("key_file", &self.config.key_file)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The key families, to match algorithms to keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
}

fn family(algorithm: Algorithm) -> Family {
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        _ => Family::Rsa,
    }
}

impl JwtVerifier {
    /// Reads the key file and checks the settings; the error is for the operator.
    pub(crate) fn load(config: &JwtConfig) -> Result<JwtVerifier, String> {
        let path = &config.key_file;
        let bytes = std::fs::read(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let (keys, natural) = parse_keys(path, &bytes, &config.algorithms)?;
        let algorithms = if config.algorithms.is_empty() {
            vec![natural]
        } else {
            config
                .algorithms
                .iter()
                .map(|name| {
                    name.parse::<Algorithm>()
                        .map_err(|_| format!("auth.jwt.algorithms: unknown algorithm `{name}`"))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let key_family = family(natural);
        if let Some(odd) = algorithms.iter().find(|alg| family(**alg) != key_family) {
            return Err(format!(
                "auth.jwt.algorithms: {odd:?} does not fit the key in {}",
                path.display()
            ));
        }
        Ok(JwtVerifier {
            config: config.clone(),
            keys,
            algorithms,
        })
    }

    /// Whether `password` has the shape of a JWT (three base64url parts, a JSON header
    /// with `alg`): then the JWT source knows this client and decides.
    pub(crate) fn looks_like_token(password: &[u8]) -> bool {
        std::str::from_utf8(password)
            .ok()
            .filter(|text| text.split('.').count() == 3)
            .and_then(header_alg)
            .is_some()
    }

    /// Verifies `token` at `now`.
    pub(crate) fn verify(&self, token: &str, now: SystemTime) -> Result<JwtIdentity, JwtError> {
        let alg = header_alg(token).ok_or_else(|| JwtError::Invalid("bad header".to_owned()))?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::AlgNone);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Algorithm)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(JwtError::Algorithm);
        }
        let owned;
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Set(set) => {
                let jwk = match (&header.kid, &set.keys[..]) {
                    (Some(kid), _) => set.find(kid),
                    (None, [only]) => Some(only),
                    (None, _) => None,
                }
                .ok_or_else(|| JwtError::Invalid("no key for this kid".to_owned()))?;
                owned = DecodingKey::from_jwk(jwk)
                    .map_err(|error| JwtError::Invalid(error.to_string()))?;
                &owned
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = self.algorithms.clone();
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        // The crate reads its own clock; `now` is checked below as well, so a test clock
        // and the real one agree.
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        let data =
            jsonwebtoken::decode::<Value>(token, key, &validation).map_err(|error| match error
                .kind()
            {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                ErrorKind::InvalidAudience => JwtError::Audience,
                ErrorKind::InvalidIssuer => JwtError::Issuer,
                ErrorKind::InvalidAlgorithm => JwtError::Algorithm,
                other => JwtError::Invalid(format!("{other:?}")),
            })?;
        let claims = data.claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| JwtError::Invalid("exp is not a number".to_owned()))?;
        let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
        if expires_at + self.leeway() <= now {
            return Err(JwtError::Expired);
        }
        let username = claims
            .get(&self.config.username_claim)
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .ok_or_else(|| JwtError::Invalid(format!("no `{}` claim", self.config.username_claim)))?
            .to_owned();
        let acl = claims
            .get(&self.config.acl_claim)
            .map(ClaimAcl::from_claim)
            .transpose()
            .map_err(JwtError::Invalid)?;
        Ok(JwtIdentity {
            username,
            expires_at,
            acl,
        })
    }

    /// The settings.
    pub(crate) fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// The leeway on `exp` and `nbf`.
    pub(crate) fn leeway(&self) -> Duration {
        Duration::from_secs(self.config.leeway_secs)
    }
}

/// The `alg` of a token's header, read without the crate: `none` must be recognised even
/// though the crate has no such algorithm.
fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    json.get("alg")?.as_str().map(str::to_owned)
}

/// The keys in a key file, with the algorithm natural to them.
fn parse_keys(
    path: &Path,
    bytes: &[u8],
    configured: &[String],
) -> Result<(Keys, Algorithm), String> {
    let named = |what: &str, error: jsonwebtoken::errors::Error| {
        format!("{}: not a usable {what}: {error}", path.display())
    };
    if let Ok(set) = serde_json::from_slice::<JwkSet>(bytes) {
        if set.keys.is_empty() {
            return Err(format!("{}: the JWKS has no key", path.display()));
        }
        for jwk in &set.keys {
            DecodingKey::from_jwk(jwk).map_err(|error| named("JWKS key", error))?;
        }
        return Ok((Keys::Set(set), Algorithm::RS256));
    }
    if bytes.starts_with(b"-----BEGIN") {
        let wants_ec = configured.iter().any(|name| name.starts_with("ES"));
        return if wants_ec {
            let key = DecodingKey::from_ec_pem(bytes).map_err(|error| named("EC key", error))?;
            Ok((Keys::Single(key), Algorithm::ES256))
        } else {
            let key = DecodingKey::from_rsa_pem(bytes).map_err(|error| named("RSA key", error))?;
            Ok((Keys::Single(key), Algorithm::RS256))
        };
    }
    let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
    if secret.len() < 32 {
        return Err(format!(
            "{}: an HMAC secret must be at least 32 bytes",
            path.display()
        ));
    }
    Ok((
        Keys::Single(DecodingKey::from_secret(secret)),
        Algorithm::HS256,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    fn verifier(config: JwtConfig) -> (JwtVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).expect("write");
        let config = JwtConfig {
            key_file: path,
            ..config
        };
        (JwtVerifier::load(&config).expect("loads"), dir)
    }

    fn token(claims: Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode")
    }

    #[test]
    fn hs256_tokens_verify_and_name_their_user() {
        let (v, _dir) = verifier(JwtConfig::default());
        let exp = now_secs() + 60;
        let identity = v
            .verify(
                &token(json!({"sub": "dev-1", "exp": exp, "acl": {"pub": ["a/#"]}})),
                SystemTime::now(),
            )
            .expect("valid");
        assert_eq!(identity.username, "dev-1");
        assert_eq!(
            identity.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
        );
        assert!(identity
            .acl
            .expect("acl")
            .allows(halyard_core::Access::Publish, "a/b"));
    }

    #[test]
    fn refusals_have_their_reasons() {
        let (v, _dir) = verifier(JwtConfig {
            audience: Some("halyard".to_owned()),
            issuer: Some("fleet".to_owned()),
            ..JwtConfig::default()
        });
        let now = now_secs();
        let good = json!({"sub": "d", "exp": now + 60, "aud": "halyard", "iss": "fleet"});
        assert!(v.verify(&token(good.clone()), SystemTime::now()).is_ok());
        let with = |key: &str, value: Value| {
            let mut claims = good.clone();
            claims[key] = value;
            v.verify(&token(claims), SystemTime::now())
        };
        assert_eq!(with("exp", json!(now - 60)), Err(JwtError::Expired));
        // Within the leeway an expired token still passes.
        assert!(with("exp", json!(now - 2)).is_ok());
        assert_eq!(with("nbf", json!(now + 600)), Err(JwtError::NotYetValid));
        assert_eq!(with("aud", json!("other")), Err(JwtError::Audience));
        assert_eq!(with("iss", json!("other")), Err(JwtError::Issuer));
        assert!(matches!(
            with("acl", json!("all")),
            Err(JwtError::Invalid(_))
        ));
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(good.to_string())
        );
        assert!(JwtVerifier::looks_like_token(unsigned.as_bytes()));
        assert_eq!(
            v.verify(&unsigned, SystemTime::now()),
            Err(JwtError::AlgNone)
        );
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &good,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode");
        assert_eq!(
            v.verify(&hs512, SystemTime::now()),
            Err(JwtError::Algorithm)
        );
        let forged = encode(
            &Header::default(),
            &good,
            &EncodingKey::from_secret(b"another secret, 32 bytes long!!!"),
        )
        .expect("encode");
        assert!(matches!(
            v.verify(&forged, SystemTime::now()),
            Err(JwtError::Invalid(_))
        ));
        assert!(!JwtVerifier::looks_like_token(b"plain password"));
    }

    #[test]
    fn key_files_are_checked_at_load() {
        let dir = tempfile::tempdir().expect("dir");
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").expect("write");
        let config = JwtConfig {
            key_file: short,
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::load(&config)
            .expect_err("short secret")
            .contains("32 bytes"));
        let (_, _dir) = verifier(JwtConfig::default());
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).expect("write");
        let config = JwtConfig {
            key_file: path,
            algorithms: vec!["RS256".to_owned()],
            ..JwtConfig::default()
        };
        assert!(JwtVerifier::load(&config)
            .expect_err("family")
            .contains("does not fit"));
    }
}
