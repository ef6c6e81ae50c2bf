//! SCRAM-SHA-256 (RFC 5802, RFC 7677): the credential a password file stores, the server
//! side of the exchange MQTT 5 enhanced authentication carries, and the client side that
//! `halyard pub` / `halyard sub` and the tests use.
//!
//! The primitives come from maintained crates (`hmac`, `sha2`, `pbkdf2`, `base64`,
//! `subtle`); the message parsing is ours and strict: attributes in the order the grammar
//! gives, no extensions, no `m=` [RFC 5802 5.1], no channel binding (`p=` is refused, `y`
//! and `n` are accepted, as nothing is advertised), `a=` only if it names the same user,
//! printable nonces without a comma, base64 that decodes. User names are compared as given
//! (after the `=2C` / `=3D` unescaping); SASLprep is not applied, so a name must be written
//! in the password file exactly as clients send it.
//!
//! Stored credential (RFC 5803, the form PostgreSQL also uses), after `user:` in the file:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, all base64. The password is
//! never stored; a CONNECT password is checked by deriving the StoredKey again.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::constant_time::secrets_equal;

/// The MQTT Authentication Method name.
pub const METHOD: &str = "SCRAM-SHA-256";

/// The fewest PBKDF2 iterations accepted in a credential [RFC 7677 4].
pub const MIN_ITERATIONS: u32 = 4096;

/// Prefix of a stored credential in a password file.
const ENTRY_PREFIX: &str = "SCRAM-SHA-256$";

/// Bytes of randomness in a nonce.
const NONCE_BYTES: usize = 24;

/// Bytes of a salt made by [`ScramCredential::new`].
const SALT_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A message does not follow the SCRAM grammar, or breaks the exchange (wrong nonce,
    /// channel binding data that differs from the first message).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding, which is not offered.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// The user is unknown or the proof is wrong (not told apart, to the peer or here).
    #[error("SCRAM authentication failed")]
    BadCredentials,
    /// The server's signature is wrong (client side): it does not know the password.
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    /// The server reported an error (`e=` in its final message).
    #[error("the server refused: {0}")]
    ServerError(String),
    /// No randomness for a nonce or salt.
    #[error("no randomness: {0}")]
    Random(String),
}

impl ScramError {
    /// Whether this is a credential failure (0x86) rather than a broken exchange (0x87).
    pub fn is_bad_credentials(&self) -> bool {
        matches!(self, ScramError::BadCredentials)
    }
}

/// What a password file keeps for a SCRAM user.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys into logs.
        write!(f, "SCRAM-SHA-256 ({} iterations)", self.iterations)
    }
}

impl ScramCredential {
    /// A credential for `password` with a fresh random salt.
    pub fn new(password: &str, iterations: u32) -> Result<ScramCredential, ScramError> {
        let mut salt = vec![0u8; SALT_BYTES];
        getrandom::getrandom(&mut salt).map_err(|error| ScramError::Random(error.to_string()))?;
        Ok(ScramCredential::derive(
            password.as_bytes(),
            salt,
            iterations.max(MIN_ITERATIONS),
        ))
    }

    /// The credential of `password` with `salt` and `iterations`. Costly by design.
    fn derive(password: &[u8], salt: Vec<u8>, iterations: u32) -> ScramCredential {
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramCredential {
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
            salt,
        }
    }

    /// The password-file form (see the module documentation).
    pub fn to_entry(&self) -> String {
        format!(
            "{ENTRY_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }

    /// Whether `text` is meant as a SCRAM credential (then [`ScramCredential::parse`] says
    /// whether it is a good one).
    pub(crate) fn is_entry(text: &str) -> bool {
        text.starts_with(ENTRY_PREFIX)
    }

    /// Parses the password-file form.
    pub(crate) fn parse(text: &str) -> Result<ScramCredential, String> {
        let form = "a SCRAM entry must be SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey";
        let rest = text.strip_prefix(ENTRY_PREFIX).ok_or(form)?;
        let (parameters, keys) = rest.split_once('$').ok_or(form)?;
        let (iterations, salt) = parameters.split_once(':').ok_or(form)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(form)?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| format!("bad iteration count `{iterations}`"))?;
        if iterations < MIN_ITERATIONS {
            return Err(format!(
                "{iterations} iterations; SCRAM-SHA-256 needs at least {MIN_ITERATIONS}"
            ));
        }
        let decode = |part: &str, what: &str| {
            BASE64
                .decode(part)
                .map_err(|error| format!("bad base64 {what}: {error}"))
        };
        let salt = decode(salt, "salt")?;
        if salt.is_empty() {
            return Err("empty salt".to_owned());
        }
        let key = |part: &str, what: &str| -> Result<[u8; 32], String> {
            decode(part, what)?
                .try_into()
                .map_err(|_| format!("{what} must be 32 bytes"))
        };
        Ok(ScramCredential {
            iterations,
            salt,
            stored_key: key(stored_key, "StoredKey")?,
            server_key: key(server_key, "ServerKey")?,
        })
    }

    /// Whether `password` is the one this credential was made from (the CONNECT password
    /// path). Costly by design: call from a blocking thread.
    pub(crate) fn verify_password(&self, password: &[u8]) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let stored: [u8; 32] = Sha256::digest(hmac(&salted, b"Client Key")).into();
        secrets_equal(&stored, &self.stored_key)
    }

    /// A credential for a user that does not exist: salt and keys derived from `secret`
    /// and the name, so that repeated attempts see the same salt and nothing tells the
    /// name is unknown; its StoredKey matches no proof anyone can compute.
    pub(crate) fn decoy(secret: &[u8; 32], user: &str) -> ScramCredential {
        let derived = |label: &[u8]| {
            let mut mac = mac(secret);
            mac.update(label);
            mac.update(user.as_bytes());
            let out: [u8; 32] = mac.finalize().into_bytes().into();
            out
        };
        ScramCredential {
            iterations: MIN_ITERATIONS,
            salt: derived(b"salt")[..SALT_BYTES].to_vec(),
            stored_key: derived(b"stored"),
            server_key: derived(b"server"),
        }
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key"))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = mac(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

fn random_nonce() -> Result<String, ScramError> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut bytes).map_err(|error| ScramError::Random(error.to_string()))?;
    Ok(BASE64.encode(bytes))
}

/// `printable` of RFC 5802: 0x21..=0x7E except `,`.
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7E).contains(&b) && b != b',')
}

/// Splits `text` into its comma-separated `k=value` attributes, checking each key in turn
/// against `keys` (exactly that many attributes, in that order).
fn attributes<'a, const N: usize>(
    text: &'a str,
    keys: [char; N],
    what: &'static str,
) -> Result<[&'a str; N], ScramError> {
    let mut parts = text.split(',');
    let mut values = [""; N];
    for (slot, key) in values.iter_mut().zip(keys) {
        let part = parts.next().ok_or(ScramError::Malformed(what))?;
        let mut chars = part.chars();
        if chars.next() != Some(key) || chars.next() != Some('=') {
            return Err(ScramError::Malformed(what));
        }
        *slot = &part[2..];
    }
    if parts.next().is_some() {
        return Err(ScramError::Malformed(what));
    }
    Ok(values)
}

/// Decodes a `saslname`: `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn decode_saslname(name: &str) -> Result<String, ScramError> {
    let malformed = ScramError::Malformed("bad user name escape");
    if name.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).ok_or(malformed.clone())?;
        out.push(match escape {
            "=2C" => ',',
            "=3D" => '=',
            _ => return Err(malformed),
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Encodes a user name as a `saslname`.
fn encode_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// The parts of a client-first message the server needs.
struct ClientFirst<'a> {
    /// `n,,` or `y,,`, verbatim: the client-final's `c=` must encode exactly this.
    gs2_header: &'a str,
    /// The message without the GS2 header, verbatim, for the AuthMessage.
    bare: &'a str,
    user: String,
    nonce: &'a str,
}

fn parse_client_first(message: &str) -> Result<ClientFirst<'_>, ScramError> {
    let (flag, rest) = message
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        _ if flag.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    let gs2_header = &message[..flag.len() + authzid.len() + 2];
    if bare.starts_with("m=") {
        // [RFC 5802 5.1]: a server that sees the reserved m= must fail.
        return Err(ScramError::Malformed("mandatory extension"));
    }
    let [user, nonce] = attributes(bare, ['n', 'r'], "client-first must be n=user,r=nonce")?;
    let user = decode_saslname(user)?;
    if !authzid.is_empty() {
        let named = authzid
            .strip_prefix("a=")
            .ok_or(ScramError::Malformed("bad authorization identity"))?;
        if decode_saslname(named)? != user {
            return Err(ScramError::Malformed(
                "authorization identity differs from the user",
            ));
        }
    }
    if !valid_nonce(nonce) {
        return Err(ScramError::Malformed("bad client nonce"));
    }
    Ok(ClientFirst {
        gs2_header,
        bare,
        user,
        nonce,
    })
}

/// The server side of one exchange, between the server-first and the client-final message.
#[derive(Debug)]
pub struct ScramServer {
    user: String,
    credential: ScramCredential,
    /// The GS2 header the client-final's channel binding must repeat.
    gs2_header: String,
    /// client-first-message-bare "," server-first-message.
    auth_prefix: String,
    /// Client nonce followed by ours.
    nonce: String,
}

impl ScramServer {
    /// Answers a client-first message: the state for the next step and the server-first
    /// message. `lookup` gives the user's credential; an unknown user gets a decoy (see
    /// [`ScramCredential::decoy`]) and fails only at the proof.
    pub fn start(
        client_first: &[u8],
        lookup: impl FnOnce(&str) -> ScramCredential,
    ) -> Result<(ScramServer, String), ScramError> {
        ScramServer::start_with_nonce(client_first, lookup, &random_nonce()?)
    }

    fn start_with_nonce(
        client_first: &[u8],
        lookup: impl FnOnce(&str) -> ScramCredential,
        server_nonce: &str,
    ) -> Result<(ScramServer, String), ScramError> {
        let message = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first is not UTF-8"))?;
        let first = parse_client_first(message)?;
        let credential = lookup(&first.user);
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&credential.salt),
            credential.iterations
        );
        let state = ScramServer {
            auth_prefix: format!("{},{server_first}", first.bare),
            gs2_header: first.gs2_header.to_owned(),
            user: first.user,
            credential,
            nonce,
        };
        Ok((state, server_first))
    }

    /// The user the client claims to be (authenticated only once [`ScramServer::finish`]
    /// succeeds).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Checks a client-final message; on success returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let message = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final is not UTF-8"))?;
        let [binding, nonce, proof_text] = attributes(
            message,
            ['c', 'r', 'p'],
            "client-final must be c=binding,r=nonce,p=proof",
        )?;
        if binding != BASE64.encode(&self.gs2_header) {
            return Err(ScramError::Malformed("channel binding differs"));
        }
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce differs"));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof_text)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
        let without_proof = &message[..message.len() - proof_text.len() - ",p=".len()];
        let auth_message = format!("{},{without_proof}", self.auth_prefix);
        let signature = hmac(&self.credential.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (key, sig) in client_key.iter_mut().zip(signature) {
            *key ^= sig;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !secrets_equal(&stored, &self.credential.stored_key) {
            return Err(ScramError::BadCredentials);
        }
        let server_signature = hmac(&self.credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

/// The client side of one exchange (for `halyard pub` / `sub` and the tests).
#[derive(Debug)]
pub struct ScramClient {
    bare: String,
    nonce: String,
}

/// The client between its final message and the server-final.
#[derive(Debug)]
pub struct ScramClientFinal {
    expected_signature: [u8; 32],
}

impl ScramClient {
    /// Starts an exchange for `user`: the state and the client-first message.
    pub fn new(user: &str) -> Result<(ScramClient, String), ScramError> {
        Ok(ScramClient::with_nonce(user, &random_nonce()?))
    }

    fn with_nonce(user: &str, nonce: &str) -> (ScramClient, String) {
        let bare = format!("n={},r={nonce}", encode_saslname(user));
        let first = format!("n,,{bare}");
        let client = ScramClient {
            bare,
            nonce: nonce.to_owned(),
        };
        (client, first)
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(
        self,
        server_first: &[u8],
        password: &str,
    ) -> Result<(ScramClientFinal, String), ScramError> {
        let message = std::str::from_utf8(server_first)
            .map_err(|_| ScramError::Malformed("server-first is not UTF-8"))?;
        if message.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension"));
        }
        let [nonce, salt, iterations] = attributes(
            message,
            ['r', 's', 'i'],
            "server-first must be r=nonce,s=salt,i=iterations",
        )?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() || !valid_nonce(nonce)
        {
            return Err(ScramError::Malformed("server nonce does not extend ours"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("bad salt"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("bad iteration count"))?;
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::Malformed("too few iterations"));
        }
        let salted = salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={},r={nonce}", BASE64.encode("n,,"));
        let auth_message = format!("{},{message},{without_proof}", self.bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        for (byte, sig) in proof.iter_mut().zip(signature) {
            *byte ^= sig;
        }
        let server_key = hmac(&salted, b"Server Key");
        let state = ScramClientFinal {
            expected_signature: hmac(&server_key, auth_message.as_bytes()),
        };
        Ok((state, format!("{without_proof},p={}", BASE64.encode(proof))))
    }
}

impl ScramClientFinal {
    /// Checks the server-final message: the server proved it knows the credential.
    pub fn verify(self, server_final: &[u8]) -> Result<(), ScramError> {
        let message = std::str::from_utf8(server_final)
            .map_err(|_| ScramError::Malformed("server-final is not UTF-8"))?;
        if let Some(error) = message.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let [signature] = attributes(message, ['v'], "server-final must be v=signature")?;
        let signature = BASE64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("bad server signature"))?;
        if secrets_equal(&signature, &self.expected_signature) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3.
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_credential() -> ScramCredential {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        ScramCredential::derive(b"pencil", salt, 4096)
    }

    fn server(first: &str) -> Result<(ScramServer, String), ScramError> {
        ScramServer::start_with_nonce(first.as_bytes(), |_| rfc_credential(), SERVER_NONCE)
    }

    #[test]
    fn rfc7677_vector_server_side() {
        let (state, server_first) = server(CLIENT_FIRST).expect("first");
        assert_eq!(server_first, SERVER_FIRST);
        assert_eq!(state.user(), "user");
        assert_eq!(
            state.finish(CLIENT_FINAL.as_bytes()).expect("final"),
            SERVER_FINAL
        );
    }

    #[test]
    fn rfc7677_vector_client_side() {
        let (client, first) = ScramClient::with_nonce("user", CLIENT_NONCE);
        assert_eq!(first, CLIENT_FIRST);
        let (state, last) = client
            .respond(SERVER_FIRST.as_bytes(), "pencil")
            .expect("respond");
        assert_eq!(last, CLIENT_FINAL);
        state
            .verify(SERVER_FINAL.as_bytes())
            .expect("server proven");
    }

    #[test]
    fn a_wrong_password_fails_at_the_proof_and_the_client_spots_a_wrong_server() {
        let (client, first) = ScramClient::with_nonce("user", CLIENT_NONCE);
        let (state, server_first) = server(&first).expect("first");
        let (_, last) = client
            .respond(server_first.as_bytes(), "pencil!")
            .expect("respond");
        assert_eq!(
            state.finish(last.as_bytes()),
            Err(ScramError::BadCredentials)
        );
        let (client, _) = ScramClient::with_nonce("user", CLIENT_NONCE);
        let (state, _) = client
            .respond(SERVER_FIRST.as_bytes(), "pencil")
            .expect("respond");
        assert_eq!(
            state.verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::BadServerSignature)
        );
    }

    #[test]
    fn strict_parsing_refuses_what_the_grammar_does_not_allow() {
        let refused = [
            ("p=tls-unique,,n=user,r=abc", ScramError::ChannelBinding),
            (
                "x,,n=user,r=abc",
                ScramError::Malformed("bad channel binding flag"),
            ),
            (
                "n,,m=ext,n=user,r=abc",
                ScramError::Malformed("mandatory extension"),
            ),
            (
                "n,,r=abc,n=user",
                ScramError::Malformed("client-first must be n=user,r=nonce"),
            ),
            (
                "n,,n=user,r=abc,x=1",
                ScramError::Malformed("client-first must be n=user,r=nonce"),
            ),
            (
                "n,,n=us=2Xer,r=abc",
                ScramError::Malformed("bad user name escape"),
            ),
            ("n,,n=,r=abc", ScramError::Malformed("empty user name")),
            ("n,,n=user,r=", ScramError::Malformed("bad client nonce")),
            (
                "n,a=other,n=user,r=abc",
                ScramError::Malformed("authorization identity differs from the user"),
            ),
            (
                "n,,n=user",
                ScramError::Malformed("client-first must be n=user,r=nonce"),
            ),
            ("n", ScramError::Malformed("no GS2 header")),
        ];
        for (message, error) in refused {
            assert_eq!(server(message).err(), Some(error), "{message}");
        }
        let (state, _) = server("y,a=a=3Db=2Cc,n=a=3Db=2Cc,r=abc").expect("escaped name");
        assert_eq!(state.user(), "a=b,c");

        let finals = [
            ("c=biws,r=wrong,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", "nonce differs"),
            (
                "c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                "channel binding differs",
            ),
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=short",
                "proof is not 32 bytes of base64",
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,c=biws,p=x",
                "client-final must be c=binding,r=nonce,p=proof",
            ),
        ];
        for (message, error) in finals {
            let (state, _) = server(CLIENT_FIRST).expect("first");
            assert_eq!(
                state.finish(message.as_bytes()),
                Err(ScramError::Malformed(error)),
                "{message}"
            );
        }
    }

    #[test]
    fn entries_round_trip_and_check_connect_passwords() {
        let credential = ScramCredential::new("s3cret", 4096).expect("new");
        let entry = credential.to_entry();
        assert!(entry.starts_with("SCRAM-SHA-256$4096:"), "{entry}");
        assert!(!entry.contains("s3cret"));
        let parsed = ScramCredential::parse(&entry).expect("parses");
        assert_eq!(parsed, credential);
        assert!(parsed.verify_password(b"s3cret"));
        assert!(!parsed.verify_password(b"s3cret "));
        assert!(
            ScramCredential::parse("SCRAM-SHA-256$1000:c2FsdA==$AA==:AA==")
                .expect_err("few iterations")
                .contains("at least 4096")
        );
        assert!(
            ScramCredential::parse("SCRAM-SHA-256$4096:c2FsdA==$AA==:AA==")
                .expect_err("short keys")
                .contains("32 bytes")
        );
        assert!(ScramCredential::parse("SCRAM-SHA-256$4096:c2FsdA==")
            .expect_err("no keys")
            .contains("must be"));
    }

    #[test]
    fn an_unknown_user_sees_a_stable_salt_and_fails_at_the_proof() {
        let secret = [7u8; 32];
        let first = ScramServer::start(b"n,,n=ghost,r=abc", |user| {
            ScramCredential::decoy(&secret, user)
        })
        .expect("first")
        .1;
        let again = ScramServer::start(b"n,,n=ghost,r=abc", |user| {
            ScramCredential::decoy(&secret, user)
        })
        .expect("first")
        .1;
        let salt = |message: &str| message.split(',').nth(1).map(str::to_owned);
        assert_eq!(salt(&first), salt(&again));
        let (client, client_first) = ScramClient::new("ghost").expect("client");
        let (state, server_first) = ScramServer::start(client_first.as_bytes(), |user| {
            ScramCredential::decoy(&secret, user)
        })
        .expect("first");
        let (_, last) = client
            .respond(server_first.as_bytes(), "guess")
            .expect("respond");
        assert_eq!(
            state.finish(last.as_bytes()),
            Err(ScramError::BadCredentials)
        );
    }
}
