//! The `stalled-qos0` scenario: does a crowd of QoS 0 subscribers that stop reading slow an
//! unrelated QoS 1 pair down?
//!
//! ```text
//! flooder ──QoS 0──> topic S ──> --connections subscribers (connected, subscribed, never read)
//! latency publisher ──QoS 1 at --rate──> its own topic ──> latency subscriber
//! ```
//!
//! The stalled subscribers and the flood start first, and the flood runs until the latency
//! measurement is over; the report is the latency scenario's (end-to-end latency of the QoS 1
//! pair), with the stalled subscribers' count and the flood messages written.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::BytesMut;
use halyard_codec::QoS;
use tokio::io::AsyncWriteExt;

use crate::mqtt::{Conn, PublishTemplate};
use crate::payload::PayloadHeader;
use crate::run::{run_traffic, version_of, Params, Report, Scenario};

/// Longest wait for each stalled subscriber's CONNACK and SUBACK.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Flood messages written per socket write.
const FLOOD_BATCH: usize = 64;
/// How long the flood runs before the latency measurement starts, so that the stalled
/// subscribers' buffers are full when it does.
const FILL: Duration = Duration::from_secs(2);

/// Runs the scenario against `addr`.
pub async fn run_stalled_qos0(params: Params, addr: SocketAddr) -> Result<Report> {
    let version = version_of(&params.mqtt_version)?;
    let topic = format!("hb/{}/stalled", params.run_id);
    let mut stalled = Vec::with_capacity(params.connections);
    for i in 0..params.connections {
        let client_id = format!("hb-{}-stalled-{i}", params.run_id);
        let mut conn = Conn::connect(addr, version, &client_id, 0, SETUP_TIMEOUT)
            .await
            .with_context(|| format!("stalled subscriber {i}"))?;
        conn.subscribe(&topic, QoS::AtMostOnce, SETUP_TIMEOUT)
            .await
            .with_context(|| format!("stalled subscriber {i}"))?;
        stalled.push(conn);
    }
    let flooder = Conn::connect(
        addr,
        version,
        &format!("hb-{}-flooder", params.run_id),
        0,
        SETUP_TIMEOUT,
    )
    .await
    .context("flooder")?;
    let template = PublishTemplate::new(&topic, QoS::AtMostOnce, params.payload, version)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn(flood(flooder, template, Arc::clone(&stop)));
    tokio::time::sleep(FILL).await;

    let pair = run_traffic(
        Params {
            scenario: Scenario::Latency,
            qos: 1,
            publishers: 1,
            subscribers: 1,
            ..params.clone()
        },
        addr,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.await.context("flood task")?;
    drop(stalled);

    let mut report = pair.context("latency pair")?;
    report.scenario = Scenario::StalledQos0;
    report.params.scenario = Scenario::StalledQos0;
    report.params.run_id = params.run_id;
    report.stalled_subscribers = Some(params.connections);
    match flooded {
        Ok(sent) => report.flood_sent = Some(sent),
        Err(e) => {
            report.error_count += 1;
            report.errors.push(format!("flooder: {e:#}"));
        }
    }
    Ok(report)
}

/// Writes QoS 0 messages to `conn` as fast as it takes them until `stop`; how many.
async fn flood(mut conn: Conn, template: PublishTemplate, stop: Arc<AtomicBool>) -> Result<u64> {
    let mut out = BytesMut::with_capacity(template.len() * FLOOD_BATCH);
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        out.clear();
        for _ in 0..FLOOD_BATCH {
            let header = PayloadHeader {
                publisher: u32::MAX,
                seq: sent,
                sent_ns: 0,
            };
            template.append(&mut out, 0, &header);
            sent += 1;
        }
        conn.stream.write_all(&out).await.context("flood write")?;
    }
    conn.disconnect().await;
    Ok(sent)
}
