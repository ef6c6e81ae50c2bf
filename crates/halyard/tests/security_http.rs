//! The HTTP authentication and ACL hook (`[auth.http]`) and the source chain, end to end:
//! the real binary against a small HTTP service this test runs on 127.0.0.1 (allow, deny,
//! a timeout, cached ACL answers), raw MQTT packets.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const V5: ProtocolVersion = ProtocolVersion::V5;

/// The requests the service received: (path, JSON body).
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// A tiny HTTP/1.1 service: `/auth` allows user `good`,
/// denies the rest and never answers `slow`; `/acl` allows topics under `ok/`.
async fn start_service() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Some((path, body)) = read_request(&mut socket).await else {
                    return;
                };
                log.lock().expect("lock").push((path.clone(), body.clone()));
                let allow = match path.as_str() {
                    "/auth" => match body["username"].as_str() {
                        Some("slow") => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            false
                        }
                        Some(name) => name == "good",
                        None => false,
                    },
                    "/acl" => body["topic"].as_str().is_some_and(|t| t.starts_with("ok/")),
                    _ => false,
                };
                let reply = if allow {
                    r#"{"result": "allow"}"#
                } else {
                    r#"{"result": "deny"}"#
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

/// Reads one request: its path and JSON body.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, Value)> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&data).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() < length {
            continue;
        }
        let path = head.split(' ').nth(1)?.to_owned();
        return Some((path, serde_json::from_str(&body[..length]).ok()?));
    }
}

fn http_broker(service: SocketAddr, extra: &str) -> Broker {
    Broker::start_with_config(&format!(
        "[auth.http]\nurl = \"http://{service}/auth\"\nacl_url = \"http://{service}/acl\"\n\
         timeout_ms = 300\n{extra}"
    ))
}

async fn connect_as(broker: &Broker, user: &str, password: &str) -> (RawClient, ReasonCode) {
    let mut connect = connect_packet(V5, &format!("http-{user}"), true);
    connect.username = Some(user.to_owned());
    connect.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    let (client, ack) = RawClient::handshake(broker.addr(), connect).await;
    (client, ack.code)
}

fn refused(broker: &Broker, reason: &str) -> f64 {
    metric(
        broker,
        &format!("halyard_auth_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn count(seen: &Seen, path: &str, key: &str, value: &str) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|(p, body)| p == path && body[key].as_str() == Some(value))
        .count()
}

#[tokio::test]
async fn the_hook_allows_denies_and_a_timeout_answers_the_default() {
    let (service, seen) = start_service().await;
    let broker = http_broker(service, "");
    let (client, code) = connect_as(&broker, "good", "pw").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    let auth_request = seen.lock().expect("lock")[0].1.clone();
    assert_eq!(auth_request["client_id"], "http-good");
    assert_eq!(auth_request["password"], "pw");
    assert_eq!(auth_request["protocol"], 5);
    assert!(auth_request["peer_address"]
        .as_str()
        .is_some_and(|peer| peer.starts_with("127.0.0.1:")));

    let (_, code) = connect_as(&broker, "bad", "pw").await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(refused(&broker, "http_denied"), 1.0);
    // No answer within timeout_ms: the default, deny.
    let (_, code) = connect_as(&broker, "slow", "pw").await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(refused(&broker, "http_unavailable"), 1.0);

    // The default can be allow.
    let lenient = http_broker(service, "default_allow = true\n");
    let (client, code) = connect_as(&lenient, "slow", "pw").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
}

#[tokio::test]
async fn acl_answers_are_asked_once_and_cached() {
    let (service, seen) = start_service().await;
    let broker = http_broker(service, "cache_ttl_ms = 60000\n");
    let (mut client, code) = connect_as(&broker, "good", "pw").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        client
            .subscribe(
                1,
                &[("ok/#", QoS::AtLeastOnce), ("secret/#", QoS::AtLeastOnce)]
            )
            .await,
        [ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]
    );
    for id in 2..5 {
        let reason = client
            .publish(publish_packet(
                "ok/a",
                b"x",
                QoS::AtLeastOnce,
                false,
                Some(id),
            ))
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
    }
    let reason = client
        .publish(publish_packet(
            "secret/a",
            b"x",
            QoS::AtLeastOnce,
            false,
            Some(9),
        ))
        .await;
    assert_eq!(reason, ReasonCode::NOT_AUTHORIZED);
    // Three publishes to ok/a, one question.
    assert_eq!(count(&seen, "/acl", "topic", "ok/a"), 1);
    let acl = seen
        .lock()
        .expect("lock")
        .iter()
        .find(|(path, _)| path == "/acl")
        .map(|(_, body)| body.clone())
        .expect("an ACL request");
    assert_eq!(acl["client_id"], "http-good");
    assert_eq!(acl["username"], "good");
    assert_eq!(acl["action"], "subscribe");
    assert_eq!(
        metric(
            &broker,
            "halyard_requests_refused_total{reason=\"publish_not_authorized\"}"
        ),
        1.0
    );
}

fn mosquitto_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../halyard-server/tests/fixtures/mosquitto_passwd.txt")
}

#[tokio::test]
async fn the_first_source_that_knows_the_user_decides_in_the_configured_order() {
    let (service, seen) = start_service().await;
    let file = format!("{:?}", mosquitto_fixture().display().to_string());
    // Default order: the file knows alice and decides; the hook is asked only about users
    // the file does not list.
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {file}\n[auth.http]\nurl = \"http://{service}/auth\"\n"
    ));
    let (client, code) = connect_as(&broker, "alice", "alicepw").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    let (_, code) = connect_as(&broker, "alice", "wrong").await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(count(&seen, "/auth", "username", "alice"), 0);
    let (client, code) = connect_as(&broker, "good", "anything").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;

    // HTTP first: it knows everyone, so it decides about alice too (and says no).
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {file}\nchain = [\"http\", \"file\"]\n\
         [auth.http]\nurl = \"http://{service}/auth\"\n"
    ));
    let (_, code) = connect_as(&broker, "alice", "alicepw").await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(count(&seen, "/auth", "username", "alice"), 1);
}
