//! The `reconnect` scenario: one client reconnecting in a loop with the same client id and a
//! persistent session (clean start 0, MQTT 5 Session Expiry `--session-expiry`), one
//! connection after another. What a reconnect costs the broker: resuming the session at
//! CONNECT, keeping it at the disconnect.
//!
//! ```text
//! TCP ── CONNECT (clean 0, expiry E) ── CONNACK ── DISCONNECT ── broker closes ── (again)
//!        │<──────── connect latency ────────>│
//! ```
//!
//! Only cycles that began inside the window count toward `connects_per_s`. At the end the
//! session is discarded (a clean CONNECT with expiry 0), so the broker is left as found.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::BytesMut;
use halyard_codec::{Disconnect, Packet, ProtocolVersion};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use crate::mqtt::{encode_into, Conn};
use crate::run::ToolCpu;
use crate::run::{new_histogram, round1, version_of, Errors, LatencyReport, Params, Report};
use crate::sys::{available_cpus, CpuSample};

/// Longest wait for a CONNACK, or for the broker to close after DISCONNECT.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A run stops early after this many failed cycles: the broker is not answering.
const MAX_FAILURES: usize = 100;

/// Runs the reconnect loop for `--warmup` + `--duration` seconds against `addr`.
pub async fn run_reconnect(params: Params, addr: SocketAddr) -> Result<Report> {
    let run_start = CpuSample::now();
    let version = version_of(&params.mqtt_version)?;
    let client_id = format!("hb-{}-reconnect", params.run_id);
    let expiry = params.session_expiry;
    let window_start = Instant::now() + Duration::from_secs_f64(params.warmup_s);
    let window_end = window_start + Duration::from_secs_f64(params.duration_s);
    let mut errors = Errors::default();
    let mut latency = new_histogram();
    let (mut cycles, mut in_window, mut session_present) = (0usize, 0usize, 0usize);
    let mut window_cpu_start = None;
    loop {
        let began = Instant::now();
        if began >= window_end || errors.count >= MAX_FAILURES {
            break;
        }
        let counted = began >= window_start;
        if counted && window_cpu_start.is_none() {
            window_cpu_start = Some(CpuSample::now());
        }
        match cycle(addr, version, &client_id, params.keep_alive, expiry).await {
            Ok((connack, present)) => {
                cycles += 1;
                session_present += usize::from(present);
                if counted {
                    in_window += 1;
                    latency.saturating_record(
                        u64::try_from(connack.as_nanos()).unwrap_or(u64::MAX).max(1),
                    );
                }
            }
            Err(e) => errors.push(format!("cycle {cycles}: {e:#}")),
        }
    }
    let window_cpu = CpuSample::now().since(window_cpu_start.as_ref().unwrap_or(&run_start));
    let window_s = Instant::now()
        .saturating_duration_since(window_start)
        .as_secs_f64();
    if let Err(e) = discard_session(addr, version, &client_id).await {
        errors.push(format!("discarding the session: {e:#}"));
    }
    let mut report = Report::empty(
        params,
        ToolCpu {
            window: window_cpu,
            run: CpuSample::now().since(&run_start),
            available_cpus: available_cpus(),
        },
    );
    report.connections = Some(cycles);
    report.connected = Some(in_window);
    report.connect_s = Some((window_s * 1000.0).round() / 1000.0);
    report.connects_per_s = Some(round1(in_window as f64 / window_s.max(1e-9)));
    report.connect_latency_us = LatencyReport::from_ns(&latency);
    report.session_present = Some(session_present);
    report.error_count = errors.count;
    report.errors = errors.first;
    Ok(report)
}

/// One connection: CONNECT resuming the session, CONNACK, DISCONNECT, and the broker's close.
/// Returns the time from CONNECT to CONNACK and CONNACK's session-present flag.
async fn cycle(
    addr: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    expiry: u32,
) -> Result<(Duration, bool)> {
    let mut conn = Conn::open_tcp(addr, version).await?;
    let sent = Instant::now();
    let present = tokio::time::timeout(
        STEP_TIMEOUT,
        conn.handshake_with_expiry(client_id, keep_alive, false, Some(expiry)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no CONNACK within {STEP_TIMEOUT:?}"))??;
    let connack = sent.elapsed();
    let mut out = BytesMut::with_capacity(8);
    encode_into(
        &Packet::Disconnect(Disconnect::default()),
        version,
        &mut out,
    )?;
    conn.stream.write_all(&out).await?;
    // The broker closes the connection once it has handled the DISCONNECT, so the next
    // CONNECT resumes a session that is offline, not one still being taken over.
    let mut scratch = [0u8; 64];
    let closed = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match conn.stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    // A reset, not a FIN: tens of thousands of connections must not leave our ports in
    // TIME_WAIT.
    let _ = conn.stream.set_zero_linger();
    if closed.is_err() {
        bail!("the broker did not close the connection within {STEP_TIMEOUT:?} of DISCONNECT");
    }
    Ok((connack, present))
}

/// Ends the loop's session: a clean CONNECT discards it [MQTT-3.1.2-4] and, with no expiry,
/// the new one ends at the disconnect.
async fn discard_session(
    addr: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
) -> Result<()> {
    let mut conn = Conn::open_tcp(addr, version).await?;
    tokio::time::timeout(
        STEP_TIMEOUT,
        conn.handshake_with_expiry(client_id, 0, true, None),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no CONNACK within {STEP_TIMEOUT:?}"))??;
    conn.disconnect().await;
    Ok(())
}
