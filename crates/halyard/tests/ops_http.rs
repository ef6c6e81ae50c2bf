//! Operations HTTP listener (issue 5): `/metrics` moves with real traffic, probes answer,
//! the admin API lists, inspects, kicks and publishes, the bearer token is enforced, and a
//! non-loopback listener without a token is refused.

mod common;

use std::net::SocketAddr;

use common::*;
use halyard_codec::{QoS, ReasonCode};
use serde_json::Value;

/// GET `path` and parse the JSON body, expecting 200.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let before = metrics(broker.http_addr());
    assert_eq!(sample(&before, "halyard_connections"), 0.0);
    assert_eq!(
        sample(&before, "halyard_messages_received_total{qos=\"1\"}"),
        0.0
    );

    let mut sub = RawClient::connect_v311(broker.addr(), "m-sub", true).await;
    sub.subscribe(1, &[("m/#", QoS::AtLeastOnce)]).await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "m-pub", true).await;
    for id in 1..=5u16 {
        let reason = publisher
            .publish(publish_packet(
                "m/t",
                b"hello",
                QoS::AtLeastOnce,
                false,
                Some(id),
            ))
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        sub.recv_publish_ack().await;
    }
    publisher.publish(publish0("m/t", b"zero")).await;
    sub.recv_publish().await;
    publisher
        .publish(publish_packet("m/r", b"kept", QoS::AtMostOnce, true, None))
        .await;
    sub.recv_publish().await;
    sub.ping().await;

    let after = metrics(broker.http_addr());
    assert_eq!(sample(&after, "halyard_connections"), 2.0);
    assert_eq!(sample(&after, "halyard_sessions"), 2.0);
    assert_eq!(sample(&after, "halyard_subscriptions"), 1.0);
    assert_eq!(sample(&after, "halyard_retained_messages"), 1.0);
    assert_eq!(
        sample(&after, "halyard_messages_received_total{qos=\"1\"}"),
        5.0
    );
    assert_eq!(
        sample(&after, "halyard_messages_received_total{qos=\"0\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "halyard_messages_sent_total{qos=\"1\"}"),
        5.0
    );
    assert_eq!(
        sample(&after, "halyard_messages_sent_total{qos=\"0\"}"),
        2.0
    );
    assert_eq!(sample(&after, "halyard_connections_accepted_total"), 2.0);
    assert!(sample(&after, "halyard_bytes_received_total") > 5.0 * 12.0);
    assert!(sample(&after, "halyard_bytes_sent_total") > 5.0 * 12.0);
    assert!(sample(&after, "halyard_publish_latency_seconds_count") >= 1.0);
    assert_eq!(sample(&after, "halyard_queued_messages"), 0.0);
    assert_eq!(sample(&after, "halyard_inflight_messages"), 0.0);
    assert_eq!(
        sample(
            &after,
            "halyard_requests_refused_total{reason=\"quota_exceeded\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn probes_and_status_page() {
    let broker = Broker::start();
    let addr = broker.http_addr();
    assert_eq!(http(addr, "GET", "/livez", None, None).0, 200);
    let (status, body) = http(addr, "GET", "/readyz", None, None);
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, page) = http(addr, "GET", "/", None, None);
    assert_eq!(status, 200);
    assert!(page.contains("<canvas"), "{page}");
    assert!(page.contains("/api/v1/clients"), "the page polls the API");
    assert_eq!(http(addr, "GET", "/nope", None, None).0, 404);
}

#[tokio::test]
async fn admin_api_lists_inspects_publishes_and_kicks() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let addr = broker.http_addr();
    let mut v5 = RawClient::connect_v5(broker.addr(), "admin-v5", true).await;
    v5.subscribe(
        1,
        &[("cmd/#", QoS::AtLeastOnce), ("other", QoS::AtMostOnce)],
    )
    .await;
    let _v3 = RawClient::connect_v311(broker.addr(), "admin-v3", true).await;

    let list = get_json(addr, "/api/v1/clients?offset=0&limit=1");
    assert_eq!(list["total"], 2);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["items"][0]["client_id"], "admin-v3");
    let second = get_json(addr, "/api/v1/clients?offset=1&limit=1");
    assert_eq!(second["items"][0]["client_id"], "admin-v5");

    let detail = get_json(addr, "/api/v1/clients/admin-v5");
    assert_eq!(detail["connected"], true);
    assert_eq!(detail["protocol"], "5.0");
    assert_eq!(detail["subscriptions"], 2);
    assert_eq!(detail["subscription_list"][0]["filter"], "cmd/#");
    assert_eq!(detail["subscription_list"][0]["qos"], 1);
    assert_eq!(detail["queued"], 0);
    assert_eq!(detail["inflight"], 0);
    assert_eq!(
        http(addr, "GET", "/api/v1/clients/nobody", None, None).0,
        404
    );

    // Publish through the API: the subscriber gets it, and it is retained.
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/publish",
        None,
        Some(r#"{"topic":"cmd/go","payload":"now","qos":1,"retain":true}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"delivered\":true"), "{body}");
    let got = v5.recv_publish_ack().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("cmd/go", &b"now"[..])
    );
    let retained = get_json(addr, "/api/v1/retained?filter=cmd/%23");
    assert_eq!(retained["total"], 1);
    assert_eq!(retained["items"][0]["topic"], "cmd/go");
    assert_eq!(retained["items"][0]["payload"], "now");
    let (status, _) = http(
        addr,
        "POST",
        "/api/v1/publish",
        None,
        Some(r#"{"topic":"bad/#","payload":"x"}"#),
    );
    assert_eq!(status, 400, "wildcards are not topic names");

    let info = get_json(addr, "/api/v1/broker");
    assert_eq!(info["name"], "halyard");
    assert_eq!(info["connected_clients"], 2);
    assert_eq!(info["retained_messages"], 1);
    let config = get_json(addr, "/api/v1/config");
    assert_eq!(config["sys_interval"], 0);

    // Kick: MQTT 5 clients are told 0x98 Administrative action, then closed.
    let (status, body) = http(addr, "DELETE", "/api/v1/clients/admin-v5", None, None);
    assert_eq!(status, 200, "{body}");
    v5.expect_disconnect(ReasonCode::ADMINISTRATIVE_ACTION)
        .await;
    assert_eq!(
        http(addr, "DELETE", "/api/v1/clients/admin-v5", None, None).0,
        404
    );
    let list = get_json(addr, "/api/v1/clients");
    assert_eq!(list["total"], 1, "a clean session ends with its connection");
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let broker = Broker::start_with_config("[http]\ntoken = \"t0ken\"\n");
    let addr = broker.http_addr();
    assert_eq!(http(addr, "GET", "/api/v1/clients", None, None).0, 401);
    assert_eq!(
        http(addr, "GET", "/api/v1/clients", Some("wrong"), None).0,
        401
    );
    assert_eq!(
        http(
            addr,
            "POST",
            "/api/v1/publish",
            None,
            Some(r#"{"topic":"a"}"#)
        )
        .0,
        401
    );
    assert_eq!(http(addr, "DELETE", "/api/v1/clients/x", None, None).0, 401);
    assert_eq!(
        http(addr, "GET", "/api/v1/clients", Some("t0ken"), None).0,
        200
    );
    let (status, config) = http(addr, "GET", "/api/v1/config", Some("t0ken"), None);
    assert_eq!(status, 200);
    assert!(!config.contains("t0ken"), "the token is redacted: {config}");
    assert!(config.contains("<redacted>"), "{config}");
    // Probes and metrics stay open for kubelets and Prometheus.
    assert_eq!(http(addr, "GET", "/metrics", None, None).0, 200);
    assert_eq!(http(addr, "GET", "/readyz", None, None).0, 200);
}

#[tokio::test]
async fn non_loopback_http_without_token_is_refused() {
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "0.0.0.0:0",
        "--data-dir",
        unique_temp_path("data", "d").to_str().expect("utf-8"),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("http.token"), "{stderr}");

    let path = write_temp_config("sys_interval = 5\n\n[http]\nlisten = \"0.0.0.0:8080\"\n");
    let (status, _, stderr) = run_halyard(&["check-config", path.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&path);
    assert!(!status.success());
    assert!(stderr.contains("http.listen"), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
}

#[tokio::test]
async fn v3_client_kick_just_closes() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut v3 = RawClient::connect_v311(broker.addr(), "k3", true).await;
    let (status, _) = http(
        broker.http_addr(),
        "DELETE",
        "/api/v1/clients/k3",
        None,
        None,
    );
    assert_eq!(status, 200);
    v3.expect_closed().await;
}

/// DELETE of a client that is offline ends its persistent session (there was no other way
/// to purge one): the session, its subscription and its queue are gone, and a reconnect
/// finds no session [MQTT-3.2.2-2 session present = 0].
#[tokio::test]
async fn delete_ends_an_offline_persistent_session() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let addr = broker.http_addr();
    let mut c = RawClient::connect_v311(broker.addr(), "offline", false).await;
    c.subscribe(1, &[("queued", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "pub", true).await;
    publisher
        .publish(publish_packet(
            "queued",
            b"m",
            QoS::AtLeastOnce,
            false,
            Some(1),
        ))
        .await;
    assert_eq!(get_json(addr, "/api/v1/clients/offline")["queued"], 1);

    let (status, body) = http(addr, "DELETE", "/api/v1/clients/offline", None, None);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["session_ended"], true);
    assert_eq!(body["disconnected"], false);
    assert_eq!(
        http(addr, "GET", "/api/v1/clients/offline", None, None).0,
        404
    );
    assert_eq!(
        http(addr, "DELETE", "/api/v1/clients/offline", None, None).0,
        404
    );
    let (_, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(halyard_codec::ProtocolVersion::V3_1_1, "offline", false),
    )
    .await;
    assert!(!ack.session_present, "the session was purged");
}

/// The retained count is what users stored: `$SYS/broker/...` topics (retained too) are left
/// out of `$SYS/broker/retained messages/count`, `halyard_retained_messages` and the
/// `/api/v1/broker` figure the status page shows.
#[tokio::test]
async fn retained_count_leaves_out_sys_topics() {
    let broker = Broker::start_with_config("sys_interval = 1\n");
    let mut c = RawClient::connect_v311(broker.addr(), "retainer", true).await;
    for topic in ["r/1", "r/2", "r/3"] {
        c.publish(publish_packet(topic, b"v", QoS::AtLeastOnce, true, Some(1)))
            .await;
    }
    c.subscribe(
        1,
        &[("$SYS/broker/retained messages/count", QoS::AtMostOnce)],
    )
    .await;
    // The first live publication after the three retains says 3.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let p = c.recv_publish().await;
        if !p.retain && &p.payload[..] == b"3" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "count stayed at {:?}",
            String::from_utf8_lossy(&p.payload)
        );
    }
    let addr = broker.http_addr();
    assert_eq!(get_json(addr, "/api/v1/broker")["retained_messages"], 3);
    assert_eq!(sample(&metrics(addr), "halyard_retained_messages"), 3.0);
}
