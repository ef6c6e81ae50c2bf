//! `--scram` for `halyard pub` / `halyard sub`: SCRAM-SHA-256 through MQTT 5 enhanced
//! authentication, so the password never crosses the network; the broker's final message
//! is checked too, so a broker that does not know the credential is not trusted.

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use halyard_codec::{Auth, ConnAck, Packet, Properties, ReasonCode};
use halyard_server::scram::{ScramClient, ScramClientFinal, METHOD};

/// One login, from the CONNECT to the CONNACK.
pub struct ScramLogin {
    password: String,
    first: Option<ScramClient>,
    last: Option<ScramClientFinal>,
}

impl ScramLogin {
    /// Starts a login; sets the CONNECT's Authentication Method and Data.
    pub fn start(user: &str, password: &str, properties: &mut Properties) -> Result<ScramLogin> {
        let (first, message) = ScramClient::new(user)?;
        properties.authentication_method = Some(METHOD.to_owned());
        properties.authentication_data = Some(Bytes::from(message));
        Ok(ScramLogin {
            password: password.to_owned(),
            first: Some(first),
            last: None,
        })
    }

    /// Answers the broker's AUTH 0x18 (server-first) with the client-final AUTH.
    pub fn answer(&mut self, auth: &Auth) -> Result<Packet> {
        let first = self
            .first
            .take()
            .ok_or_else(|| anyhow!("the broker sent a second SCRAM challenge"))?;
        if auth.reason != ReasonCode::CONTINUE_AUTHENTICATION {
            bail!("unexpected AUTH reason 0x{:02x}", auth.reason.0);
        }
        let data = auth
            .properties
            .authentication_data
            .as_deref()
            .unwrap_or_default();
        let (last, message) = first.respond(data, &self.password)?;
        self.last = Some(last);
        Ok(Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some(METHOD.to_owned()),
                authentication_data: Some(Bytes::from(message)),
                ..Properties::default()
            },
        }))
    }

    /// Checks the server-final message in a successful CONNACK.
    pub fn verify(self, ack: &ConnAck) -> Result<()> {
        let last = self
            .last
            .ok_or_else(|| anyhow!("the broker accepted SCRAM without a challenge"))?;
        let data = ack
            .properties
            .authentication_data
            .as_deref()
            .unwrap_or_default();
        last.verify(data)?;
        Ok(())
    }
}
