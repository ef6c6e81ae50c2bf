//! Scenario orchestration: who connects, who publishes where, the measurement window, the
//! drain, and the final [`Report`].
//!
//! Timeline of a traffic scenario (all clients connected and subscribed before `t0`):
//!
//! ```text
//! t0 ── warm-up ──> window_start ── duration ──> window_end ── drain (<= --drain) ──> stop
//!      publishing ........................................|  publishers stop, flush, and
//!                   only deliveries received in here count |  wait for their acks; then
//!                   toward rate_msgs_per_s and latency     |  lost = sent - unique received
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::{Buf, BytesMut};
use halyard_codec::{decode, Packet, ProtocolVersion, QoS};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::accounting::Deliveries;
use crate::mqtt::{client_context, encode_ack, encode_into, Conn, PublishTemplate, READ_RESERVE};
use crate::payload::{ns_of, PayloadHeader};
use crate::sys::{available_cpus, CpuSample, CpuUse};

/// A publisher refills its write buffer when it holds less than this many bytes...
const LOW_WATER: usize = 16 * 1024;
/// ...up to about this many bytes, written with one `write` call when the socket allows.
const HIGH_WATER: usize = 64 * 1024;
/// At most this many error messages are kept in the report.
const MAX_ERRORS: usize = 10;

/// The benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// P publishers on their own topics, subscribers on one wildcard filter covering them.
    Fanin,
    /// Publishers and S subscribers all on one topic.
    Fanout,
    /// N publisher/subscriber pairs on distinct topics.
    Pairs,
    /// One publisher at a fixed rate, one subscriber; end-to-end latency histogram.
    Latency,
    /// C idle connections: connect rate, then held open for --hold seconds.
    Conns,
    /// A persistent session on one node taken over from another, --rounds times: time to
    /// CONNACK and until the old connection is closed.
    Takeover,
    /// Fan-out to one healthy subscriber, without and then with a second subscriber that
    /// never reads: the healthy one's rate with it as a share of the rate without.
    #[serde(rename = "slow-subscriber")]
    SlowSubscriber,
    /// One client reconnecting in a loop to its persistent session (--session-expiry).
    Reconnect,
    /// The latency scenario's QoS 1 pair while --connections QoS 0 subscribers that never
    /// read are flooded on another topic.
    #[serde(rename = "stalled-qos0")]
    #[value(name = "stalled-qos0")]
    StalledQos0,
}

/// Everything a run needs, resolved from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Which scenario.
    pub scenario: Scenario,
    /// Broker host as given.
    pub host: String,
    /// Broker port (publishers', and the first node's in `takeover`).
    pub port: u16,
    /// Port (same host) the subscribers connect to instead of `port`: another node of a
    /// cluster, so that every delivery crosses the cluster's peer link.
    pub subscriber_port: Option<u16>,
    /// `takeover`: port (same host) of the node that takes the sessions over.
    pub takeover_port: Option<u16>,
    /// `takeover`: sessions taken over, one after another.
    pub rounds: usize,
    /// QoS of publications and subscriptions (0, 1 or 2).
    pub qos: u8,
    /// Payload bytes per message (at least the 24-byte header).
    pub payload: usize,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Warm-up before the window, seconds.
    pub warmup_s: f64,
    /// Longest wait after the window for outstanding deliveries and acks, seconds.
    pub drain_s: f64,
    /// Maximum unacknowledged QoS 1/2 publications per publisher.
    pub inflight: usize,
    /// Publisher count.
    pub publishers: usize,
    /// Subscriber count.
    pub subscribers: usize,
    /// Messages per second per publisher; `None` = as fast as TCP allows.
    pub rate: Option<f64>,
    /// Connections for the `conns` scenario.
    pub connections: usize,
    /// Parallel connection attempts in the `conns` scenario.
    pub connect_concurrency: usize,
    /// How long `conns` holds its connections, seconds.
    pub hold_s: f64,
    /// Keep-alive sent in CONNECT, seconds (0 = off).
    pub keep_alive: u16,
    /// `reconnect`: MQTT 5 Session Expiry Interval of every CONNECT, seconds.
    pub session_expiry: u32,
    /// The broker's process id, when it runs on this machine: its peak RSS (`VmHWM`) goes
    /// into the report.
    pub broker_pid: Option<u32>,
    /// "3.1.1" or "5".
    pub mqtt_version: String,
    /// Tokio worker threads.
    pub threads: usize,
    /// Unique tag in topics and client ids, so that runs never see each other's traffic.
    pub run_id: String,
}

/// End-to-end latency percentiles, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    /// Samples (deliveries received inside the window).
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl LatencyReport {
    pub(crate) fn from_ns(h: &Histogram<u64>) -> Option<LatencyReport> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        Some(LatencyReport {
            count: h.len(),
            mean: (h.mean() / 100.0).round() / 10.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// The tool's own CPU use.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCpu {
    /// During the measurement window (traffic scenarios) or the connect phase (`conns`).
    pub window: CpuUse,
    /// Over the whole run, set-up and drain included.
    pub run: CpuUse,
    /// CPUs the tool may use; `window.cores` close to this means the tool was saturated.
    pub available_cpus: usize,
}

/// The one JSON line printed at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: Scenario,
    /// The parameters of the run.
    pub params: Params,
    /// Messages published (sequence numbers handed out), all phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// Messages published inside the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_in_window: Option<u64>,
    /// `sent_in_window / duration`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_rate_msgs_per_s: Option<f64>,
    /// Deliveries a perfect broker makes: for each subscriber, the sum of `sent` over the
    /// publishers it listens to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    /// Deliveries received (duplicates included), all phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
    /// Deliveries received inside the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_in_window: Option<u64>,
    /// `received_in_window / duration`: the headline throughput, deliveries per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_msgs_per_s: Option<f64>,
    /// `expected - unique deliveries` after the drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// Deliveries of an already-received (publisher, seq) to the same subscriber.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Deliveries from a publisher the subscriber did not subscribe to (routing error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unexpected: Option<u64>,
    /// Deliveries without a benchmark header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign: Option<u64>,
    /// QoS 1/2 publications the broker acknowledged (PUBACK, or PUBCOMP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    /// QoS 1/2 publications the broker refused with an MQTT 5 error reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<u64>,
    /// QoS 1/2 publications still unacknowledged when the drain ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unacked: Option<u64>,
    /// Times a publisher reconnected after the broker closed its connection (unacknowledged
    /// QoS 1/2 messages are then retransmitted with DUP set, same sequence number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publisher_reconnects: Option<u64>,
    /// QoS 1/2 messages retransmitted after a reconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmitted: Option<u64>,
    /// Seconds from the window's end until every delivery arrived (or the drain limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_s: Option<f64>,
    /// End-to-end latency of deliveries received inside the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<LatencyReport>,
    /// `conns`: connections asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// `conns`: connections that got a successful CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<usize>,
    /// `conns`: seconds from the first attempt to the last CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_s: Option<f64>,
    /// `conns`: `connected / connect_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_s: Option<f64>,
    /// `conns`: time from TCP connect to CONNACK, per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_latency_us: Option<LatencyReport>,
    /// `conns`: connections found closed by the broker at the end of the hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_during_hold: Option<usize>,
    /// `takeover`: rounds whose new connection got its CONNACK and whose old one was closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeovers: Option<usize>,
    /// `takeover`: CONNACKs on the new node with session present set [MQTT-3.2.2-3].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_present: Option<usize>,
    /// `takeover`: from sending CONNECT to the new node until its CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeover_connack_us: Option<LatencyReport>,
    /// `takeover`: from sending CONNECT to the new node until the old node closed the old
    /// connection (DISCONNECT or end of stream, whichever came first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeover_old_closed_us: Option<LatencyReport>,
    /// `slow-subscriber`: the healthy subscriber's deliveries per second with no stuck
    /// subscriber (the baseline phase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_rate_msgs_per_s: Option<f64>,
    /// `slow-subscriber`: publishes refused in the baseline phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_rejected: Option<u64>,
    /// `slow-subscriber`: `rate_msgs_per_s / baseline_rate_msgs_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_ratio: Option<f64>,
    /// `slow-subscriber`: messages published while the stuck subscriber was subscribed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_expected: Option<u64>,
    /// `slow-subscriber`: distinct messages the stuck subscriber read once it read again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_received: Option<u64>,
    /// `slow-subscriber`: `stuck_expected - stuck_received`, whether the broker counted
    /// those drops or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_dropped: Option<u64>,
    /// `stalled-qos0`: subscribers that never read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_subscribers: Option<usize>,
    /// `stalled-qos0`: QoS 0 messages the flooder wrote to their topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood_sent: Option<u64>,
    /// With `--broker-pid`: the broker's peak resident set (`VmHWM`), KiB, at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_peak_rss_kb: Option<u64>,
    /// The tool's CPU use.
    pub tool_cpu: ToolCpu,
    /// Number of client errors (failed connects, broken connections, protocol errors).
    pub error_count: usize,
    /// The first few error messages.
    pub errors: Vec<String>,
}

impl Report {
    pub(crate) fn empty(params: Params, tool_cpu: ToolCpu) -> Report {
        Report {
            scenario: params.scenario,
            params,
            sent: None,
            sent_in_window: None,
            publish_rate_msgs_per_s: None,
            expected: None,
            received: None,
            received_in_window: None,
            rate_msgs_per_s: None,
            lost: None,
            duplicates: None,
            unexpected: None,
            foreign: None,
            acked: None,
            rejected: None,
            unacked: None,
            publisher_reconnects: None,
            retransmitted: None,
            drain_s: None,
            latency_us: None,
            connections: None,
            connected: None,
            connect_s: None,
            connects_per_s: None,
            connect_latency_us: None,
            closed_during_hold: None,
            takeovers: None,
            session_present: None,
            takeover_connack_us: None,
            takeover_old_closed_us: None,
            stalled_subscribers: None,
            flood_sent: None,
            baseline_rate_msgs_per_s: None,
            baseline_rejected: None,
            healthy_ratio: None,
            stuck_expected: None,
            stuck_received: None,
            stuck_dropped: None,
            broker_peak_rss_kb: None,
            tool_cpu,
            error_count: 0,
            errors: Vec::new(),
        }
    }
}

/// Collects error messages, keeping the first [`MAX_ERRORS`].
#[derive(Debug, Default)]
pub(crate) struct Errors {
    pub(crate) count: usize,
    pub(crate) first: Vec<String>,
}

impl Errors {
    pub(crate) fn push(&mut self, what: impl std::fmt::Display) {
        self.count += 1;
        if self.first.len() < MAX_ERRORS {
            self.first.push(what.to_string());
        }
    }
}

/// The instants that bound the phases of a traffic run.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    t0: Instant,
    window_start: Instant,
    window_end: Instant,
    hard_deadline: Instant,
}

/// One publisher's plan.
struct PubPlan {
    id: u32,
    topic: String,
}

/// One subscriber's plan: its filter and the publishers it should hear from.
struct SubPlan {
    filter: String,
    expects: Vec<u32>,
}

fn qos_of(qos: u8) -> QoS {
    QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce)
}

/// Parses "3.1.1" / "5" into the codec's protocol level.
pub fn version_of(name: &str) -> Result<ProtocolVersion> {
    match name {
        "3.1.1" | "311" | "4" => Ok(ProtocolVersion::V3_1_1),
        "5" | "5.0" => Ok(ProtocolVersion::V5),
        other => bail!("unsupported MQTT version {other:?} (use 3.1.1 or 5)"),
    }
}

fn topology(p: &Params) -> (Vec<PubPlan>, Vec<SubPlan>) {
    let run = &p.run_id;
    match p.scenario {
        Scenario::Fanin => {
            let pubs: Vec<PubPlan> = (0..p.publishers)
                .map(|i| PubPlan {
                    id: i as u32,
                    topic: format!("bench/{run}/p/{i}"),
                })
                .collect();
            let all: Vec<u32> = pubs.iter().map(|p| p.id).collect();
            let subs = (0..p.subscribers)
                .map(|_| SubPlan {
                    filter: format!("bench/{run}/p/+"),
                    expects: all.clone(),
                })
                .collect();
            (pubs, subs)
        }
        Scenario::Fanout | Scenario::Latency => {
            let topic = fanout_topic(run);
            let pubs: Vec<PubPlan> = (0..p.publishers)
                .map(|i| PubPlan {
                    id: i as u32,
                    topic: topic.clone(),
                })
                .collect();
            let all: Vec<u32> = pubs.iter().map(|p| p.id).collect();
            let subs = (0..p.subscribers)
                .map(|_| SubPlan {
                    filter: topic.clone(),
                    expects: all.clone(),
                })
                .collect();
            (pubs, subs)
        }
        Scenario::Pairs
        | Scenario::Conns
        | Scenario::Takeover
        | Scenario::SlowSubscriber
        | Scenario::StalledQos0
        | Scenario::Reconnect => {
            let n = if p.scenario != Scenario::Pairs {
                0
            } else {
                p.publishers
            };
            let pubs = (0..n)
                .map(|i| PubPlan {
                    id: i as u32,
                    topic: format!("bench/{run}/pair/{i}"),
                })
                .collect();
            let subs = (0..n)
                .map(|i| SubPlan {
                    filter: format!("bench/{run}/pair/{i}"),
                    expects: vec![i as u32],
                })
                .collect();
            (pubs, subs)
        }
    }
}

/// The one topic of the fan-out and latency scenarios of run `run_id`.
pub(crate) fn fanout_topic(run_id: &str) -> String {
    format!("bench/{run_id}/all")
}

/// Runs the scenario in `params` against the broker at `addr`.
pub async fn run(params: Params, addr: SocketAddr) -> Result<Report> {
    let broker_pid = params.broker_pid;
    let mut report = match params.scenario {
        Scenario::Conns => run_conns(params, addr).await,
        Scenario::Takeover => crate::takeover::run_takeover(params, addr).await,
        Scenario::SlowSubscriber => crate::slow_subscriber::run_slow_subscriber(params, addr).await,
        Scenario::Reconnect => crate::reconnect::run_reconnect(params, addr).await,
        Scenario::StalledQos0 => crate::stalled_qos0::run_stalled_qos0(params, addr).await,
        _ => run_traffic(params, addr).await,
    }?;
    report.broker_peak_rss_kb = broker_pid.and_then(crate::sys::peak_rss_kb);
    Ok(report)
}

/// Connects `count` clients concurrently with `make(i)`, keeping their order.
async fn connect_all<F, Fut>(count: usize, make: F) -> Vec<Result<Conn>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Conn>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..count {
        let fut = make(i);
        set.spawn(async move { (i, fut.await) });
    }
    let mut out: Vec<Option<Result<Conn>>> = (0..count).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, result)) = joined {
            out[i] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("connect task panicked"))))
        .collect()
}

/// A traffic scenario (fan-in, fan-out, pairs, latency) from connect to drain.
pub(crate) async fn run_traffic(params: Params, addr: SocketAddr) -> Result<Report> {
    let run_start = CpuSample::now();
    let version = version_of(&params.mqtt_version)?;
    let qos = qos_of(params.qos);
    let (pub_plans, sub_plans) = topology(&params);
    let connect_timeout = Duration::from_secs(10);
    let keep_alive = params.keep_alive;
    let run_id = params.run_id.clone();
    let mut errors = Errors::default();
    let sub_addr = params
        .subscriber_port
        .map_or(addr, |port| SocketAddr::new(addr.ip(), port));

    // Subscribers first, each confirmed by SUBACK, so that nothing published is missed.
    let filters: Vec<String> = sub_plans.iter().map(|s| s.filter.clone()).collect();
    let sub_conns = connect_all(sub_plans.len(), |i| {
        let id = format!("hb-{run_id}-sub-{i}");
        let filter = filters[i].clone();
        async move {
            let mut conn =
                Conn::connect(sub_addr, version, &id, keep_alive, connect_timeout).await?;
            conn.subscribe(&filter, qos, connect_timeout).await?;
            Ok(conn)
        }
    })
    .await;
    let pub_conns = connect_all(pub_plans.len(), |i| {
        let id = format!("hb-{run_id}-pub-{i}");
        async move { Conn::connect(addr, version, &id, keep_alive, connect_timeout).await }
    })
    .await;
    let mut subs = Vec::new();
    for (plan, conn) in sub_plans.iter().zip(sub_conns) {
        match conn {
            Ok(conn) => subs.push((plan, conn)),
            Err(e) => errors.push(format!("subscriber {}: {e:#}", plan.filter)),
        }
    }
    let mut pubs = Vec::new();
    for (plan, conn) in pub_plans.iter().zip(pub_conns) {
        match conn {
            Ok(conn) => pubs.push((plan, conn)),
            Err(e) => errors.push(format!("publisher {}: {e:#}", plan.id)),
        }
    }
    if errors.count > 0 {
        bail!(
            "set-up failed ({} errors), first: {}",
            errors.count,
            errors.first.join("; ")
        );
    }

    let t0 = Instant::now() + Duration::from_millis(20);
    let window_start = t0 + Duration::from_secs_f64(params.warmup_s);
    let window_end = window_start + Duration::from_secs_f64(params.duration_s);
    let sched = Schedule {
        t0,
        window_start,
        window_end,
        hard_deadline: window_end + Duration::from_secs_f64(params.drain_s),
    };

    let cpu_window = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let a = CpuSample::now();
        tokio::time::sleep_until(window_end.into()).await;
        CpuSample::now().since(&a)
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let unique_total = Arc::new(AtomicU64::new(0));
    let mut sub_set = JoinSet::new();
    for (plan, conn) in subs {
        let task = SubTask {
            conn,
            sched,
            unique_total: unique_total.clone(),
            stop: stop_rx.clone(),
        };
        let expects = plan.expects.clone();
        sub_set.spawn(async move { (expects, task.run().await) });
    }
    let mut pub_set = JoinSet::new();
    for (plan, conn) in pubs {
        let window = match conn.server_receive_maximum {
            Some(max) => params.inflight.min(usize::from(max)),
            None => params.inflight,
        }
        .clamp(1, 65_535);
        let task = PubTask {
            id: plan.id,
            template: PublishTemplate::new(&plan.topic, qos, params.payload, version)?,
            conn,
            qos,
            window,
            rate: params.rate,
            sched,
            reconnect: Reconnect {
                addr,
                client_id: format!("hb-{run_id}-pub-{}", plan.id),
                keep_alive,
            },
            pid_state: Vec::new(),
            unacked: std::collections::HashMap::with_capacity(window.min(4096)),
            inflight: 0,
            next_pid: 0,
        };
        pub_set.spawn(task.run());
    }

    let mut sent_per_pub = vec![0u64; pub_plans.len()];
    let (mut sent_in_window, mut acked, mut rejected, mut unacked) = (0, 0, 0, 0);
    let (mut reconnects, mut retransmitted) = (0, 0);
    while let Some(joined) = pub_set.join_next().await {
        match joined {
            Ok(r) => {
                if let Some(slot) = sent_per_pub.get_mut(r.id as usize) {
                    *slot = r.sent;
                }
                sent_in_window += r.sent_in_window;
                acked += r.acked;
                rejected += r.rejected;
                unacked += r.inflight_at_end;
                reconnects += r.reconnects;
                retransmitted += r.retransmitted;
                if let Some(e) = r.error {
                    errors.push(format!("publisher {}: {e}", r.id));
                }
            }
            Err(e) => errors.push(format!("publisher task: {e}")),
        }
    }
    let expected: u64 = sub_plans
        .iter()
        .map(|s| {
            s.expects
                .iter()
                .map(|&p| sent_per_pub.get(p as usize).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    // Drain: wait until every expected delivery has arrived, or the deadline.
    loop {
        let now = Instant::now();
        if unique_total.load(Ordering::Relaxed) >= expected || now >= sched.hard_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_s = Instant::now()
        .saturating_duration_since(window_end)
        .as_secs_f64();
    let _ = stop_tx.send(true);

    let mut received = 0;
    let mut received_in_window = 0;
    let (mut lost, mut duplicates, mut unexpected, mut foreign) = (0, 0, 0, 0);
    let mut latency = new_histogram();
    while let Some(joined) = sub_set.join_next().await {
        match joined {
            Ok((expects, r)) => {
                received += r.deliveries.received;
                received_in_window += r.received_in_window;
                duplicates += r.deliveries.duplicates();
                lost += r.deliveries.lost_from(&expects, &sent_per_pub);
                unexpected += r.deliveries.unexpected(&expects);
                foreign += r.deliveries.foreign;
                let _ = latency.add(&r.latency);
                if let Some(e) = r.error {
                    errors.push(format!("subscriber: {e}"));
                }
            }
            Err(e) => errors.push(format!("subscriber task: {e}")),
        }
    }
    let window_cpu = cpu_window.await.unwrap_or_default();
    let duration = params.duration_s;
    let sent: u64 = sent_per_pub.iter().sum();
    let qos_positive = qos != QoS::AtMostOnce;
    let mut report = Report::empty(
        params,
        ToolCpu {
            window: window_cpu,
            run: CpuSample::now().since(&run_start),
            available_cpus: available_cpus(),
        },
    );
    report.sent = Some(sent);
    report.sent_in_window = Some(sent_in_window);
    report.publish_rate_msgs_per_s = Some(round1(sent_in_window as f64 / duration));
    report.expected = Some(expected);
    report.received = Some(received);
    report.received_in_window = Some(received_in_window);
    report.rate_msgs_per_s = Some(round1(received_in_window as f64 / duration));
    report.lost = Some(lost);
    report.duplicates = Some(duplicates);
    report.unexpected = Some(unexpected);
    report.foreign = Some(foreign);
    if qos_positive {
        report.acked = Some(acked);
        report.rejected = Some(rejected);
        report.unacked = Some(unacked);
        report.retransmitted = Some(retransmitted);
    }
    report.publisher_reconnects = Some(reconnects);
    report.drain_s = Some((drain_s * 1000.0).round() / 1000.0);
    report.latency_us = LatencyReport::from_ns(&latency);
    report.error_count = errors.count;
    report.errors = errors.first;
    Ok(report)
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| {
        // The bounds above are valid constants; fall back to an auto-resizing histogram.
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfigs is valid"));
        h.auto(true);
        h
    })
}

/// Outcome of one publisher.
struct PubResult {
    id: u32,
    sent: u64,
    sent_in_window: u64,
    acked: u64,
    rejected: u64,
    inflight_at_end: u64,
    reconnects: u64,
    retransmitted: u64,
    error: Option<String>,
}

/// The broker closed the connection, or the socket failed: the publisher may reconnect.
#[derive(Debug)]
struct ConnectionLost(String);

impl std::fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionLost {}

fn lost(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(ConnectionLost(what.to_string()))
}

/// How a publisher reconnects after the broker closes its connection.
#[derive(Debug, Clone)]
struct Reconnect {
    addr: SocketAddr,
    client_id: String,
    keep_alive: u16,
}

/// Pause before reconnecting, so a broker that closes publishers under load is not stormed.
const RECONNECT_DELAY: Duration = Duration::from_millis(10);

struct PubTask {
    id: u32,
    conn: Conn,
    template: PublishTemplate,
    qos: QoS,
    window: usize,
    rate: Option<f64>,
    sched: Schedule,
    reconnect: Reconnect,
    /// QoS 1/2 state per packet id, kept across reconnects.
    pid_state: Vec<u8>,
    /// (seq, send timestamp) of each unacknowledged message, to retransmit it unchanged.
    unacked: std::collections::HashMap<u16, (u64, u64)>,
    inflight: usize,
    next_pid: u16,
}

/// Per packet id: not in use, awaiting PUBACK/PUBREC, awaiting PUBCOMP.
const PID_FREE: u8 = 0;
const PID_SENT: u8 = 1;
const PID_RELEASED: u8 = 2;

impl PubTask {
    async fn run(mut self) -> PubResult {
        let mut result = PubResult {
            id: self.id,
            sent: 0,
            sent_in_window: 0,
            acked: 0,
            rejected: 0,
            inflight_at_end: 0,
            reconnects: 0,
            retransmitted: 0,
            error: None,
        };
        if self.qos != QoS::AtMostOnce {
            self.pid_state = vec![PID_FREE; 65_536];
        }
        let mut resend = false;
        loop {
            match self.publish(&mut result, resend).await {
                Ok(()) => {
                    self.conn_disconnect().await;
                    break;
                }
                Err(e) if e.is::<ConnectionLost>() && Instant::now() < self.sched.hard_deadline => {
                    // A real client reconnects and retransmits what was not acknowledged
                    // (MQTT 3.x brokers may close a publisher instead of refusing a message).
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    let r = &self.reconnect;
                    match Conn::connect(
                        r.addr,
                        self.conn.version,
                        &r.client_id,
                        r.keep_alive,
                        Duration::from_secs(5),
                    )
                    .await
                    {
                        Ok(conn) => {
                            self.conn = conn;
                            result.reconnects += 1;
                            resend = true;
                        }
                        Err(e2) => {
                            result.error = Some(format!("{e:#}; reconnect failed: {e2:#}"));
                            break;
                        }
                    }
                }
                Err(e) => {
                    result.error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        result.inflight_at_end = self.inflight as u64;
        result
    }

    async fn conn_disconnect(&mut self) {
        let mut out = BytesMut::with_capacity(8);
        if encode_into(
            &Packet::Disconnect(halyard_codec::Disconnect::default()),
            self.conn.version,
            &mut out,
        )
        .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.conn.stream.write_all(&out).await;
                let _ = self.conn.stream.shutdown().await;
            })
            .await;
        }
    }

    /// Publishes on the current connection until done; with `resend`, first retransmits
    /// every unacknowledged message (DUP set) and PUBREL.
    async fn publish(&mut self, r: &mut PubResult, resend: bool) -> Result<()> {
        let sched = self.sched;
        let qos = self.qos;
        let version = self.conn.version;
        let ctx = client_context(version);
        let template = &self.template;
        let pid_state = &mut self.pid_state;
        let unacked = &mut self.unacked;
        let inflight = &mut self.inflight;
        let next_pid = &mut self.next_pid;
        let Conn { stream, inbuf, .. } = &mut self.conn;
        let (mut rd, mut wr) = stream.split();
        let mut out = BytesMut::with_capacity(HIGH_WATER + template.len());
        let window = if qos == QoS::AtMostOnce {
            usize::MAX
        } else {
            self.window
        };
        if resend {
            let mut pids: Vec<u16> = unacked.keys().copied().collect();
            pids.extend((1..=u16::MAX).filter(|&p| pid_state[usize::from(p)] == PID_RELEASED));
            pids.sort_unstable();
            for pid in pids {
                match pid_state[usize::from(pid)] {
                    PID_SENT => {
                        if let Some(&(seq, sent_ns)) = unacked.get(&pid) {
                            let header = PayloadHeader {
                                publisher: self.id,
                                seq,
                                sent_ns,
                            };
                            template.append_dup(&mut out, pid, &header);
                            r.retransmitted += 1;
                        }
                    }
                    PID_RELEASED => encode_ack(Packet::PubRel, pid, version, &mut out)?,
                    _ => {}
                }
            }
        }
        // Without a rate, refill the QoS 1/2 window only once a quarter of it is free, so that
        // acks arriving one by one do not each cost a write system call.
        let refill_at = if self.rate.is_none() && qos != QoS::AtMostOnce {
            window.div_ceil(4)
        } else {
            1
        };
        tokio::time::sleep_until(sched.t0.into()).await;
        // One timer, re-armed only when the wake-up instant changes.
        let mut armed = sched.window_end;
        let timer = tokio::time::sleep_until(armed.into());
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            if now >= sched.hard_deadline {
                return Ok(());
            }
            let publishing = now < sched.window_end;
            let mut wake = if publishing {
                sched.window_end
            } else {
                sched.hard_deadline
            };
            if publishing {
                let room = window - *inflight;
                let want = match self.rate {
                    None if out.len() < LOW_WATER => (HIGH_WATER - out.len()) / template.len() + 1,
                    None => 0,
                    Some(rate) => {
                        let elapsed = now.saturating_duration_since(sched.t0).as_secs_f64();
                        let due = (elapsed * rate) as u64 + 1;
                        usize::try_from(due.saturating_sub(r.sent)).unwrap_or(usize::MAX)
                    }
                };
                let n = if room >= refill_at { want.min(room) } else { 0 };
                if n > 0 {
                    let sent_ns = ns_of(now);
                    let in_window = now >= sched.window_start;
                    for _ in 0..n {
                        let pid = if qos == QoS::AtMostOnce {
                            0
                        } else {
                            loop {
                                *next_pid = next_pid.checked_add(1).unwrap_or(1);
                                if pid_state[usize::from(*next_pid)] == PID_FREE {
                                    break;
                                }
                            }
                            pid_state[usize::from(*next_pid)] = PID_SENT;
                            unacked.insert(*next_pid, (r.sent, sent_ns));
                            *inflight += 1;
                            *next_pid
                        };
                        let header = PayloadHeader {
                            publisher: self.id,
                            seq: r.sent,
                            sent_ns,
                        };
                        template.append(&mut out, pid, &header);
                        r.sent += 1;
                        if in_window {
                            r.sent_in_window += 1;
                        }
                    }
                }
                if let Some(rate) = self.rate {
                    if *inflight < window {
                        let next = sched.t0 + Duration::from_secs_f64(r.sent as f64 / rate);
                        wake = wake.min(next);
                    }
                }
            } else if out.is_empty() && *inflight == 0 {
                return Ok(());
            }

            if inbuf.capacity() - inbuf.len() < READ_RESERVE / 4 {
                inbuf.reserve(READ_RESERVE);
            }
            if wake != armed {
                armed = wake;
                timer.as_mut().reset(wake.into());
            }
            tokio::select! {
                res = rd.read_buf(inbuf) => {
                    match res {
                        Ok(0) => return Err(lost("connection closed by the broker")),
                        Ok(_) => {}
                        Err(e) => return Err(lost(format!("read: {e}"))),
                    }
                    while let Some(packet) = decode(inbuf, &ctx)? {
                        match packet {
                            Packet::PubAck(ack) if qos == QoS::AtLeastOnce => {
                                let state = &mut pid_state[usize::from(ack.packet_id)];
                                if *state != PID_SENT {
                                    bail!("PUBACK for unknown packet id {}", ack.packet_id);
                                }
                                *state = PID_FREE;
                                unacked.remove(&ack.packet_id);
                                *inflight -= 1;
                                if ack.reason.is_error() {
                                    r.rejected += 1;
                                } else {
                                    r.acked += 1;
                                }
                            }
                            Packet::PubRec(ack) if qos == QoS::ExactlyOnce => {
                                let state = &mut pid_state[usize::from(ack.packet_id)];
                                match *state {
                                    PID_SENT if ack.reason.is_error() => {
                                        *state = PID_FREE;
                                        unacked.remove(&ack.packet_id);
                                        *inflight -= 1;
                                        r.rejected += 1;
                                    }
                                    PID_SENT | PID_RELEASED => {
                                        *state = PID_RELEASED;
                                        unacked.remove(&ack.packet_id);
                                        encode_ack(Packet::PubRel, ack.packet_id, version, &mut out)?;
                                    }
                                    _ => bail!("PUBREC for unknown packet id {}", ack.packet_id),
                                }
                            }
                            Packet::PubComp(ack) if qos == QoS::ExactlyOnce => {
                                let state = &mut pid_state[usize::from(ack.packet_id)];
                                if *state != PID_RELEASED {
                                    bail!("PUBCOMP for unknown packet id {}", ack.packet_id);
                                }
                                *state = PID_FREE;
                                *inflight -= 1;
                                r.acked += 1;
                            }
                            Packet::Disconnect(d) => {
                                return Err(lost(format!("broker sent DISCONNECT {:#04x}", d.reason.0)));
                            }
                            Packet::PingResp => {}
                            other => bail!("unexpected packet for a publisher: {other:?}"),
                        }
                    }
                }
                res = wr.write(&out), if !out.is_empty() => {
                    let n = res.map_err(|e| lost(format!("write: {e}")))?;
                    out.advance(n);
                }
                () = &mut timer => {}
            }
        }
    }
}

/// Outcome of one subscriber.
struct SubResult {
    deliveries: Deliveries,
    received_in_window: u64,
    latency: Histogram<u64>,
    error: Option<String>,
}

struct SubTask {
    conn: Conn,
    sched: Schedule,
    unique_total: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

impl SubTask {
    async fn run(mut self) -> SubResult {
        let mut result = SubResult {
            deliveries: Deliveries::default(),
            received_in_window: 0,
            latency: new_histogram(),
            error: None,
        };
        if let Err(e) = self.receive(&mut result).await {
            result.error = Some(format!("{e:#}"));
        }
        if result.error.is_none() {
            self.conn.disconnect().await;
        }
        result
    }

    async fn receive(&mut self, r: &mut SubResult) -> Result<()> {
        let sched = self.sched;
        let version = self.conn.version;
        let ctx = client_context(version);
        let Conn { stream, inbuf, .. } = &mut self.conn;
        let (mut rd, mut wr) = stream.split();
        let mut out = BytesMut::with_capacity(4096);
        // QoS 2 packet ids received but not yet released: a PUBLISH that reuses one is the
        // same message again and must not count as a delivery [MQTT-4.3.3].
        let mut awaiting_rel = vec![0u64; 1024];
        let stop = &mut self.stop;
        loop {
            if inbuf.capacity() - inbuf.len() < READ_RESERVE / 4 {
                inbuf.reserve(READ_RESERVE);
            }
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                res = rd.read_buf(inbuf) => {
                    if res? == 0 {
                        bail!("connection closed by the broker");
                    }
                    let now = Instant::now();
                    let now_ns = ns_of(now);
                    let in_window = now >= sched.window_start && now < sched.window_end;
                    let mut new_unique = 0;
                    while let Some(packet) = decode(inbuf, &ctx)? {
                        match packet {
                            Packet::Publish(p) => {
                                match (p.qos, p.packet_id) {
                                    (QoS::AtLeastOnce, Some(id)) => {
                                        encode_ack(Packet::PubAck, id, version, &mut out)?;
                                    }
                                    (QoS::ExactlyOnce, Some(id)) => {
                                        encode_ack(Packet::PubRec, id, version, &mut out)?;
                                        let (word, bit) = (usize::from(id / 64), 1u64 << (id % 64));
                                        if awaiting_rel[word] & bit != 0 {
                                            continue;
                                        }
                                        awaiting_rel[word] |= bit;
                                    }
                                    _ => {}
                                }
                                let Some(h) = PayloadHeader::parse(&p.payload) else {
                                    r.deliveries.foreign += 1;
                                    continue;
                                };
                                if r.deliveries.record(h.publisher, h.seq) {
                                    new_unique += 1;
                                }
                                if in_window {
                                    r.received_in_window += 1;
                                    r.latency.saturating_record(now_ns.saturating_sub(h.sent_ns).max(1));
                                }
                            }
                            Packet::PubRel(rel) => {
                                let id = rel.packet_id;
                                awaiting_rel[usize::from(id / 64)] &= !(1u64 << (id % 64));
                                encode_ack(Packet::PubComp, id, version, &mut out)?;
                            }
                            Packet::Disconnect(d) => {
                                bail!("broker sent DISCONNECT {:#04x}", d.reason.0)
                            }
                            Packet::PingResp => {}
                            other => bail!("unexpected packet for a subscriber: {other:?}"),
                        }
                    }
                    if new_unique > 0 {
                        self.unique_total.fetch_add(new_unique, Ordering::Relaxed);
                    }
                }
                res = wr.write(&out), if !out.is_empty() => {
                    let n = res?;
                    out.advance(n);
                }
            }
        }
    }
}

async fn run_conns(params: Params, addr: SocketAddr) -> Result<Report> {
    let run_start = CpuSample::now();
    let version = version_of(&params.mqtt_version)?;
    let count = params.connections;
    let keep_alive = params.keep_alive;
    let mut errors = Errors::default();
    // `--connect-concurrency` connectors, each opening connections one after another until
    // all are open: no task spawned and no permit handed over per connection, so the tool's
    // own scheduling does not pace the connects (a spawner on the runtime's main thread,
    // waking for every released permit, waited up to 5 ms for a CPU while the brokers ran).
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    let start = Instant::now();
    for _ in 0..params.connect_concurrency.clamp(1, count.max(1)) {
        let next = Arc::clone(&next);
        let run_id = params.run_id.clone();
        set.spawn(async move {
            let mut opened = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break opened;
                }
                let id = format!("hb-{run_id}-c{i}");
                let began = Instant::now();
                let result = Conn::connect(addr, version, &id, keep_alive, Duration::from_secs(10))
                    .await
                    .map(|mut conn| {
                        // Keep only the socket while holding.
                        conn.inbuf = BytesMut::new();
                        conn
                    });
                opened.push((result, began.elapsed()));
            }
        });
    }
    let mut conns = Vec::with_capacity(count);
    let mut latency = new_histogram();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(opened) => {
                for (result, took) in opened {
                    match result {
                        Ok(conn) => {
                            conns.push(conn);
                            latency.saturating_record(
                                u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                            );
                        }
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
            }
            Err(e) => errors.push(format!("connect task: {e}")),
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    let connect_cpu = CpuSample::now().since(&run_start);
    let connected = conns.len();
    eprintln!(
        "halyard-bench: holding {connected} connections for {} s",
        params.hold_s
    );
    tokio::time::sleep(Duration::from_secs_f64(params.hold_s)).await;

    // A connection the broker closed reads as end-of-file (or an error) without blocking.
    let mut closed = 0;
    let mut probe = [0u8; 64];
    for conn in &conns {
        match conn.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
    }
    let mut disconnect = BytesMut::new();
    encode_into(
        &Packet::Disconnect(halyard_codec::Disconnect::default()),
        version,
        &mut disconnect,
    )?;
    for conn in conns {
        let _ = conn.stream.try_write(&disconnect);
        // Closed with a reset, not a FIN: a FIN would leave each of our ports in TIME_WAIT
        // for a minute, and 10,000 of those slow down the port search of every connect of the
        // next run, whichever broker it measures.
        let _ = conn.stream.set_zero_linger();
    }

    let mut report = Report::empty(
        params,
        ToolCpu {
            window: connect_cpu,
            run: CpuSample::now().since(&run_start),
            available_cpus: available_cpus(),
        },
    );
    report.connections = Some(count);
    report.connected = Some(connected);
    report.connect_s = Some((connect_s * 1000.0).round() / 1000.0);
    report.connects_per_s = Some(round1(connected as f64 / connect_s.max(1e-9)));
    report.connect_latency_us = LatencyReport::from_ns(&latency);
    report.closed_during_hold = Some(closed);
    report.error_count = errors.count;
    report.errors = errors.first;
    Ok(report)
}
