//! `halyard pub` and `halyard sub`: small MQTT command-line clients in the broker's own
//! binary, with mosquitto_pub / mosquitto_sub-style flags, so an operator has a client
//! wherever the broker is installed (a container image included).
//!
//! They speak raw packets through `halyard-codec` on tokio: no second MQTT stack to build.
//! TLS (`client_tls.rs`) and SCRAM-SHA-256 (`client_scram.rs`) are there; WebSocket options
//! are not there yet. A JWT is given as the password (`-P`).

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use halyard_codec::{
    decode, encode, Connect, DecodeContext, Disconnect, Packet, Properties, ProtocolVersion,
    PubResponse, Publish, QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::client_scram::ScramLogin;
use crate::client_tls::{BrokerStream, TlsArgs};

/// Exit status when `-W` runs out before `-C` messages arrived (as mosquitto_sub does).
pub const EXIT_TIMEOUT: u8 = 27;

/// Options every client command shares.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Broker host name or IP address.
    #[arg(short = 'h', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(short = 'p', long = "port", default_value_t = 1883)]
    port: u16,
    /// MQTT protocol version: 5, 311 or 31 (also mqttv5, mqttv311, mqttv31).
    #[arg(short = 'V', long = "protocol-version", default_value = "311", value_parser = parse_version)]
    version: ProtocolVersion,
    /// Client identifier; default `halyard-pub-<pid>` / `halyard-sub-<pid>`.
    #[arg(short = 'i', long = "id")]
    id: Option<String>,
    /// Username.
    #[arg(short = 'u', long = "username")]
    username: Option<String>,
    /// Password (or a JWT, for brokers that take tokens).
    #[arg(short = 'P', long = "pw")]
    password: Option<String>,
    /// Authenticate with SCRAM-SHA-256 (MQTT 5 enhanced authentication) using -u and -P:
    /// the password is not sent.
    #[arg(long = "scram", requires_all = ["username", "password"])]
    scram: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Keep-alive in seconds.
    #[arg(short = 'k', long = "keepalive", default_value_t = 60)]
    keepalive: u16,
    /// QoS for publishing or subscribing.
    #[arg(short = 'q', long = "qos", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// MQTT 5 user property (repeatable), as mosquitto's `-D COMMAND user-property KEY VALUE`
    /// (COMMAND: connect, publish / subscribe, disconnect), or for the message as
    /// `-D KEY VALUE` or `-D KEY=VALUE`.
    #[arg(short = 'D', long = "property", visible_alias = "user-property", num_args = 1..=4, value_names = ["COMMAND", "user-property", "KEY", "VALUE"], action = clap::ArgAction::Append)]
    property: Vec<String>,
    /// Topic of the will message, published by the broker if this client goes away without
    /// a DISCONNECT.
    #[arg(long = "will-topic", value_name = "TOPIC")]
    will_topic: Option<String>,
    /// Payload of the will message (default empty).
    #[arg(long = "will-payload", value_name = "MESSAGE")]
    will_payload: Option<String>,
    /// QoS of the will message.
    #[arg(long = "will-qos", value_name = "QOS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    will_qos: u8,
    /// Retain the will message.
    #[arg(long = "will-retain")]
    will_retain: bool,
    /// Give up after this many seconds (sub: stop receiving; pub: whole exchange).
    #[arg(short = 'W', long = "timeout", value_name = "SECS")]
    timeout: Option<u64>,
    /// Print the packets exchanged (on stderr).
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// Print help.
    #[arg(long = "help", action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// `halyard pub`.
#[derive(Debug, Clone, Args)]
#[command(disable_help_flag = true)]
pub struct PubArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Topic to publish to.
    #[arg(short = 't', long = "topic")]
    topic: String,
    /// Message payload.
    #[arg(short = 'm', long = "message", group = "payload")]
    message: Option<String>,
    /// Send the contents of a file as the payload.
    #[arg(short = 'f', long = "file", group = "payload")]
    file: Option<std::path::PathBuf>,
    /// Read the payload from stdin (all of it, as one message).
    #[arg(short = 's', long = "stdin-file", group = "payload")]
    stdin: bool,
    /// Send each line of stdin as a separate message.
    #[arg(short = 'l', long = "stdin-line", group = "payload")]
    lines: bool,
    /// Send an empty payload (for example to clear a retained message).
    #[arg(short = 'n', long = "null-message", group = "payload")]
    null: bool,
    /// Set the RETAIN flag.
    #[arg(short = 'r', long = "retain")]
    retain: bool,
    /// Send the message this many times.
    #[arg(short = 'C', long = "count", default_value_t = 1)]
    count: u64,
}

/// `halyard sub`.
#[derive(Debug, Clone, Args)]
#[command(disable_help_flag = true)]
pub struct SubArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Topic filter to subscribe to (repeatable).
    #[arg(short = 't', long = "topic", required = true)]
    topics: Vec<String>,
    /// Print `topic payload` instead of the payload alone (text format).
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Output format.
    #[arg(long = "format", value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
    /// Exit after receiving this many messages.
    #[arg(short = 'C', long = "count")]
    count: Option<u64>,
    /// Do not print messages that arrive with RETAIN set (stale values).
    #[arg(short = 'R', long = "no-retained")]
    no_retained: bool,
    /// Keep the session (clean start off; MQTT 5 session expiry = forever).
    #[arg(short = 'c', long = "disable-clean-session")]
    persistent: bool,
}

/// How `halyard sub` prints messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The payload (with `-v`: `topic payload`), one per line.
    Text,
    /// One JSON object per line: topic, qos, retain, payload (UTF-8, or null), payload_base64,
    /// user properties.
    Json,
}

fn parse_version(text: &str) -> std::result::Result<ProtocolVersion, String> {
    match text.to_ascii_lowercase().as_str() {
        "5" | "mqttv5" | "5.0" => Ok(ProtocolVersion::V5),
        "311" | "mqttv311" | "3.1.1" => Ok(ProtocolVersion::V3_1_1),
        "31" | "mqttv31" | "3.1" => Ok(ProtocolVersion::V3_1),
        _ => Err(format!(
            "unknown protocol version `{text}` (use 5, 311 or 31)"
        )),
    }
}

fn qos_of(value: u8) -> QoS {
    match value {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

/// The packet names mosquitto's `-D COMMAND PROPERTY ...` accepts.
const MOSQUITTO_COMMANDS: [&str; 11] = [
    "connect",
    "publish",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "auth",
    "will",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
];

/// User properties by the packet they go in.
#[derive(Debug, Default, PartialEq, Eq)]
struct UserProperties {
    connect: Vec<(String, String)>,
    /// PUBLISH for `pub`, SUBSCRIBE for `sub`.
    message: Vec<(String, String)>,
    disconnect: Vec<(String, String)>,
}

impl CommonArgs {
    /// User properties from the `-D` options; `message_command` is `publish` or `subscribe`.
    fn user_properties(&self, message_command: &str) -> Result<UserProperties> {
        let mut out = UserProperties::default();
        // clap hands over the values of every -D in one list; each form is recognised by
        // its first word.
        let mut rest = self.property.as_slice();
        while let Some(first) = rest.first() {
            let (target, key, value, used) = if MOSQUITTO_COMMANDS.contains(&first.as_str()) {
                let [command, property, key, value, ..] = rest else {
                    bail!("-D {first}: not enough arguments (COMMAND user-property KEY VALUE)");
                };
                if property != "user-property" {
                    bail!("-D {command} {property}: only user-property is supported");
                }
                let target = match command.as_str() {
                    "connect" => &mut out.connect,
                    "disconnect" => &mut out.disconnect,
                    command if command == message_command => &mut out.message,
                    other => bail!(
                        "-D {other}: user properties go on connect, {message_command} or \
                         disconnect"
                    ),
                };
                (target, key.as_str(), value.as_str(), 4)
            } else if let Some((key, value)) = first.split_once('=') {
                (&mut out.message, key, value, 1)
            } else {
                let [key, value, ..] = rest else {
                    bail!(
                        "-D {first}: wants KEY VALUE, KEY=VALUE or COMMAND user-property KEY VALUE"
                    );
                };
                (&mut out.message, key.as_str(), value.as_str(), 2)
            };
            target.push((key.to_owned(), value.to_owned()));
            rest = &rest[used..];
        }
        if out != UserProperties::default() && !self.version.is_v5() {
            bail!("user properties need MQTT 5 (-V 5)");
        }
        Ok(out)
    }

    /// The will of `--will-topic` and friends, checked as the broker would check it.
    fn will(&self) -> Result<Option<Will>> {
        let Some(topic) = &self.will_topic else {
            if self.will_payload.is_some() || self.will_retain || self.will_qos > 0 {
                bail!("will payload, QoS or retain given, but no will topic (--will-topic)");
            }
            return Ok(None);
        };
        check_topic_name("will topic", topic)?;
        Ok(Some(Will {
            topic: topic.clone(),
            payload: Bytes::from(self.will_payload.clone().unwrap_or_default()),
            qos: qos_of(self.will_qos),
            retain: self.will_retain,
            properties: Properties::default(),
        }))
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout
            .map(|secs| Instant::now() + Duration::from_secs(secs))
    }
}

/// Longest topic MQTT can encode (a two-byte length) [MQTT-1.5.4-1].
const MAX_TOPIC_BYTES: usize = 65_535;

/// Refuses, before anything is sent, a topic name the broker would refuse: empty
/// [MQTT-4.7.3-1], with a wildcard [MQTT-3.3.2-2], with U+0000 [MQTT-1.5.4-2] or too long.
/// Otherwise a QoS 0 publish would be dropped without a word.
fn check_topic_name(what: &str, topic: &str) -> Result<()> {
    if !topic_is_encodable(topic) || !halyard_codec::topic::is_valid_topic_name(topic) {
        bail!(
            "invalid {what} '{topic}': a topic name is 1 to 65535 bytes without '+', '#' \
             or NUL"
        );
    }
    Ok(())
}

/// Refuses a topic filter the broker would refuse: empty, or `+` / `#` not alone in their
/// level, or `#` not last [MQTT-4.7.1-1, MQTT-4.7.1-2].
fn check_topic_filter(filter: &str) -> Result<()> {
    if !topic_is_encodable(filter) || !halyard_codec::topic::is_valid_topic_filter(filter) {
        bail!(
            "invalid subscription topic '{filter}': are all '+' and '#' wildcards correct \
             ('+' and '#' alone in their level, '#' last)?"
        );
    }
    Ok(())
}

fn topic_is_encodable(topic: &str) -> bool {
    topic.len() <= MAX_TOPIC_BYTES && !topic.contains('\0')
}

/// A reason code as the packet it came in means it: MQTT 5 names (`0x90 Topic Name
/// invalid`), MQTT 3.x CONNACK return codes by their 3.1.1 names.
fn connack_code(version: ProtocolVersion, code: ReasonCode) -> String {
    if version.is_v5() {
        code.to_string()
    } else {
        format!("0x{:02X} {}", code.0, code.v3_connack_name())
    }
}

/// One MQTT connection: a socket and a decode buffer.
struct Client {
    stream: Box<dyn BrokerStream>,
    buf: BytesMut,
    version: ProtocolVersion,
    debug: bool,
    next_id: u16,
}

impl Client {
    async fn connect(
        common: &CommonArgs,
        default_id: &str,
        persistent: bool,
        will: Option<Will>,
        user_properties: Vec<(String, String)>,
    ) -> Result<Client> {
        if common.scram && !common.version.is_v5() {
            bail!("--scram needs MQTT 5 (-V 5)");
        }
        let stream = common.tls.open(&common.host, common.port).await?;
        let mut client = Client {
            stream,
            buf: BytesMut::with_capacity(4096),
            version: common.version,
            debug: common.debug,
            next_id: 1,
        };
        let mut properties = Properties {
            user_properties,
            ..Properties::default()
        };
        if persistent && common.version.is_v5() {
            properties.session_expiry_interval = Some(u32::MAX);
        }
        let mut scram = match (common.scram, &common.username, &common.password) {
            (true, Some(user), Some(password)) => {
                Some(ScramLogin::start(user, password, &mut properties)?)
            }
            _ => None,
        };
        let connect = Connect {
            protocol: common.version,
            clean_start: !persistent,
            keep_alive: common.keepalive,
            client_id: common.id.clone().unwrap_or_else(|| default_id.to_owned()),
            will,
            username: common.username.clone(),
            password: match scram {
                Some(_) => None,
                None => common.password.clone().map(Bytes::from),
            },
            properties,
        };
        client.send(&Packet::Connect(Box::new(connect))).await?;
        let reply = loop {
            match (client.recv(common.deadline()).await?, scram.as_mut()) {
                (Packet::Auth(auth), Some(login)) => {
                    let answer = login.answer(&auth)?;
                    client.send(&answer).await?;
                }
                (other, _) => break other,
            }
        };
        match reply {
            Packet::ConnAck(ack) if ack.code == ReasonCode::SUCCESS => {
                if let Some(login) = scram {
                    login.verify(&ack)?;
                }
                Ok(client)
            }
            Packet::ConnAck(ack) => bail!(
                "connection refused: {}{}",
                connack_code(common.version, ack.code),
                ack.properties
                    .reason_string
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    async fn send(&mut self, packet: &Packet) -> Result<()> {
        if self.debug {
            eprintln!("sending {packet:?}");
        }
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).map_err(|e| anyhow!("cannot encode: {e}"))?;
        self.stream.write_all(&out).await.context("write failed")
    }

    /// The next packet, or an error at `deadline` (then the error says "timed out").
    async fn recv(&mut self, deadline: Option<Instant>) -> Result<Packet> {
        let ctx = DecodeContext {
            version: Some(self.version),
            max_packet_size: 268_435_460,
        };
        loop {
            if let Some(packet) =
                decode(&mut self.buf, &ctx).map_err(|e| anyhow!("malformed packet: {e}"))?
            {
                if self.debug {
                    eprintln!("received {packet:?}");
                }
                return Ok(packet);
            }
            let read = self.stream.read_buf(&mut self.buf);
            let n = match deadline {
                Some(at) => timeout_at(at, read)
                    .await
                    .map_err(|_| anyhow!("timed out"))?,
                None => read.await,
            }
            .context("read failed")?;
            if n == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    async fn disconnect(mut self, user_properties: Vec<(String, String)>) -> Result<()> {
        let mut disconnect = Disconnect::default();
        disconnect.properties.user_properties = user_properties;
        self.send(&Packet::Disconnect(disconnect)).await?;
        self.stream.shutdown().await.ok();
        Ok(())
    }
}

fn check_reason(what: &str, reason: ReasonCode) -> Result<()> {
    if reason.is_error() {
        bail!("{what} refused: {reason}");
    }
    Ok(())
}

/// `halyard pub`: publishes the message(s), waiting for each QoS 1/2 exchange to complete.
pub async fn publish(args: PubArgs) -> Result<()> {
    let common = &args.common;
    check_topic_name("publish topic", &args.topic)?;
    let properties = common.user_properties("publish")?;
    let will = common.will()?;
    let user_properties = properties.message;
    let payloads: Vec<Bytes> = if let Some(message) = &args.message {
        vec![Bytes::from(message.clone())]
    } else if let Some(path) = &args.file {
        vec![Bytes::from(std::fs::read(path).with_context(|| {
            format!("cannot read {}", path.display())
        })?)]
    } else if args.stdin {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .context("cannot read stdin")?;
        vec![Bytes::from(data)]
    } else if args.lines {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        text.lines().map(|l| Bytes::from(l.to_owned())).collect()
    } else if args.null {
        vec![Bytes::new()]
    } else {
        bail!("give a payload: -m MESSAGE, -f FILE, -s, -l or -n");
    };
    let deadline = common.deadline();
    let default_id = format!("halyard-pub-{}", std::process::id());
    let mut client = Client::connect(common, &default_id, false, will, properties.connect).await?;
    let qos = qos_of(common.qos);
    for _ in 0..args.count {
        for payload in &payloads {
            let packet_id = (qos != QoS::AtMostOnce).then(|| client.packet_id());
            let properties = Properties {
                user_properties: user_properties.clone(),
                ..Properties::default()
            };
            client
                .send(&Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: args.retain,
                    topic: args.topic.clone(),
                    packet_id,
                    payload: payload.clone(),
                    properties,
                }))
                .await?;
            let Some(id) = packet_id else { continue };
            loop {
                match client.recv(deadline).await? {
                    Packet::PubAck(ack) if ack.packet_id == id => {
                        check_reason("publish", ack.reason)?;
                        break;
                    }
                    Packet::PubRec(rec) if rec.packet_id == id => {
                        check_reason("publish", rec.reason)?;
                        client
                            .send(&Packet::PubRel(PubResponse {
                                packet_id: id,
                                ..PubResponse::default()
                            }))
                            .await?;
                    }
                    Packet::PubComp(comp) if comp.packet_id == id => break,
                    Packet::Disconnect(d) => {
                        bail!("disconnected by the broker: {}", d.reason)
                    }
                    _ => {}
                }
            }
        }
    }
    client.disconnect(properties.disconnect).await
}

/// `halyard sub`: prints messages until `-C` messages, `-W` seconds, Ctrl-C or the broker
/// closes. Returns the process exit status.
pub async fn subscribe(args: SubArgs) -> Result<u8> {
    let common = &args.common;
    if args.persistent && common.id.is_none() {
        // A made-up id would leave a session nobody can resume, on every run.
        bail!("you must provide a client id (-i) if you are using the -c option");
    }
    for filter in &args.topics {
        check_topic_filter(filter)?;
    }
    let user_properties = common.user_properties("subscribe")?;
    let will = common.will()?;
    let deadline = common.deadline();
    let default_id = format!("halyard-sub-{}", std::process::id());
    let mut client = Client::connect(
        common,
        &default_id,
        args.persistent,
        will,
        user_properties.connect,
    )
    .await?;
    let on_disconnect = user_properties.disconnect;
    let properties = Properties {
        user_properties: user_properties.message,
        ..Properties::default()
    };
    let subscribe = Subscribe {
        packet_id: client.packet_id(),
        subscriptions: args
            .topics
            .iter()
            .map(|filter| Subscription {
                filter: filter.clone(),
                options: SubscriptionOptions {
                    qos: qos_of(common.qos),
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
        properties,
    };
    let sub_id = subscribe.packet_id;
    client.send(&Packet::Subscribe(subscribe)).await?;
    let mut received = 0u64;
    let mut stdout = std::io::stdout();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let ping_every = Duration::from_secs(u64::from(common.keepalive.max(2)) / 2);
    let mut next_ping = Instant::now() + ping_every;
    loop {
        if args.count.is_some_and(|count| received >= count) {
            break;
        }
        let wake = match deadline {
            Some(at) => at.min(next_ping),
            None => next_ping,
        };
        let packet = tokio::select! {
            _ = &mut interrupted => break,
            packet = client.recv(Some(wake)) => packet,
        };
        let packet = match packet {
            Ok(packet) => packet,
            Err(error) if error.to_string() == "timed out" => {
                if deadline.is_some_and(|at| Instant::now() >= at) {
                    client.disconnect(on_disconnect).await.ok();
                    // As mosquitto_sub: -W always ends in "Timed out" and status 27.
                    writeln!(stdout, "Timed out").context("cannot write to stdout")?;
                    return Ok(EXIT_TIMEOUT);
                }
                if common.keepalive > 0 {
                    client.send(&Packet::PingReq).await?;
                }
                next_ping = Instant::now() + ping_every;
                continue;
            }
            Err(error) => return Err(error),
        };
        match packet {
            Packet::SubAck(ack) if ack.packet_id == sub_id => {
                for (filter, reason) in args.topics.iter().zip(&ack.reasons) {
                    if reason.0 >= 0x80 {
                        let reason = if common.version.is_v5() {
                            reason.to_string()
                        } else {
                            "0x80 Failure".to_owned()
                        };
                        bail!("subscription to {filter} refused: {reason}");
                    }
                }
            }
            Packet::Publish(publish) => {
                match (publish.qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        client
                            .send(&Packet::PubAck(PubResponse {
                                packet_id: id,
                                ..PubResponse::default()
                            }))
                            .await?
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        client
                            .send(&Packet::PubRec(PubResponse {
                                packet_id: id,
                                ..PubResponse::default()
                            }))
                            .await?
                    }
                    _ => {}
                }
                if args.no_retained && publish.retain {
                    continue;
                }
                received += 1;
                let line = format_message(&publish, args.format, args.verbose);
                writeln!(stdout, "{line}").context("cannot write to stdout")?;
                stdout.flush().ok();
            }
            Packet::PubRel(rel) => {
                client
                    .send(&Packet::PubComp(PubResponse {
                        packet_id: rel.packet_id,
                        ..PubResponse::default()
                    }))
                    .await?
            }
            Packet::Disconnect(d) => {
                bail!("disconnected by the broker: {}", d.reason)
            }
            _ => {}
        }
    }
    client.disconnect(on_disconnect).await?;
    Ok(0)
}

/// One output line for a received message.
fn format_message(publish: &Publish, format: OutputFormat, verbose: bool) -> String {
    match format {
        OutputFormat::Text if verbose => format!(
            "{} {}",
            publish.topic,
            String::from_utf8_lossy(&publish.payload)
        ),
        OutputFormat::Text => String::from_utf8_lossy(&publish.payload).into_owned(),
        OutputFormat::Json => {
            use base64::Engine as _;
            let properties: serde_json::Map<String, serde_json::Value> = publish
                .properties
                .user_properties
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            serde_json::json!({
                "topic": publish.topic,
                "qos": publish.qos as u8,
                "retain": publish.retain,
                // Text when the payload is UTF-8 (null otherwise); always base64, so binary
                // payloads survive, as in the admin API.
                "payload": std::str::from_utf8(&publish.payload).ok(),
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&publish.payload),
                "user_properties": properties,
            })
            .to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("5"), Ok(ProtocolVersion::V5));
        assert_eq!(parse_version("mqttv311"), Ok(ProtocolVersion::V3_1_1));
        assert_eq!(parse_version("31"), Ok(ProtocolVersion::V3_1));
        assert!(parse_version("4").is_err());
    }

    #[test]
    fn every_user_property_form_parses() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            pub_args: PubArgs,
        }
        let cli = Cli::try_parse_from([
            "pub",
            "-t",
            "t",
            "-m",
            "x",
            "-V",
            "5",
            "-D",
            "k",
            "v",
            "--property",
            "a=b",
            "-D",
            "connect",
            "user-property",
            "c",
            "d",
            "-D",
            "disconnect",
            "user-property",
            "e",
            "f",
        ])
        .expect("parses");
        let properties = cli
            .pub_args
            .common
            .user_properties("publish")
            .expect("valid");
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(properties.message, [pair("k", "v"), pair("a", "b")]);
        assert_eq!(properties.connect, [pair("c", "d")]);
        assert_eq!(properties.disconnect, [pair("e", "f")]);
        let cli = Cli::try_parse_from([
            "pub",
            "-t",
            "t",
            "-m",
            "x",
            "-V",
            "5",
            "-D",
            "subscribe",
            "user-property",
            "k",
            "v",
        ])
        .expect("parses");
        assert!(cli.pub_args.common.user_properties("publish").is_err());
    }

    #[test]
    fn json_output_has_topic_payload_and_properties() {
        let mut publish = Publish {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            retain: true,
            ..Publish::default()
        };
        publish.properties.user_properties = vec![("k".into(), "v".into())];
        let line = format_message(&publish, OutputFormat::Json, false);
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["topic"], "a/b");
        assert_eq!(value["payload"], "hi");
        assert_eq!(value["retain"], true);
        assert_eq!(value["user_properties"]["k"], "v");
        assert_eq!(format_message(&publish, OutputFormat::Text, true), "a/b hi");
        assert_eq!(format_message(&publish, OutputFormat::Text, false), "hi");
    }
}
