//! The `takeover` scenario: a client holding a persistent session on one cluster node
//! reconnects with the same client id to another node, which must take the session over.
//!
//! Each round uses a fresh client id:
//!
//! ```text
//! node A: CONNECT (clean 0) + SUBSCRIBE ──────────── ... closed by A (DISCONNECT / EOF) ─┐
//! node B:                   TCP ── CONNECT (clean 0) ── CONNACK                          │
//!                                  │<── connack ──────>│                                 │
//!                                  │<── old closed ─────────────────────────────────────>│
//! ```
//!
//! after which the session is discarded (a clean CONNECT to B, then DISCONNECT), so that
//! rounds do not pile up sessions in the cluster.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use halyard_codec::{Packet, ProtocolVersion, QoS};
use hdrhistogram::Histogram;

use crate::mqtt::Conn;
use crate::run::{new_histogram, version_of, Errors, LatencyReport, Params, Report, ToolCpu};
use crate::sys::{available_cpus, CpuSample};

/// Longest wait for any one step of a round (CONNACK, SUBACK, the old connection's close).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What one round measured.
struct Round {
    connack: Duration,
    old_closed: Duration,
    session_present: bool,
}

/// Runs `params.rounds` takeovers from the node at `addr` to the one at
/// `params.takeover_port` (same host).
pub async fn run_takeover(params: Params, addr: SocketAddr) -> Result<Report> {
    let run_start = CpuSample::now();
    let version = version_of(&params.mqtt_version)?;
    let Some(port) = params.takeover_port else {
        bail!("the takeover scenario needs the other node's port (--takeover-port)");
    };
    let to = SocketAddr::new(addr.ip(), port);
    let mut errors = Errors::default();
    let mut connack = new_histogram();
    let mut old_closed = new_histogram();
    let (mut takeovers, mut session_present) = (0, 0);
    for i in 0..params.rounds {
        let client_id = format!("hb-{}-takeover-{i}", params.run_id);
        let filter = format!("bench/{}/takeover/{i}", params.run_id);
        match round(addr, to, version, &client_id, &filter).await {
            Ok(r) => {
                takeovers += 1;
                session_present += usize::from(r.session_present);
                record(&mut connack, r.connack);
                record(&mut old_closed, r.old_closed);
            }
            Err(e) => errors.push(format!("round {i}: {e:#}")),
        }
        if let Err(e) = discard_session(to, version, &client_id).await {
            errors.push(format!("round {i}: discarding the session: {e:#}"));
        }
    }
    let cpu = CpuSample::now().since(&run_start);
    let mut report = Report::empty(
        params,
        ToolCpu {
            window: cpu,
            run: cpu,
            available_cpus: available_cpus(),
        },
    );
    report.takeovers = Some(takeovers);
    report.session_present = Some(session_present);
    report.takeover_connack_us = LatencyReport::from_ns(&connack);
    report.takeover_old_closed_us = LatencyReport::from_ns(&old_closed);
    report.error_count = errors.count;
    report.errors = errors.first;
    Ok(report)
}

fn record(histogram: &mut Histogram<u64>, took: Duration) {
    histogram.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1));
}

/// One takeover: a persistent session with one subscription on `from`, then the same client
/// id connecting to `to` while the first connection is still open.
async fn round(
    from: SocketAddr,
    to: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
    filter: &str,
) -> Result<Round> {
    let (mut old, _) = Conn::open_session(from, version, client_id, false, STEP_TIMEOUT).await?;
    old.subscribe(filter, QoS::AtLeastOnce, STEP_TIMEOUT)
        .await?;
    // Reading from the start, so the close is seen when it happens, not when polled.
    let watcher = tokio::spawn(closed_at(old));
    let mut new = Conn::open_tcp(to, version).await?;
    let sent = Instant::now();
    let handshake = tokio::time::timeout(STEP_TIMEOUT, new.handshake(client_id, 0, false)).await;
    let connack_at = Instant::now();
    let session_present = match handshake {
        Ok(result) => result?,
        Err(_) => {
            watcher.abort();
            bail!("no CONNACK from the new node within {STEP_TIMEOUT:?}");
        }
    };
    let old_closed_at = watcher
        .await
        .map_err(|e| anyhow!("old-connection watcher: {e}"))??;
    new.disconnect().await;
    Ok(Round {
        connack: connack_at - sent,
        old_closed: old_closed_at.saturating_duration_since(sent),
        session_present,
    })
}

/// When the broker ended `conn`: its DISCONNECT (MQTT 5: 0x8E Session taken over
/// [MQTT-3.1.4-3]) or the end of the stream, whichever comes first.
async fn closed_at(mut conn: Conn) -> Result<Instant> {
    let wait = async {
        loop {
            match conn.read_packet().await {
                Ok(Packet::Disconnect(_)) | Err(_) => return Instant::now(),
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, wait).await.map_err(|_| {
        anyhow!("the old connection was still open {STEP_TIMEOUT:?} after the takeover")
    })
}

/// Ends the round's session: a clean connect discards it [MQTT-3.1.2-4], and 3.x ends a clean
/// session at disconnect (MQTT 5: expiry 0).
async fn discard_session(to: SocketAddr, version: ProtocolVersion, client_id: &str) -> Result<()> {
    let (conn, _) = Conn::open_session(to, version, client_id, true, STEP_TIMEOUT).await?;
    conn.disconnect().await;
    Ok(())
}
