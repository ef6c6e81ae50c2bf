//! Peer link tests: two link endpoints on 127.0.0.1 ephemeral ports, no raft.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;
use crate::acceptor::{self, Acceptor};
use crate::transport::{TcpIncoming, TcpTransport};

const PATIENCE: Duration = Duration::from_secs(10);

struct LinkNode {
    link: PeerLink,
    receivers: LinkReceivers,
    counters: Arc<Counters>,
    acceptor: JoinHandle<()>,
}

fn local(id: NodeId) -> LocalNode {
    LocalNode {
        id,
        incarnation: 1000 + id,
    }
}

fn serve(
    listener: TcpListener,
    id: NodeId,
    inbound: LinkInbound,
    counters: Arc<Counters>,
) -> JoinHandle<()> {
    let acceptor = Arc::new(Acceptor {
        local: local(id),
        raft: None,
        link: Some(inbound),
        counters,
        consumption: Default::default(),
        lease: Arc::new(crate::lease::Lease::new(Duration::from_secs(1), 2)),
    });
    tokio::spawn(acceptor::run(Box::new(TcpIncoming(listener)), acceptor))
}

async fn start(id: NodeId, addr: SocketAddr, peers: &[String], capacity: usize) -> LinkNode {
    let listener = TcpListener::bind(addr).await.expect("bind");
    let counters = Arc::new(Counters::default());
    let (link, receivers) = PeerLink::start(
        local(id),
        peers,
        capacity,
        counters.clone(),
        Arc::new(TcpTransport),
    );
    let acceptor = serve(listener, id, link.inbound(), counters.clone());
    LinkNode {
        link,
        receivers,
        counters,
        acceptor,
    }
}

/// Two free addresses (bound, then released for the nodes to bind).
fn two_addrs() -> (Vec<SocketAddr>, Vec<String>) {
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let peers = addrs.iter().map(ToString::to_string).collect();
    (addrs, peers)
}

fn payload(seq: u64) -> Bytes {
    Bytes::from(format!("publish {seq}"))
}

async fn receive(node: &mut LinkNode) -> Delivery {
    tokio::time::timeout(PATIENCE, node.receivers.deliveries.recv())
        .await
        .expect("a delivery arrives")
        .expect("link open")
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(PATIENCE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arrive_in_order_and_acks_flow_back() {
    let (addrs, peers) = two_addrs();
    let sender = start(1, addrs[0], &peers, 100).await;
    let mut receiver = start(2, addrs[1], &peers, 100).await;
    for seq in 1..=50 {
        sender.link.send(2, seq, payload(seq)).expect("queued");
    }
    for seq in 1..=50 {
        let delivery = receive(&mut receiver).await;
        assert_eq!(
            (delivery.origin, delivery.origin_incarnation, delivery.seq),
            (1, 1001, seq)
        );
        assert_eq!(delivery.payload, payload(seq));
    }
    receiver.link.ack(1, 50);
    let mut sender = sender;
    let acked = tokio::time::timeout(PATIENCE, sender.receivers.acked.recv())
        .await
        .expect("ack arrives")
        .expect("open");
    assert_eq!(acked, Acked { dest: 2, seq: 50 });
    assert_eq!(sender.link.status()[0].unacked, 0);
    assert_eq!(sender.counters.link_queued.load(Ordering::Relaxed), 0);
    assert_eq!(receiver.counters.link_delivered.load(Ordering::Relaxed), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_after_a_forced_reconnect_are_dropped() {
    let (addrs, peers) = two_addrs();
    let sender = start(1, addrs[0], &peers, 100).await;
    let mut receiver = start(2, addrs[1], &peers, 100).await;
    for seq in 1..=10 {
        sender.link.send(2, seq, payload(seq)).expect("queued");
    }
    for seq in 1..=10 {
        assert_eq!(receive(&mut receiver).await.seq, seq);
    }
    // Cut every connection (nothing was acked), then serve again with the same marks.
    receiver.acceptor.abort();
    let _ = (&mut receiver.acceptor).await;
    let listener = TcpListener::bind(addrs[1]).await.expect("rebind");
    receiver.acceptor = serve(
        listener,
        2,
        receiver.link.inbound(),
        receiver.counters.clone(),
    );
    let counters = receiver.counters.clone();
    wait_until("the sender re-sent all ten", || {
        counters.link_duplicates.load(Ordering::Relaxed) == 10
    })
    .await;
    assert!(sender.counters.link_resent.load(Ordering::Relaxed) >= 10);
    sender.link.send(2, 11, payload(11)).expect("queued");
    assert_eq!(
        receive(&mut receiver).await.seq,
        11,
        "only the new frame is delivered"
    );
    receiver.link.ack(1, 11);
    let link = &sender.link;
    wait_until("everything acked", || link.status()[0].unacked == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_frames_are_resent_after_the_receiver_restarts() {
    let (addrs, peers) = two_addrs();
    let mut sender = start(1, addrs[0], &peers, 100).await;
    let mut receiver = start(2, addrs[1], &peers, 100).await;
    for seq in 1..=5 {
        sender.link.send(2, seq, payload(seq)).expect("queued");
    }
    for seq in 1..=5 {
        assert_eq!(receive(&mut receiver).await.seq, seq);
    }
    receiver.link.ack(1, 3);
    let acked = tokio::time::timeout(PATIENCE, sender.receivers.acked.recv())
        .await
        .expect("ack arrives")
        .expect("open");
    assert_eq!(acked.seq, 3);
    receiver.acceptor.abort();
    let _ = (&mut receiver.acceptor).await;
    drop(receiver);
    let mut restarted = start(2, addrs[1], &peers, 100).await;
    assert_eq!(receive(&mut restarted).await.seq, 4);
    assert_eq!(receive(&mut restarted).await.seq, 5);
    assert!(
        tokio::time::timeout(
            Duration::from_millis(200),
            restarted.receivers.deliveries.recv()
        )
        .await
        .is_err(),
        "acked frames are not re-sent"
    );
    assert_eq!(sender.link.status()[0].unacked, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_says_queue_full_past_capacity() {
    let (_addrs, peers) = two_addrs();
    let counters = Arc::new(Counters::default());
    // Node 2 never starts: nothing is acknowledged.
    let (link, _receivers) = PeerLink::start(
        local(1),
        &peers,
        3,
        counters.clone(),
        Arc::new(TcpTransport),
    );
    for seq in 1..=3 {
        link.send(2, seq, payload(seq)).expect("within capacity");
    }
    assert_eq!(link.send(2, 4, payload(4)), Err(ClusterError::QueueFull(2)));
    assert_eq!(counters.link_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(
        link.send(2, 2, payload(2)),
        Err(ClusterError::SeqNotIncreasing { dest: 2, seq: 2 })
    );
    assert_eq!(
        link.send(9, 1, payload(1)),
        Err(ClusterError::UnknownNode(9))
    );
    assert_eq!(link.status()[0].unacked, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_closes_its_connection_and_is_counted() {
    let (addrs, peers) = two_addrs();
    let mut receiver = start(2, addrs[1], &peers, 100).await;
    let stream = tokio::net::TcpStream::connect(addrs[1])
        .await
        .expect("connect");
    let mut raw = crate::frame::framed(Box::new(stream));
    raw.send(Bytes::from_static(b"\xff\xff\xff\xff\xff\xff\xff"))
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, raw.get_mut().read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the acceptor closed the connection"
    );
    assert_eq!(receiver.counters.bad_frames.load(Ordering::Relaxed), 1);

    // A well-behaved peer is still served.
    let sender = start(1, addrs[0], &peers, 100).await;
    sender.link.send(2, 1, payload(1)).expect("queued");
    assert_eq!(receive(&mut receiver).await.seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_high_water_mark_drops_and_acks_what_the_app_already_stored() {
    let (addrs, peers) = two_addrs();
    let mut receiver = start(2, addrs[1], &peers, 100).await;
    receiver.link.seed_high_water(1, local(1).incarnation, 5);
    let mut sender = start(1, addrs[0], &peers, 100).await;
    for seq in 1..=7 {
        sender.link.send(2, seq, payload(seq)).expect("queued");
    }
    assert_eq!(receive(&mut receiver).await.seq, 6);
    assert_eq!(receive(&mut receiver).await.seq, 7);
    assert_eq!(receiver.counters.link_duplicates.load(Ordering::Relaxed), 5);
    let acked = tokio::time::timeout(PATIENCE, sender.receivers.acked.recv())
        .await
        .expect("the seeded mark is acknowledged")
        .expect("open");
    assert_eq!(acked, Acked { dest: 2, seq: 5 });
    let link = &sender.link;
    wait_until("1 to 5 acknowledged", || link.status()[0].unacked == 2).await;
}
