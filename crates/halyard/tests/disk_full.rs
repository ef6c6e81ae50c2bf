//! A full data directory degrades the broker instead of stopping it (issue 14): real binary,
//! real redb store, on a small tmpfs the test mounts (root only; skipped with a message
//! elsewhere) and fills with a filler file.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};

/// Size of the file system under the data directory: room for the empty store and a few
/// batches, small enough to fill in a moment.
const FS_SIZE: &str = "size=16m";
/// Payload of the QoS 1 messages that fill the persistent queue: a few make redb grow its
/// file.
const PAYLOAD: usize = 16 * 1024;
/// Most QoS 1 publishes tried before the store must have run out of space (the whole file
/// system is a quarter of this many payloads).
const MOST_PUBLISHES: u16 = 4096;

const CONFIG: &str = "max_queued_messages = 100000\n[storage]\nfsync = \"always\"\n";

/// A tmpfs mounted for the test; unmounted (and its mount point removed) when dropped, also
/// when the test fails.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs, or says why not (not root, no mount permission in this container).
    fn mount() -> Result<SmallFs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        let dir = unique_temp_path("small-fs", "d");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", FS_SIZE, "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !mounted.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&mounted.stderr).trim()
            ));
        }
        Ok(SmallFs { dir })
    }

    /// Writes zeros to `name` until the file system is full.
    fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        // The last partial chunk may have left a few bytes; fill them too.
        while file.write_all(&[0u8]).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.dir).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            // Still busy (a process of this test holding a file): detach it now.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn persistent_connect(version: ProtocolVersion, id: &str, clean: bool) -> halyard_codec::Connect {
    let mut connect = connect_packet(version, id, clean);
    connect.properties.session_expiry_interval = Some(3600);
    connect
}

fn readyz(broker: &common::Broker) -> (u16, String) {
    http(broker.http_addr(), "GET", "/readyz", None, None)
}

/// Publishes a QoS 1 message and returns the PUBACK reason code.
async fn publish1(client: &mut RawClient, id: u16, payload: &[u8]) -> ReasonCode {
    client
        .publish(publish_packet(
            "t",
            payload,
            QoS::AtLeastOnce,
            false,
            Some(id),
        ))
        .await
}

/// Waits for the next PUBLISH to `client` with `payload`, acknowledging QoS 1 ones on the way.
async fn expect_payload(client: &mut RawClient, payload: &[u8]) {
    loop {
        let publish = client.recv_publish().await;
        if publish.qos != QoS::AtMostOnce {
            client.ack(&publish).await;
        }
        if publish.payload.as_ref() == payload {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_degrades_then_recovers() {
    let fs = match SmallFs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipping the full-disk test: {why}");
            return;
        }
    };
    let data_dir = fs.dir.join("data");
    let mut broker = common::Broker::start_durable(&data_dir, CONFIG);
    let addr = broker.addr();
    // A persistent subscriber away: every QoS 1 message to "t" is written to its queue.
    offline_subscriber(
        addr,
        persistent_connect(ProtocolVersion::V5, "logger", true),
        "t",
    )
    .await;
    let mut publisher = RawClient::connect_v5(addr, "publisher", true).await;
    assert_eq!(
        publish1(&mut publisher, 1, b"before").await,
        ReasonCode::SUCCESS
    );

    let filler = fs.fill("filler");
    let payload = vec![7u8; PAYLOAD];
    let mut refused_at = None;
    for id in 2..MOST_PUBLISHES {
        match publish1(&mut publisher, id, &payload).await {
            ReasonCode::SUCCESS => {}
            ReasonCode::QUOTA_EXCEEDED => {
                refused_at = Some(id);
                break;
            }
            other => panic!("PUBACK {other:?} for a publish on a full disk"),
        }
    }
    let refused_at = refused_at.expect("a publish on the full disk was refused with 0x97");
    assert!(
        broker.wait_exit(Duration::ZERO).is_none(),
        "the broker kept running"
    );

    // Degraded: QoS 1 is refused up front, ...
    assert_eq!(
        publish1(&mut publisher, refused_at + 1, b"degraded").await,
        ReasonCode::QUOTA_EXCEEDED
    );
    // ... a clean session connects and subscribes, and QoS 0 flows to it, ...
    let mut live = RawClient::connect_v5(addr, "live", true).await;
    assert_eq!(
        live.subscribe(1, &[("t", QoS::AtLeastOnce)]).await,
        vec![ReasonCode::GRANTED_QOS_1]
    );
    publisher.publish(publish0("t", b"qos0")).await;
    let qos0 = live.recv_publish().await;
    assert_eq!(qos0.payload.as_ref(), b"qos0");
    assert_eq!(qos0.qos, QoS::AtMostOnce);
    // ... and a new persistent session is refused: 0x88, and 0x03 in 3.1.1.
    let (_, ack) =
        RawClient::handshake(addr, persistent_connect(ProtocolVersion::V5, "new", true)).await;
    assert_eq!(ack.code, ReasonCode::SERVER_UNAVAILABLE);
    assert!(!ack.session_present, "[MQTT-3.2.2-6]");
    let (_, ack) =
        RawClient::handshake(addr, connect_packet(ProtocolVersion::V3_1_1, "new3", false)).await;
    assert_eq!(ack.code, ReasonCode::V3_SERVER_UNAVAILABLE);
    // A stored persistent session resumes, and what it changes is kept aside for the disk.
    let (mut logger, ack) = RawClient::handshake(
        addr,
        persistent_connect(ProtocolVersion::V5, "logger", false),
    )
    .await;
    assert!(ack.session_present);
    logger
        .send(&halyard_codec::Packet::Subscribe(subscribe_packet(
            9,
            &[("later", QoS::AtLeastOnce)],
        )))
        .await;
    logger
        .recv_where("SUBACK", |p| matches!(p, halyard_codec::Packet::SubAck(_)))
        .await;
    logger.disconnect().await;
    let (status, body) = readyz(&broker);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("data directory is full"), "{body}");
    let (status, _) = http(broker.http_addr(), "GET", "/livez", None, None);
    assert_eq!(status, 200, "a restart frees no space: still live");
    assert_eq!(metric(&broker, "halyard_disk_full"), 1.0);
    let refusals = metric(
        &broker,
        "halyard_requests_refused_total{reason=\"disk_full\"}",
    );
    assert!(refusals >= 4.0, "refusals counted: {refusals}");

    // A 3.1.1 publisher cannot be told: its QoS 1 publish is held unacknowledged.
    let mut v3 = RawClient::connect_v311(addr, "publisher-3", true).await;
    v3.send(&halyard_codec::Packet::Publish(publish_packet(
        "t",
        b"from 3.1.1",
        QoS::AtLeastOnce,
        false,
        Some(1),
    )))
    .await;
    v3.expect_nothing(300).await;

    std::fs::remove_file(&filler).expect("remove filler");
    // Once space is back the held publish is routed and acknowledged.
    match v3.try_recv(Duration::from_secs(20)).await {
        Ok(halyard_codec::Packet::PubAck(ack)) => assert_eq!(ack.packet_id, 1),
        other => panic!("expected the held publish's PUBACK, got {other:?}"),
    }
    expect_payload(&mut live, b"from 3.1.1").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = refused_at + 2;
    loop {
        let reason = publish1(&mut publisher, id, b"after").await;
        if reason == ReasonCode::SUCCESS {
            break;
        }
        assert_eq!(reason, ReasonCode::QUOTA_EXCEEDED);
        assert!(
            Instant::now() < deadline,
            "still refused 20 s after space was freed"
        );
        sleep_ms(200).await;
        id += 1;
    }
    expect_payload(&mut live, b"after").await;
    let (status, body) = readyz(&broker);
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric(&broker, "halyard_disk_full"), 0.0);
    let (_, ack) =
        RawClient::handshake(addr, persistent_connect(ProtocolVersion::V5, "new", true)).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "persistent sessions again");
    assert!(
        broker.wait_exit(Duration::ZERO).is_none(),
        "the broker never exited"
    );
    let logs = broker.logs();
    assert_eq!(
        logs.matches("the data directory is full").count(),
        1,
        "{logs}"
    );
    assert_eq!(logs.matches("has space again").count(), 1, "{logs}");

    // The subscription made while degraded reached the disk: it survives a crash.
    broker.kill9();
    drop(broker);
    let broker = common::Broker::start_durable(&data_dir, CONFIG);
    let addr = broker.addr();
    let (mut logger, ack) = RawClient::handshake(
        addr,
        persistent_connect(ProtocolVersion::V5, "logger", false),
    )
    .await;
    assert!(ack.session_present);
    let mut publisher = RawClient::connect_v5(addr, "publisher", true).await;
    assert_eq!(
        publisher
            .publish(publish_packet(
                "later",
                b"later",
                QoS::AtLeastOnce,
                false,
                Some(1)
            ))
            .await,
        ReasonCode::SUCCESS
    );
    expect_payload(&mut logger, b"later").await;
    drop(broker);
    drop(fs);
}
