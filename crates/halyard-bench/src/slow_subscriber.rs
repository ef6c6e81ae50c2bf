//! The `slow-subscriber` scenario: does one subscriber that stops reading slow the others?
//!
//! Two fan-out phases against the same broker, in one run, one healthy subscriber each:
//!
//! ```text
//! baseline: publisher ──> topic A ──> healthy subscriber
//! loaded:   publisher ──> topic B ──> healthy subscriber
//!                                └──> stuck subscriber (connected, subscribed, never reads)
//! then:     the stuck subscriber reads and acknowledges what it was sent, until quiet
//! ```
//!
//! The report is the loaded phase's, with the baseline's delivery rate, the healthy
//! subscriber's `healthy_ratio` (loaded rate / baseline rate), the publishes the broker refused
//! (`rejected`) and the messages the stuck subscriber never got (`stuck_dropped`: sent in the
//! loaded phase minus the distinct ones it finally read), which counts silent drops too.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use halyard_codec::{decode, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::accounting::Deliveries;
use crate::mqtt::{client_context, encode_ack, Conn, READ_RESERVE};
use crate::payload::PayloadHeader;
use crate::run::{fanout_topic, run_traffic, version_of, Params, Report, Scenario};

/// The stuck subscriber's final read ends after this long without a byte...
const QUIET: Duration = Duration::from_millis(500);
/// ...or after this long in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the stuck subscriber's CONNACK and SUBACK.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the baseline and the loaded phase against `addr`.
pub async fn run_slow_subscriber(params: Params, addr: SocketAddr) -> Result<Report> {
    let version = version_of(&params.mqtt_version)?;
    let qos = QoS::from_u8(params.qos).unwrap_or(QoS::AtLeastOnce);
    let phase = |tag: &str| Params {
        scenario: Scenario::Fanout,
        subscribers: 1,
        run_id: format!("{}{tag}", params.run_id),
        ..params.clone()
    };
    let baseline = run_traffic(phase("a"), addr)
        .await
        .context("baseline phase")?;

    let loaded_params = phase("b");
    let mut stuck = Conn::connect(
        addr,
        version,
        &format!("hb-{}-stuck", params.run_id),
        params.keep_alive,
        SETUP_TIMEOUT,
    )
    .await
    .context("stuck subscriber")?;
    stuck
        .subscribe(&fanout_topic(&loaded_params.run_id), qos, SETUP_TIMEOUT)
        .await
        .context("stuck subscriber")?;
    // From here on it reads nothing until the loaded phase is over.
    let loaded = run_traffic(loaded_params, addr)
        .await
        .context("loaded phase")?;
    let (stuck_deliveries, stuck_error) = match read_until_quiet(&mut stuck).await {
        Ok(d) => (d, None),
        Err((d, e)) => (d, Some(e)),
    };
    stuck.disconnect().await;

    let mut report = loaded;
    report.scenario = Scenario::SlowSubscriber;
    report.params.scenario = Scenario::SlowSubscriber;
    report.params.run_id = params.run_id;
    report.baseline_rate_msgs_per_s = baseline.rate_msgs_per_s;
    report.baseline_rejected = baseline.rejected;
    report.healthy_ratio = match (report.rate_msgs_per_s, baseline.rate_msgs_per_s) {
        (Some(loaded), Some(base)) if base > 0.0 => Some((loaded / base * 1000.0).round() / 1000.0),
        _ => None,
    };
    let expected = report.sent.unwrap_or(0);
    report.stuck_expected = Some(expected);
    report.stuck_received = Some(stuck_deliveries.unique());
    report.stuck_dropped = Some(expected.saturating_sub(stuck_deliveries.unique()));
    report.error_count += baseline.error_count;
    for e in baseline.errors {
        report.errors.push(format!("baseline: {e}"));
    }
    if let Some(e) = stuck_error {
        report.error_count += 1;
        report.errors.push(format!("stuck subscriber: {e}"));
    }
    Ok(report)
}

/// Reads (and acknowledges) everything the broker sends `conn` until it has been quiet for
/// [`QUIET`], the broker closes it, or [`DRAIN_LIMIT`]. A close or DISCONNECT ends the read
/// without an error: the `disconnect` policy does exactly that to a slow subscriber.
async fn read_until_quiet(conn: &mut Conn) -> Result<Deliveries, (Deliveries, String)> {
    let mut deliveries = Deliveries::default();
    let version = conn.version;
    let ctx = client_context(version);
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut out = BytesMut::with_capacity(4096);
    loop {
        if !out.is_empty() {
            if let Err(e) = conn.stream.write_all(&out).await {
                return Err((deliveries, format!("write: {e}")));
            }
            out.clear();
        }
        let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Ok(deliveries);
        }
        conn.inbuf.reserve(READ_RESERVE);
        match tokio::time::timeout(wait, conn.stream.read_buf(&mut conn.inbuf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(deliveries),
            Ok(Err(e)) => return Err((deliveries, format!("read: {e}"))),
            Ok(Ok(_)) => {}
        }
        loop {
            let packet = match decode(&mut conn.inbuf, &ctx) {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(e) => return Err((deliveries, format!("decode: {e}"))),
            };
            match packet {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        let ack = match p.qos {
                            QoS::ExactlyOnce => Packet::PubRec,
                            _ => Packet::PubAck,
                        };
                        if let Err(e) = encode_ack(ack, id, version, &mut out) {
                            return Err((deliveries, format!("{e:#}")));
                        }
                    }
                    match PayloadHeader::parse(&p.payload) {
                        Some(h) => {
                            deliveries.record(h.publisher, h.seq);
                        }
                        None => deliveries.foreign += 1,
                    }
                }
                Packet::PubRel(rel) => {
                    if let Err(e) = encode_ack(Packet::PubComp, rel.packet_id, version, &mut out) {
                        return Err((deliveries, format!("{e:#}")));
                    }
                }
                Packet::Disconnect(_) => return Ok(deliveries),
                _ => {}
            }
        }
    }
}
