//! Waits until every reachable voter has applied a log index.
//!
//! The broker answers a SUBACK once the subscription's route is committed; waiting until
//! every voter has applied it means a publish made after the SUBACK on any node sees the
//! route. Peers are asked over the cluster port (`WaitApplied`): each answers once it has
//! applied the index or its own wait ran out. A peer is skipped (and counted) only once it
//! has been out of contact for longer than its lease plus [`LEASE_LAPSE_MARGIN`]: by then it
//! has fenced itself (see the lease module) and acknowledges no publish with its old routes,
//! or it is dead and publishes nothing. Skipped any earlier, a peer cut from the quorum
//! would still take publishes that miss the new route. Once skipped, a peer is probed in the
//! background and waited for again as soon as it answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::RaftMetrics;
use tokio::time::Instant;

use crate::consumption::Consumption;
use crate::error::ClusterError;
use crate::frame::{RaftReply, RaftRequest};
use crate::membership;
use crate::metrics::{bump, Counters};
use crate::peer_client::{LocalNode, PeerClient};
use crate::raft_types::{NodeInfo, Raft};
use crate::transport::Transport;
use crate::types::NodeId;

/// Pause before asking a peer again after a failed call.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Failures further apart than this do not make one period out of contact: the peer may
/// have been reachable (and renewed its lease) in between. A failed call that started
/// within the period continues it, however long it took: it was trying all along.
const CONTACT_GAP: Duration = Duration::from_millis(100);

/// Longest call of the background probe of a skipped peer: a SUBACK that finds the probe's
/// call under way waits for it.
const PROBE_LIMIT: Duration = Duration::from_millis(200);

/// Time beyond a peer's lease before it counts as fenced: its link delay, clock drift and
/// the time it takes to act on the lapse (the margin the lease keeps below the takeover
/// timeout).
const LEASE_LAPSE_MARGIN: Duration = Duration::from_millis(500);

/// Longest wait a peer's `WaitApplied` may ask of this node (the value comes off the wire).
const MAX_SERVED_WAIT: Duration = Duration::from_secs(60);

/// Every other voter of this node, as the applied-index waiter sees them.
pub(crate) struct AppliedEverywhere {
    local: LocalNode,
    raft: Raft,
    consumption: Consumption,
    counters: Arc<Counters>,
    transport: Arc<dyn Transport>,
    /// The `peers` list, for the addresses of voters the membership does not name yet.
    addrs: Vec<String>,
    /// Made on first use, so that a voter added at run time is waited for too.
    peers: Mutex<BTreeMap<NodeId, Arc<Peer>>>,
    /// How long out of contact a peer must be before it is skipped: its lease plus
    /// [`LEASE_LAPSE_MARGIN`].
    skip_after: Duration,
}

/// One peer: its own connection (so waits never queue behind raft or proposals), the
/// highest applied index it reported, and since when it has been unreachable.
struct Peer {
    client: tokio::sync::Mutex<PeerClient>,
    applied: AtomicU64,
    unreachable: Mutex<OutOfContact>,
    /// The last call found another incarnation at this id (a node back with an empty data
    /// directory, fenced until an operator removes it): it serves no client as this member,
    /// so it is skipped at once.
    stale: AtomicBool,
    /// A background probe (see [`AppliedEverywhere::skip`]) is running.
    probing: AtomicBool,
}

impl Peer {
    fn lock_unreachable(&self) -> std::sync::MutexGuard<'_, OutOfContact> {
        self.unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        self.lock_unreachable().duration(now)
    }

    /// Records the result of one call that started at `started`.
    fn record(&self, started: Instant, reply: Option<u64>) {
        let now = Instant::now();
        match reply {
            Some(applied) => {
                self.applied.fetch_max(applied, Ordering::Relaxed);
                self.lock_unreachable().reached();
            }
            None => self.lock_unreachable().failed(started, now),
        }
    }

    /// Asks the peer to answer once it has applied `index`, waiting at most half of
    /// `limit` there; `None` when it could not be reached within `limit`.
    async fn ask(&self, client: &mut PeerClient, index: u64, limit: Duration) -> Option<u64> {
        let started = Instant::now();
        let request = RaftRequest::WaitApplied {
            index,
            wait_ms: u64::try_from((limit / 2).as_millis()).unwrap_or(u64::MAX),
        };
        let reply = match client.call(&request, limit).await {
            Ok(RaftReply::Applied(applied)) => Some(applied),
            Ok(other) => {
                tracing::warn!(peer = client.target(), ?other, "reply of the wrong kind");
                None
            }
            Err(error) => {
                let stale = error.kind() == std::io::ErrorKind::PermissionDenied;
                self.stale.store(stale, Ordering::Relaxed);
                None
            }
        };
        if reply.is_some() {
            self.stale.store(false, Ordering::Relaxed);
        }
        self.record(started, reply);
        reply
    }
}

/// A peer's current period out of contact: the (first, latest) failed call, as observed.
#[derive(Debug, Default)]
struct OutOfContact(Option<(Instant, Instant)>);

impl OutOfContact {
    /// A call that started at `started` failed, observed at `now`. A new period starts at
    /// the failure, not when the failed call started: the peer may have had the quorum until
    /// the failure. A call started while the period was on continues it.
    fn failed(&mut self, started: Instant, now: Instant) {
        let first = self
            .current(now)
            .or_else(|| self.current(started))
            .map_or(now, |(first, _)| first);
        self.0 = Some((first, now));
    }

    fn reached(&mut self) {
        self.0 = None;
    }

    /// The period, unless its latest failure is older than [`CONTACT_GAP`].
    fn current(&self, now: Instant) -> Option<(Instant, Instant)> {
        self.0
            .filter(|&(_, latest)| now.saturating_duration_since(latest) <= CONTACT_GAP)
    }

    /// How long the peer has been out of contact at `now`, if it still is.
    fn duration(&self, now: Instant) -> Option<Duration> {
        self.current(now)
            .map(|(first, _)| now.saturating_duration_since(first))
    }
}

impl AppliedEverywhere {
    pub(crate) fn new(
        local: LocalNode,
        peers: &[String],
        lease: Duration,
        raft: Raft,
        consumption: Consumption,
        counters: Arc<Counters>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            local,
            raft,
            consumption,
            counters,
            transport,
            addrs: peers.to_vec(),
            peers: Mutex::new(BTreeMap::new()),
            skip_after: lease + LEASE_LAPSE_MARGIN,
        }
    }

    /// The waiter's view of voter `id`, made on first use.
    fn peer(&self, id: NodeId) -> Result<Arc<Peer>, ClusterError> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(peer) = peers.get(&id) {
            return Ok(peer.clone());
        }
        let addr =
            membership::addr(&self.raft, &self.addrs, id).ok_or(ClusterError::UnknownNode(id))?;
        let client = PeerClient::new(
            self.local,
            id,
            addr,
            0,
            self.counters.clone(),
            self.transport.clone(),
        );
        let peer = Arc::new(Peer {
            client: tokio::sync::Mutex::new(client),
            applied: AtomicU64::new(0),
            unreachable: Mutex::new(OutOfContact::default()),
            stale: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        });
        peers.insert(id, peer.clone());
        Ok(peer)
    }

    /// Returns once this node and every reachable voter have applied `index`; `Timeout`
    /// when one of them (reachable, or this node) has not within `limit`.
    pub(crate) async fn wait(&self, index: u64, limit: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + limit;
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != self.local.id)
            .collect();
        let peers = voters
            .into_iter()
            .map(|id| self.wait_peer(id, index, deadline, self.skip_after));
        let (local, peers) = tokio::join!(
            wait_applied(&self.raft, &self.consumption, index, limit),
            futures_util::future::join_all(peers)
        );
        local?;
        peers.into_iter().collect()
    }

    async fn wait_peer(
        &self,
        id: NodeId,
        index: u64,
        deadline: Instant,
        skip_after: Duration,
    ) -> Result<(), ClusterError> {
        let peer = self.peer(id)?;
        let peer = &peer;
        loop {
            if peer.applied.load(Ordering::Relaxed) >= index {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClusterError::Timeout);
            }
            if peer.stale.load(Ordering::Relaxed) || peer.unreachable_for(now) >= Some(skip_after) {
                self.skip(id, peer, index);
                return Ok(());
            }
            let mut client = peer.client.lock().await;
            client.expect_incarnation(self.recorded_incarnation(id));
            // Another wait may have had its answer (or given up on the peer) meanwhile.
            let now = Instant::now();
            if peer.applied.load(Ordering::Relaxed) >= index
                || now >= deadline
                || peer.unreachable_for(now) >= Some(skip_after)
            {
                continue;
            }
            let limit = (deadline - now).min(skip_after);
            if peer.ask(&mut client, index, limit).await.is_none() {
                drop(client);
                tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(now))).await;
            }
        }
    }

    /// The incarnation the membership records for `id` (0: not announced yet).
    fn recorded_incarnation(&self, id: NodeId) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map_or(0, |node| node.incarnation)
    }

    /// Counts a skipped peer and, unless it is probed already, probes it in the background
    /// until it answers (or is no longer a voter), so that it is waited for again once it
    /// does, and so that, while it stays out of contact, its period goes on and later
    /// SUBACKs skip it at once instead of waiting out the lease again.
    fn skip(&self, id: NodeId, peer: &Arc<Peer>, index: u64) {
        bump(&self.counters.unreachable_peers_skipped);
        tracing::debug!(peer = id, index, "unreachable peer skipped");
        if peer.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let peer = Arc::clone(peer);
        let raft = self.raft.clone();
        tokio::spawn(async move {
            loop {
                let incarnation = {
                    let metrics = raft.metrics();
                    let metrics = metrics.borrow();
                    let membership = metrics.membership_config.membership();
                    if !membership.voter_ids().any(|voter| voter == id) {
                        break;
                    }
                    membership.get_node(&id).map_or(0, |node| node.incarnation)
                };
                let answered = {
                    let mut client = peer.client.lock().await;
                    client.expect_incarnation(incarnation);
                    peer.ask(&mut client, index, PROBE_LIMIT).await.is_some()
                };
                if answered {
                    break;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            peer.probing.store(false, Ordering::Release);
        });
    }
}

/// Waits until this node has applied `index` (and its app has taken it in, see
/// `consumption`).
pub(crate) async fn wait_applied(
    raft: &Raft,
    consumption: &Consumption,
    index: u64,
    limit: Duration,
) -> Result<(), ClusterError> {
    match applied_within(raft, consumption, index, limit).await? {
        applied if applied >= index => Ok(()),
        _ => Err(ClusterError::Timeout),
    }
}

/// The serving side of `WaitApplied`: this node's applied index once it reaches `index`,
/// or when `wait_ms` (capped) has passed.
pub(crate) async fn serve_wait_applied(
    raft: &Raft,
    consumption: &Consumption,
    index: u64,
    wait_ms: u64,
) -> Result<u64, ClusterError> {
    let limit = Duration::from_millis(wait_ms).min(MAX_SERVED_WAIT);
    applied_within(raft, consumption, index, limit).await
}

/// The applied index once it reaches `index` and the app has taken in every change up to
/// it, or when `limit` has passed, the applied index as it is (below `index` if the app
/// still lags).
async fn applied_within(
    raft: &Raft,
    consumption: &Consumption,
    index: u64,
    limit: Duration,
) -> Result<u64, ClusterError> {
    let started = Instant::now();
    let applied = raft_applied_within(raft, index, limit).await?;
    if applied < index {
        return Ok(applied);
    }
    let left = limit.saturating_sub(started.elapsed());
    if consumption.wait_caught_up(index, left).await {
        Ok(applied)
    } else {
        Ok(index - 1)
    }
}

/// Raft's applied index once it reaches `index`, or as it is when `limit` has passed.
async fn raft_applied_within(
    raft: &Raft,
    index: u64,
    limit: Duration,
) -> Result<u64, ClusterError> {
    let mut metrics = raft.metrics();
    let wait = async {
        loop {
            let applied = last_applied(&metrics.borrow_and_update());
            if applied >= index {
                return Ok(applied);
            }
            if metrics.changed().await.is_err() {
                return Err(ClusterError::Shutdown);
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(result) => result,
        Err(_) => Ok(last_applied(&raft.metrics().borrow())),
    }
}

fn last_applied(metrics: &RaftMetrics<NodeId, NodeInfo>) -> u64 {
    metrics.last_applied.map_or(0, |id| id.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn out_of_contact_counts_from_the_first_failure_of_a_dense_run() {
        let start = Instant::now();
        let mut period = OutOfContact::default();
        assert_eq!(period.duration(start), None);
        period.failed(start, start);
        period.failed(start + 10 * MS, start + 60 * MS);
        assert_eq!(period.duration(start + 80 * MS), Some(80 * MS));
        period.reached();
        assert_eq!(period.duration(start + 80 * MS), None, "a reply ends it");
    }

    #[test]
    fn an_old_failure_does_not_make_a_peer_out_of_contact_now() {
        // The peer may have been reachable (and renewed its lease) since: a failure seen
        // seconds ago must not get it skipped at once, or a node cut from the quorum again
        // would still take publishes with its old routes after the SUBACK.
        let start = Instant::now();
        let mut period = OutOfContact::default();
        period.failed(start, start);
        assert_eq!(period.duration(start + 3000 * MS), None);
        period.failed(start + 2000 * MS, start + 3000 * MS);
        assert_eq!(period.duration(start + 3050 * MS), Some(50 * MS));
    }

    #[test]
    fn a_long_failed_call_started_within_the_period_continues_it() {
        // A probe that tried all along (a peer whose packets are dropped, not refused)
        // saw no contact: the period goes on instead of starting again.
        let start = Instant::now();
        let mut period = OutOfContact::default();
        period.failed(start, start);
        period.failed(start + 20 * MS, start + 220 * MS);
        assert_eq!(period.duration(start + 250 * MS), Some(250 * MS));
    }
}
