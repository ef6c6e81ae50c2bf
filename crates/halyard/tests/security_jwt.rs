//! JWT as the CONNECT password (`[auth.jwt]`), end to end: tokens made here (HS256 with a
//! secret, RS256 with the fixture key pair), the real binary, raw packets. Each refusal's
//! CONNACK code and its `halyard_auth_refused_total` reason are checked.

mod common;

use std::path::PathBuf;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const SECRET: &str = "a test secret of at least 32 bytes, for HS256";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../halyard-server/tests/fixtures")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn broker_with(jwt_table: &str) -> Broker {
    Broker::start_with_config(&format!("[auth.jwt]\n{jwt_table}\n"))
}

fn hs256_broker(extra: &str) -> Broker {
    let secret = unique_temp_path("jwt", "secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write");
    broker_with(&format!(
        "key_file = {:?}\n{extra}",
        secret.display().to_string()
    ))
}

async fn connect_with(
    broker: &Broker,
    version: ProtocolVersion,
    user: Option<&str>,
    token: &str,
) -> (RawClient, ReasonCode) {
    let mut connect = connect_packet(version, "jwt-client", true);
    connect.username = user.map(str::to_owned);
    connect.password = Some(Bytes::copy_from_slice(token.as_bytes()));
    let (client, ack) = RawClient::handshake(broker.addr(), connect).await;
    (client, ack.code)
}

fn refused(broker: &Broker, reason: &str) -> f64 {
    metric(
        broker,
        &format!("halyard_auth_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn hs256_tokens_admit_and_bad_ones_are_refused_with_reasons() {
    let broker = hs256_broker("audience = \"halyard\"\n");
    let good = json!({"sub": "dev-1", "exp": now() + 600, "aud": "halyard"});
    // MQTT 5 may send a password alone; 3.1.1 needs the user name too [MQTT-3.1.2-22].
    let (client, code) = connect_with(&broker, V5, None, &hs256(&good)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    let (client, code) = connect_with(&broker, V3, Some("dev-1"), &hs256(&good)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;

    let with = |key: &str, value: Value| {
        let mut claims = good.clone();
        claims[key] = value;
        hs256(&claims)
    };
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    let cases = [
        (with("exp", json!(now() - 600)), "jwt_expired"),
        (with("nbf", json!(now() + 600)), "jwt_not_yet_valid"),
        (with("aud", json!("someone-else")), "jwt_audience"),
        (unsigned, "jwt_alg_none"),
    ];
    for (token, reason) in cases {
        let (_, code) = connect_with(&broker, V5, None, &token).await;
        assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD, "{reason}");
        let (_, code) = connect_with(&broker, V3, Some("dev-1"), &token).await;
        assert_eq!(code, ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD, "{reason}");
        assert_eq!(refused(&broker, reason), 2.0, "{reason}");
    }
    // A user name that is not the token's subject.
    let (_, code) = connect_with(&broker, V5, Some("dev-2"), &hs256(&good)).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(refused(&broker, "jwt_username_mismatch"), 1.0);
}

#[tokio::test]
async fn rs256_tokens_verify_with_the_public_key_and_alg_confusion_fails() {
    let public = fixture("jwt_rs256_public.pem");
    let broker = broker_with(&format!("key_file = {:?}\n", public.display().to_string()));
    let private = std::fs::read(fixture("jwt_rs256_private.pem")).expect("read key");
    let claims = json!({"sub": "dev-rsa", "exp": now() + 600});
    let token = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&private).expect("private key"),
    )
    .expect("encode");
    let (client, code) = connect_with(&broker, V5, None, &token).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    // HS256 "signed" with the public key as the secret: the classic confusion attack.
    let public_bytes = std::fs::read(&public).expect("read");
    let forged = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(&public_bytes),
    )
    .expect("encode");
    let (_, code) = connect_with(&broker, V5, None, &forged).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    assert_eq!(refused(&broker, "jwt_algorithm"), 1.0);
}

#[tokio::test]
async fn the_acl_claim_is_the_clients_acl() {
    let broker = hs256_broker("");
    let claims = json!({
        "sub": "dev-7",
        "exp": now() + 600,
        "acl": {"pub": ["dev/7/#"], "sub": ["cmd/7/#"]},
    });
    let (mut client, code) = connect_with(&broker, V5, None, &hs256(&claims)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        client
            .subscribe(1, &[("cmd/7/#", QoS::AtLeastOnce), ("#", QoS::AtLeastOnce)])
            .await,
        [ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]
    );
    let allowed = client
        .publish(publish_packet(
            "dev/7/temp",
            b"21",
            QoS::AtLeastOnce,
            false,
            Some(2),
        ))
        .await;
    assert_eq!(allowed, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    let denied = client
        .publish(publish_packet(
            "dev/8/temp",
            b"21",
            QoS::AtLeastOnce,
            false,
            Some(3),
        ))
        .await;
    assert_eq!(denied, ReasonCode::NOT_AUTHORIZED);

    // The token ACL is kept by client id: a token with one needs a client id.
    let mut connect = connect_packet(V5, "", true);
    connect.password = Some(Bytes::from(hs256(&claims)));
    let (_, ack) = RawClient::handshake(broker.addr(), connect).await;
    assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED);
    assert_eq!(refused(&broker, "jwt_acl_without_client_id"), 1.0);
}

#[tokio::test]
async fn a_token_expiring_while_connected_gets_disconnect_0xa0() {
    let broker = hs256_broker("disconnect_on_expiry = true\nleeway_secs = 0\n");
    let claims = json!({"sub": "dev-9", "exp": now() + 2});
    let (mut client, code) = connect_with(&broker, V5, None, &hs256(&claims)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client
        .expect_disconnect(ReasonCode::MAXIMUM_CONNECT_TIME)
        .await;
    assert_eq!(refused(&broker, "jwt_expired_connected"), 1.0);
    // A client whose token does not expire soon stays.
    let claims = json!({"sub": "dev-10", "exp": now() + 600});
    let (mut client, code) = connect_with(&broker, V5, None, &hs256(&claims)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.expect_nothing(300).await;
}

#[tokio::test]
async fn halyard_pub_takes_a_token_as_its_password() {
    let broker = hs256_broker("");
    let port = broker.port().to_string();
    let token = hs256(&json!({"sub": "cli", "exp": now() + 600}));
    let (status, _, stderr) = run_halyard(&[
        "pub", "-p", &port, "-u", "cli", "-P", &token, "-t", "cli/jwt", "-m", "x",
    ]);
    assert!(status.success(), "{stderr}");
    let expired = hs256(&json!({"sub": "cli", "exp": now() - 600}));
    let (status, _, stderr) = run_halyard(&[
        "pub", "-p", &port, "-u", "cli", "-P", &expired, "-t", "cli/jwt", "-m", "x",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("0x04"), "{stderr}");
}
