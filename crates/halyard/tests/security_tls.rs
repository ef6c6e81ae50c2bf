//! TLS, mutual TLS (certificate identity as user name) and WebSocket listeners, end to end:
//! certificates made with rcgen in the test, a rustls client carrying raw MQTT, and a
//! tokio-tungstenite client for `ws` / `wss`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A test PKI: one CA, a server certificate for localhost / 127.0.0.1 and a client
/// certificate with CN `device-7`, all as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = unique_temp_path("pki", "d");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Halyard test CA");
        let ca = params.self_signed(&ca_key).expect("CA cert");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
        let pki = Pki { dir, ca, ca_key };
        pki.issue("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        pki.issue("client", "device-7", ExtendedKeyUsagePurpose::ClientAuth);
        pki
    }

    /// Writes `<name>.pem` and `<name>.key`, signed by the CA.
    fn issue(&self, name: &str, cn: &str, usage: ExtendedKeyUsagePurpose) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    }

    /// Writes `<name>.pem` and `<name>.key` for a server named only `dns`.
    fn issue_server_for(&self, name: &str, dns: &str) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, dns);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn toml(&self, name: &str) -> String {
        format!("{:?}", self.path(name).display().to_string())
    }

    /// A rustls client trusting the CA, with the client certificate if `with_cert`.
    fn connector(&self, with_cert: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("ca.pem")).expect("CA pem"))
            .expect("add CA");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let config = if with_cert {
            let chain = vec![CertificateDer::from_pem_file(self.path("client.pem")).expect("pem")];
            let key = PrivateKeyDer::from_pem_file(self.path("client.key")).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        } else {
            builder.with_no_client_auth()
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Raw MQTT over any byte stream (here: TLS).
struct StreamClient<S> {
    stream: S,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamClient<S> {
    async fn send(&mut self, packet: &Packet) {
        let bytes = encode_packet(packet, self.version);
        self.stream.write_all(&bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(packet) =
                    decode_packet(&mut self.buf, Some(self.version)).expect("decode")
                {
                    return Some(packet);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a packet or EOF in time")
    }

    async fn connect(&mut self, id: &str, user: Option<&str>) -> ReasonCode {
        let mut connect = connect_packet(self.version, id, true);
        connect.username = user.map(str::to_owned);
        self.send(&Packet::Connect(Box::new(connect))).await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str) -> ReasonCode {
        self.send(&Packet::Subscribe(subscribe_packet(
            1,
            &[(filter, QoS::AtMostOnce)],
        )))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => ack.reasons[0],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

async fn tls_client(
    pki: &Pki,
    addr: SocketAddr,
    with_cert: bool,
    version: ProtocolVersion,
) -> std::io::Result<StreamClient<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let stream = pki.connector(with_cert).connect(name, tcp).await?;
    Ok(StreamClient {
        stream,
        buf: BytesMut::new(),
        version,
    })
}

#[tokio::test]
async fn tls_listener_carries_mqtt_and_interoperates_with_tcp() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(&format!(
        "[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n",
        pki.toml("server.pem"),
        pki.toml("server.key")
    ));
    let addr = broker.listener_addr("tls");
    let mut tls = tls_client(&pki, addr, false, V5)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.connect("tls-sub", None).await, ReasonCode::SUCCESS);
    assert_eq!(tls.subscribe("t/#").await, ReasonCode::GRANTED_QOS_0);
    // Published over plain TCP, received over TLS.
    let mut tcp = RawClient::connect_v311(broker.addr(), "tcp-pub", true).await;
    tcp.publish(publish0("t/1", b"over tls")).await;
    match tls.recv().await {
        Some(Packet::Publish(publish)) => {
            assert_eq!(publish.topic, "t/1");
            assert_eq!(&publish.payload[..], b"over tls");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // Plain MQTT bytes on the TLS port are not accepted as MQTT.
    let mut plain = RawClient::connect(addr).await;
    plain
        .send(&Packet::Connect(Box::new(connect_packet(V3, "x", true))))
        .await;
    assert!(plain
        .try_recv(std::time::Duration::from_secs(3))
        .await
        .is_err());
}

#[tokio::test]
async fn mutual_tls_uses_the_certificate_identity_as_user_name() {
    let pki = Pki::new();
    let acl = pki.path("acl.txt");
    std::fs::write(&acl, "user device-7\ntopic readwrite devices/device-7/#\n").expect("acl");
    let passwords = pki.path("passwd.txt");
    std::fs::write(&passwords, "").expect("passwd");
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {}\nacl_file = {}\n\n[[listener]]\nkind = \"tls\"\naddress = \
         \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\nclient_ca_file = {}\n\
         use_identity_as_username = true\n",
        pki.toml("passwd.txt"),
        pki.toml("acl.txt"),
        pki.toml("server.pem"),
        pki.toml("server.key"),
        pki.toml("ca.pem"),
    ));
    let addr = broker.listener_addr("tls");
    // The certificate authenticates: no password, and the CONNECT user name is replaced.
    let mut client = tls_client(&pki, addr, true, V5)
        .await
        .expect("mTLS handshake");
    assert_eq!(
        client.connect("m1", Some("someone-else")).await,
        ReasonCode::SUCCESS
    );
    assert_eq!(
        client.subscribe("devices/device-7/#").await,
        ReasonCode::GRANTED_QOS_0,
        "the ACL section of the certificate's CN applies"
    );
    assert_eq!(
        client.subscribe("devices/device-8/#").await,
        ReasonCode::NOT_AUTHORIZED
    );

    // Without a client certificate the handshake fails (or the first read does: TLS 1.3
    // reports the server's refusal after the client finished).
    let refused = match tls_client(&pki, addr, false, V3).await {
        Err(_) => true,
        Ok(mut client) => {
            let connect = connect_packet(V3, "nocert", true);
            let _ = client
                .stream
                .write_all(&encode_packet(&Packet::Connect(Box::new(connect)), V3))
                .await;
            client.recv().await.is_none()
        }
    };
    assert!(refused, "a client without a certificate must not get in");
    // On the plain TCP listener the same broker still wants a password.
    let (_, ack) = RawClient::handshake(broker.addr(), connect_packet(V5, "plain", true)).await;
    assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED);
}

/// Raw MQTT over a WebSocket (binary messages).
struct WsClient<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    async fn send(&mut self, packet: &Packet) {
        let bytes = encode_packet(packet, self.version).freeze();
        self.ws.send(Message::Binary(bytes)).await.expect("ws send");
    }

    async fn recv(&mut self) -> Packet {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(packet) =
                    decode_packet(&mut self.buf, Some(self.version)).expect("decode")
                {
                    return packet;
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(data))) => self.buf.extend_from_slice(&data),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("expected a binary message, got {other:?}"),
                }
            }
        })
        .await
        .expect("a packet in time")
    }
}

async fn ws_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    url: &str,
    version: ProtocolVersion,
) -> Result<WsClient<S>, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().expect("header"));
    let (ws, response) = tokio_tungstenite::client_async(request, stream).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt"),
        "[MQTT-6.0.0-4]: the server selects the mqtt subprotocol"
    );
    Ok(WsClient {
        ws,
        buf: BytesMut::new(),
        version,
    })
}

#[tokio::test]
async fn websocket_publish_subscribe_and_wrong_path() {
    let broker = Broker::start_with_config(
        "[[listener]]\nkind = \"ws\"\naddress = \"127.0.0.1:0\"\n\n[[listener]]\nkind = \
         \"ws\"\naddress = \"127.0.0.1:0\"\npath = \"/custom\"\n",
    );
    let addr = broker.listener_addr("ws");
    let url = format!("ws://{addr}/mqtt");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut sub = ws_over(tcp, &url, V5).await.expect("upgrade");
    sub.send(&Packet::Connect(Box::new(connect_packet(
        V5, "ws-sub", true,
    ))))
    .await;
    assert!(matches!(sub.recv().await, Packet::ConnAck(ack) if ack.code == ReasonCode::SUCCESS));
    sub.send(&Packet::Subscribe(subscribe_packet(
        1,
        &[("w/#", QoS::AtLeastOnce)],
    )))
    .await;
    assert!(matches!(sub.recv().await, Packet::SubAck(_)));

    // A second WebSocket client publishes; packets split across messages are reassembled.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut publisher = ws_over(tcp, &url, V3).await.expect("upgrade");
    let mut bytes = encode_packet(
        &Packet::Connect(Box::new(connect_packet(V3, "ws-pub", true))),
        V3,
    );
    bytes.extend_from_slice(&encode_packet(
        &Packet::Publish(publish0("w/1", b"hello ws")),
        V3,
    ));
    let (first, second) = bytes.split_at(5);
    for part in [first, second] {
        publisher
            .ws
            .send(Message::Binary(Bytes::copy_from_slice(part)))
            .await
            .expect("send");
    }
    assert!(matches!(publisher.recv().await, Packet::ConnAck(_)));
    match sub.recv().await {
        Packet::Publish(publish) => {
            assert_eq!(publish.topic, "w/1");
            assert_eq!(&publish.payload[..], b"hello ws");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // Anything but the configured path is refused at the HTTP level.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    assert!(ws_over(tcp, &format!("ws://{addr}/elsewhere"), V5)
        .await
        .is_err());
}

#[tokio::test]
async fn websocket_over_tls() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(&format!(
        "[[listener]]\nkind = \"wss\"\naddress = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n",
        pki.toml("server.pem"),
        pki.toml("server.key")
    ));
    let addr = broker.listener_addr("wss");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = pki.connector(false).connect(name, tcp).await.expect("TLS");
    let mut client = ws_over(tls, &format!("wss://localhost:{}/mqtt", addr.port()), V5)
        .await
        .expect("upgrade");
    client
        .send(&Packet::Connect(Box::new(connect_packet(V5, "wss", true))))
        .await;
    assert!(matches!(client.recv().await, Packet::ConnAck(ack) if ack.code == ReasonCode::SUCCESS));
    client.send(&Packet::PingReq).await;
    assert_eq!(client.recv().await, Packet::PingResp);
}

#[test]
fn tls_listener_without_key_is_a_config_error() {
    let config = write_temp_config(
        "[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\ncert_file = \"c.pem\"\n",
    );
    let (status, _, stderr) = run_halyard(&["check-config", config.to_str().expect("utf-8")]);
    assert!(!status.success());
    assert!(stderr.contains("key_file"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// The server certificate a TLS client saw.
fn peer_certificate(client: &StreamClient<tokio_rustls::client::TlsStream<TcpStream>>) -> Vec<u8> {
    client
        .stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .expect("a server certificate")
}

fn certificate_in(path: &std::path::Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).expect("pem").to_vec()
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_handshakes_and_keeps_old_connections() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(&format!(
        "[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n",
        pki.toml("server.pem"),
        pki.toml("server.key")
    ));
    let addr = broker.listener_addr("tls");
    let cert_a = certificate_in(&pki.path("server.pem"));
    let mut old = tls_client(&pki, addr, false, V5).await.expect("TLS A");
    assert_eq!(peer_certificate(&old), cert_a);
    assert_eq!(old.connect("old", None).await, ReasonCode::SUCCESS);

    // Certificate B replaces A's files (same name, a new key), then SIGHUP.
    pki.issue("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let cert_b = certificate_in(&pki.path("server.pem"));
    assert_ne!(cert_a, cert_b);
    broker.sighup();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut fresh = loop {
        let client = tls_client(&pki, addr, false, V5).await.expect("TLS");
        if peer_certificate(&client) == cert_b {
            break client;
        }
        assert_eq!(
            peer_certificate(&client),
            cert_a,
            "only A or B is ever served"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "B never served:\n{}",
            broker.logs()
        );
        sleep_ms(20).await;
    };
    assert_eq!(fresh.connect("fresh", None).await, ReasonCode::SUCCESS);

    // The connection made under A is still up and carries traffic.
    old.send(&Packet::PingReq).await;
    assert_eq!(old.recv().await, Some(Packet::PingResp));
    assert_eq!(fresh.subscribe("reload/#").await, ReasonCode::GRANTED_QOS_0);
    old.send(&Packet::Publish(publish0("reload/x", b"after")))
        .await;
    match fresh.recv().await {
        Some(Packet::Publish(publish)) => assert_eq!(&publish.payload[..], b"after"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn path_arg(pki: &Pki, name: &str) -> String {
    pki.path(name).display().to_string()
}

#[tokio::test]
async fn halyard_pub_and_sub_speak_tls_with_mosquitto_flags() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(&format!(
        "[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n\
         client_ca_file = {}\n",
        pki.toml("server.pem"),
        pki.toml("server.key"),
        pki.toml("ca.pem"),
    ));
    let port = broker.listener_addr("tls").port().to_string();
    let (ca, cert, key) = (
        path_arg(&pki, "ca.pem"),
        path_arg(&pki, "client.pem"),
        path_arg(&pki, "client.key"),
    );
    let tls = ["--cafile", &ca, "--cert", &cert, "--key", &key];
    let mut sub = RawClient::connect_v311(broker.addr(), "watch", true).await;
    sub.subscribe(1, &[("cli/tls", QoS::AtMostOnce)]).await;
    let mut args = vec![
        "pub",
        "-h",
        "localhost",
        "-p",
        &port,
        "-t",
        "cli/tls",
        "-m",
        "hi",
        "-r",
    ];
    args.extend(tls);
    let (status, _, stderr) = run_halyard(&args);
    assert!(status.success(), "{stderr}");
    assert_eq!(&sub.recv_publish().await.payload[..], b"hi");

    let mut args = vec![
        "sub",
        "-h",
        "localhost",
        "-p",
        &port,
        "-t",
        "cli/tls",
        "-C",
        "1",
        "-W",
        "10",
    ];
    args.extend(tls);
    let (status, stdout, stderr) = run_halyard(&args);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "hi");

    // Without the client certificate the mutual-TLS listener refuses the handshake.
    let (status, _, _) = run_halyard(&[
        "pub",
        "-h",
        "localhost",
        "-p",
        &port,
        "--cafile",
        &ca,
        "-t",
        "cli/tls",
        "-m",
        "x",
    ]);
    assert!(!status.success());
}

#[tokio::test]
async fn insecure_skips_only_the_host_name_check() {
    let pki = Pki::new();
    pki.issue_server_for("elsewhere", "broker.elsewhere.example");
    let broker = Broker::start_with_config(&format!(
        "[[listener]]\nkind = \"tls\"\naddress = \"127.0.0.1:0\"\ncert_file = {}\nkey_file = {}\n",
        pki.toml("elsewhere.pem"),
        pki.toml("elsewhere.key"),
    ));
    let port = broker.listener_addr("tls").port().to_string();
    let ca = path_arg(&pki, "ca.pem");
    let publish = |extra: &[&str]| {
        let mut args = vec!["pub", "-h", "127.0.0.1", "-p", &port, "-t", "x", "-m", "y"];
        args.extend(extra);
        run_halyard(&args)
    };
    let (status, _, stderr) = publish(&["--cafile", &ca]);
    assert!(!status.success(), "the name does not match: must fail");
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    let (status, _, stderr) = publish(&["--cafile", &ca, "--insecure"]);
    assert!(status.success(), "{stderr}");
    // --insecure still verifies the chain: a CA that did not sign the certificate fails.
    let other = Pki::new();
    let other_ca = path_arg(&other, "ca.pem");
    let (status, _, _) = publish(&["--cafile", &other_ca, "--insecure"]);
    assert!(!status.success());
}
