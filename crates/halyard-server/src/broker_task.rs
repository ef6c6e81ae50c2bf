//! The task that owns the [`Broker`]: the only place the core runs, so the core needs no lock.

use std::future::pending;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_core::store::StoreError;
use halyard_core::{Broker, DropReport};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::blocking::blocking;
use crate::cluster::ClusterDriver;
use crate::connection_log::ConnectionLog;
use crate::disk_probe::DiskFullProbe;
use crate::dispatch::{Dispatcher, SWEEP_SLICES};
use crate::event::Event;
use crate::inbound_budget::InboundBudget;
use crate::metrics::Metrics;
use crate::pacing::Pacing;
use crate::park::Parker;
use halyard_core::sys::{SysTopics, SysTraffic};

/// Events handled after one wake-up before outputs are dispatched: batching events lets one
/// drain coalesce more packets per connection and lets more messages share one store commit
/// (fsync); bounding it keeps the first event's latency low.
const MAX_EVENTS_PER_DRAIN: usize = 256;

/// PUBLISH packets one turn takes from the main lane while QoS 1/2 deliveries are held
/// (issue 14). A subscriber gets at most its in-flight window per turn, and its next window
/// only after the turn's outputs are dispatched and its acknowledgements come back; a turn
/// that took 256 events of intake (each a read of up to ~50 small publishes) starved it. So
/// once a turn has taken this many publishes, it takes only acknowledgements, and the rest
/// of the intake waits for the next turn: intake gets a bounded share of each turn (while a
/// deep queue fills it still takes about twice what is delivered; BENCHMARKS.md). Without held deliveries (QoS 0, or
/// nothing backlogged), or once the turn has writes to commit (persistent sessions: the
/// fsync is shared by the whole turn), a turn still takes up to [`MAX_EVENTS_PER_DRAIN`]
/// events.
const MAX_PUBLISHES_PER_TURN_WITH_DELIVERIES_HELD: usize = 64;

/// Longest time without a store commit, so interval durability holds on an idle broker.
const IDLE_COMMIT_PERIOD: Duration = Duration::from_millis(100);

/// The broker task's event channels: acknowledgements first, so that delivery is not
/// starved by intake (see [`crate::event::takes_ack_lane`]).
#[derive(Debug)]
pub(crate) struct Lanes {
    /// Events of acknowledgements and PINGREQ only.
    pub(crate) acks: mpsc::Receiver<Event>,
    /// Everything else.
    pub(crate) main: mpsc::Receiver<Event>,
}

impl Lanes {
    /// The next event waiting, from the acknowledgement lane first.
    fn try_recv(&mut self) -> Option<Event> {
        self.acks.try_recv().or_else(|_| self.main.try_recv()).ok()
    }
}

/// Operations settings of the broker task (issue 5).
#[derive(Debug, Default)]
pub(crate) struct TaskOps {
    /// Where traffic is counted.
    pub(crate) metrics: Arc<Metrics>,
    /// Period of `$SYS/broker/...` publication; `None` = off.
    pub(crate) sys_interval: Option<std::time::Duration>,
    /// The broker task's own event channel, for writers to report [`Event::Written`]; weak,
    /// so that it is not what keeps the channel open. (With parking, the parker keeps a
    /// sender for resumed connections; the task ends on its stop signal either way.)
    pub(crate) written: Option<mpsc::WeakSender<Event>>,
    /// Where idle connections park; `None` = they never park.
    pub(crate) parker: Option<Arc<Parker>>,
    /// This node's cluster, if it is one.
    pub(crate) cluster: Option<ClusterDriver<Event>>,
    /// See [`crate::ServerConfig::log_connections`].
    pub(crate) log_connections: bool,
    /// The event channel's byte bound, given back to as events are handled.
    pub(crate) inbound: Arc<InboundBudget>,
    /// See [`crate::ServerConfig::memory_budget`].
    pub(crate) memory_budget: usize,
}

/// Runs the broker until `stop` fires (or the server is dropped), then shuts it down and
/// dispatches its goodbyes. Each batch of events is committed to the store before its
/// packets are dispatched, so no acknowledgement leaves before the state it confirms is
/// durable. A commit that fails for want of space degrades the broker (see
/// [`DiskFullProbe`]); any other failed commit ends the task with the error, and the batch's
/// packets are never sent.
pub(crate) async fn run(
    mut broker: Broker,
    lanes: Lanes,
    mut stop: oneshot::Receiver<()>,
    max_outbound_buffer: usize,
    ops: TaskOps,
) -> Result<(), StoreError> {
    let mut lanes = lanes;
    let mut dispatcher = Dispatcher::new(max_outbound_buffer);
    dispatcher.metrics = Arc::clone(&ops.metrics);
    dispatcher.written = ops.written;
    dispatcher.inbound = Arc::clone(&ops.inbound);
    dispatcher.pacing = Pacing::new(
        ops.memory_budget,
        ops.inbound.total(),
        ops.metrics.paced_seconds.clone(),
    );
    dispatcher.log = ConnectionLog::new(ops.log_connections);
    let mut sys = ops
        .sys_interval
        .map(|interval| SysTopics::new(interval, Instant::now()));
    // Commits also run on an idle tick: with `fsync = "interval"` the store makes earlier
    // non-durable commits durable on a later commit, which must come even without traffic.
    let mut idle_commit = tokio::time::interval(IDLE_COMMIT_PERIOD);
    idle_commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Drops are logged when they first happen, then at most once per period.
    let mut drops_logged: Option<Instant> = None;
    dispatcher.parker = ops.parker;
    dispatcher.cluster = ops.cluster;
    let mut disk_probe = DiskFullProbe::default();
    let mut park_sweep = dispatcher.parker.as_ref().map(|parker| {
        let mut sweep = tokio::time::interval(parker.after / SWEEP_SLICES);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep
    });
    // Set after a wake-up that took acknowledgements only while publishes wait: the next one
    // takes those first, so that a steady stream of acknowledgements cannot starve intake.
    let mut intake_next = false;
    loop {
        let deadline = broker.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        let sys_due = sys.as_ref().map(SysTopics::poll_timeout);
        let sys_timer = async {
            match sys_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        let probe_due = disk_probe.due(&broker);
        let probe_timer = async {
            match probe_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        // Set when this wake-up took events with PUBLISH packets: their latency is measured.
        let mut publishes_since = None;
        // Set when this wake-up took a full drain of events: the broker is saturated.
        let mut saturated = false;
        // Whether this wake-up takes acknowledgements only (see `drain`).
        let mut acks_only = false;
        tokio::select! {
            biased;
            _ = &mut stop => break,
            // The lane's senders live as long as the server: it never ends the task.
            Some(event) = lanes.acks.recv(), if !intake_next => {
                acks_only = true;
                (publishes_since, saturated) =
                    drain(&mut dispatcher, &mut broker, &mut lanes, event, acks_only);
            }
            event = lanes.main.recv() => {
                let Some(event) = event else { break };
                (publishes_since, saturated) =
                    drain(&mut dispatcher, &mut broker, &mut lanes, event, false);
            }
            () = timer => broker.handle_timeout(Instant::now()),
            () = sys_timer => {
                if let Some(sys) = sys.as_mut() {
                    let metrics = &dispatcher.metrics;
                    let traffic = SysTraffic {
                        bytes_received: metrics.bytes_received.get(),
                        bytes_sent: metrics.bytes_sent.get(),
                        connections: metrics.connections_accepted.get(),
                    };
                    sys.handle_timeout(&mut broker, Instant::now(), traffic);
                }
            }
            _ = idle_commit.tick() => {}
            () = probe_timer => disk_probe.probe(&mut broker)?,
            _ = async {
                match park_sweep.as_mut() {
                    Some(sweep) => sweep.tick().await,
                    None => pending().await,
                }
            } => dispatcher.sweep_idle(),
        }
        // Main only ever grows from elsewhere: while it is not empty, its branch is ready.
        intake_next = acks_only && broker.held_messages() > 0 && !lanes.main.is_empty();
        commit(&mut broker, &mut disk_probe)?;
        dispatcher.committed(&mut broker);
        broker.take_outputs_with(|outputs| dispatcher.dispatch(outputs));
        dispatcher.report_congested(&mut broker);
        dispatcher.update_memory(broker.held_bytes());
        if broker.has_drops_to_report()
            && drops_logged.is_none_or(|at| at.elapsed() >= DROP_LOG_PERIOD)
        {
            log_drops(&broker.take_drop_report());
            drops_logged = Some(Instant::now());
        }
        if let Some(since) = publishes_since {
            dispatcher.metrics.observe_publish_latency(since.elapsed());
        }
        if saturated {
            // Saturated, the broker task would keep its worker thread to itself: let the
            // connection tasks queued behind it on this worker (writers draining what it just
            // dispatched) run first, or the slow-consumer rule drops QoS 0 for want of a turn.
            tokio::task::yield_now().await;
        }
    }
    broker.shutdown(Instant::now());
    commit(&mut broker, &mut disk_probe)?;
    broker.take_outputs_with(|outputs| dispatcher.dispatch(outputs));
    info!(dropped_qos0 = dispatcher.dropped_qos0, "broker stopped");
    Ok(())
}

/// Handles `first` and what else is waiting, up to [`MAX_EVENTS_PER_DRAIN`], taking the
/// acknowledgement lane first each time. While deliveries are held and the turn has nothing
/// to commit (short turns are cheap; a turn with writes shares one commit, an fsync, with as
/// many events as possible, as before), the turn is kept short for the subscribers: with
/// `acks_only` (a wake-up by acknowledgements) it takes only that lane, so the deliveries
/// they free go out at once instead of after a share of intake (the next wake-up takes the
/// intake); otherwise it takes only acknowledgements once it took
/// [`MAX_PUBLISHES_PER_TURN_WITH_DELIVERIES_HELD`] publishes. Returns when the batch began
/// if it held a PUBLISH, and whether events were left waiting (the broker is saturated).
fn drain(
    dispatcher: &mut Dispatcher,
    broker: &mut Broker,
    lanes: &mut Lanes,
    first: Event,
    acks_only: bool,
) -> (Option<Instant>, bool) {
    let now = Instant::now();
    let mut publishes = dispatcher.handle(broker, now, first);
    for _ in 1..MAX_EVENTS_PER_DRAIN {
        let short_turn = broker.held_messages() > 0 && !broker.commit_may_block();
        let intake_done =
            short_turn && (acks_only || publishes >= MAX_PUBLISHES_PER_TURN_WITH_DELIVERIES_HELD);
        let event = if intake_done {
            lanes.acks.try_recv().ok()
        } else {
            lanes.try_recv()
        };
        match event {
            Some(event) => publishes += dispatcher.handle(broker, now, event),
            None => {
                let saturated = intake_done && !acks_only && !lanes.main.is_empty();
                return ((publishes > 0).then_some(now), saturated);
            }
        }
    }
    ((publishes > 0).then_some(now), true)
}

/// How often messages dropped for full queues are logged: one line per client and reason
/// per period, however many were dropped (the first drops are logged at once).
const DROP_LOG_PERIOD: Duration = Duration::from_secs(10);

fn log_drops(report: &DropReport) {
    for (client_id, reason, count) in &report.clients {
        warn!(
            client_id = %client_id,
            reason = reason.label(),
            dropped = count,
            "messages dropped for a full queue (queue_full_policy)"
        );
    }
    if report.others > 0 {
        warn!(
            dropped = report.others,
            "messages dropped for full queues of further clients"
        );
    }
}

/// Commits the broker's journal. The commit may wait for an fsync; on a multi-threaded
/// runtime the worker is handed over meanwhile so connection tasks keep running. Events
/// arriving during the fsync form the next batch: that is the group commit. A commit that
/// found the disk full degrades the broker, which withholds the batch's acknowledgements.
fn commit(broker: &mut Broker, disk_probe: &mut DiskFullProbe) -> Result<(), StoreError> {
    let may_block = broker.commit_may_block();
    match blocking(may_block, || broker.commit()) {
        Ok(()) => Ok(()),
        Err(error) if error.is_no_space() => {
            if broker.handle_disk_full(Instant::now()) {
                disk_probe.start();
                error!(
                    %error,
                    "the data directory is full: degraded until space is freed (QoS 1/2 publishes \
                     and new persistent sessions are refused; QoS 0 and clean sessions are served; \
                     nothing unstored is acknowledged)"
                );
            }
            Ok(())
        }
        Err(error) => {
            error!(%error, "commit failed; stopping without sending the uncommitted acknowledgements");
            Err(error)
        }
    }
}
