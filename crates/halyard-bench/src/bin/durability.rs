//! `halyard-durability-bench`: the durable-state workloads of the persistence issue, as steps a
//! script can time and sample around (RSS, restart time):
//!
//! ```text
//! halyard-durability-bench fill    --port P --messages 1000000   # queue N QoS 1 messages for an offline persistent session
//! halyard-durability-bench drain   --port P --messages 1000000   # reconnect that session and receive them all
//! halyard-durability-bench retain  --port P --messages 1000000   # publish N retained messages on distinct topics
//! halyard-durability-bench retained --port P --messages 1000000  # a `#` subscriber receives every retained message
//! ```
//!
//! Each step prints one JSON line: messages, seconds, messages per second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use halyard_bench::mqtt::{encode_into, Conn};
use halyard_codec::{Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS};
use tokio::io::AsyncWriteExt;

/// Durable-state workloads: fill and drain a persistent session's queue, fill and stream
/// retained messages.
#[derive(Debug, Parser)]
#[command(name = "halyard-durability-bench")]
struct Cli {
    /// Which step to run.
    #[arg(value_enum)]
    step: Step,
    /// Broker port on 127.0.0.1.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Messages to publish or to expect.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Unacknowledged QoS 1 publishes a publisher keeps in flight.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Client id of the persistent subscriber session.
    #[arg(long, default_value = "durability-sub")]
    subscriber: String,
}

/// A step of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    /// Create the persistent session, subscribe, go offline, then publish the messages.
    Fill,
    /// Reconnect the persistent session and receive (and acknowledge) the messages.
    Drain,
    /// Publish the messages as retained, each on its own topic.
    Retain,
    /// Subscribe to `#` with a clean session and receive every retained message.
    Retained,
}

/// A persistent-session-capable MQTT 3.1.1 connection with a write buffer, so a window of
/// publishes or acknowledgements goes out in one write.
struct Client {
    conn: Conn,
    outbuf: BytesMut,
}

/// Set-up steps (CONNACK, SUBACK) must not hang a benchmark run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    async fn connect(port: u16, client_id: &str, clean: bool) -> Result<(Client, bool)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (conn, present) = Conn::open_session(
            addr,
            ProtocolVersion::V3_1_1,
            client_id,
            clean,
            SETUP_TIMEOUT,
        )
        .await?;
        let client = Client {
            conn,
            outbuf: BytesMut::with_capacity(64 * 1024),
        };
        Ok((client, present))
    }

    fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode_into(packet, ProtocolVersion::V3_1_1, &mut self.outbuf)
    }

    async fn flush(&mut self) -> Result<()> {
        self.conn.stream.write_all(&self.outbuf).await?;
        self.outbuf.clear();
        Ok(())
    }

    async fn read(&mut self) -> Result<Packet> {
        self.conn.read_packet().await
    }

    async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.conn
            .subscribe(filter, QoS::AtLeastOnce, SETUP_TIMEOUT)
            .await
    }

    async fn disconnect(self) {
        self.conn.disconnect().await;
    }

    /// Publishes `count` QoS 1 messages (topic chosen per index) with a window of
    /// unacknowledged ones; returns when every one is acknowledged.
    async fn publish_all(
        &mut self,
        count: u64,
        window: usize,
        payload: &Bytes,
        retain: bool,
        topic: impl Fn(u64) -> String,
    ) -> Result<()> {
        let (mut sent, mut acked, mut next_id) = (0u64, 0u64, 0u16);
        while acked < count {
            while sent < count && (sent - acked) < window as u64 {
                next_id = next_id.checked_add(1).unwrap_or(1);
                self.queue(&Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain,
                    topic: topic(sent),
                    packet_id: Some(next_id),
                    payload: payload.clone(),
                    properties: Properties::default(),
                }))?;
                sent += 1;
            }
            self.flush().await?;
            match self.read().await? {
                Packet::PubAck(ack) if ack.reason.0 < 0x80 => acked += 1,
                other => bail!("unexpected while publishing: {other:?}"),
            }
        }
        Ok(())
    }

    /// Receives `count` PUBLISH packets, acknowledging QoS 1 ones in batches.
    async fn receive(&mut self, count: u64) -> Result<()> {
        let mut received = 0u64;
        while received < count {
            let packet = tokio::time::timeout(Duration::from_secs(30), self.read())
                .await
                .map_err(|_| anyhow!("stalled after {received} of {count} messages"))??;
            if let Packet::Publish(publish) = packet {
                received += 1;
                if let Some(id) = publish.packet_id {
                    self.queue(&Packet::PubAck(PubResponse {
                        packet_id: id,
                        ..Default::default()
                    }))?;
                }
                if self.conn.inbuf.is_empty() {
                    self.flush().await?;
                }
            }
        }
        self.flush().await
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let payload = Bytes::from(vec![b'x'; cli.payload]);
    let started = Instant::now();
    match cli.step {
        Step::Fill => {
            let (subscriber, _) = Client::connect(cli.port, &cli.subscriber, false).await?;
            let mut subscriber = subscriber;
            subscriber.subscribe("durability/queue").await?;
            subscriber.disconnect().await;
            let (mut publisher, _) = Client::connect(cli.port, "durability-pub", true).await?;
            let started = Instant::now();
            publisher
                .publish_all(cli.messages, cli.window, &payload, false, |_| {
                    "durability/queue".to_owned()
                })
                .await?;
            return report("fill", cli.messages, started);
        }
        Step::Drain => {
            let (mut subscriber, present) =
                Client::connect(cli.port, &cli.subscriber, false).await?;
            if !present {
                bail!("the persistent session is gone");
            }
            subscriber.receive(cli.messages).await?;
        }
        Step::Retain => {
            let (mut publisher, _) = Client::connect(cli.port, "durability-retain", true).await?;
            publisher
                .publish_all(cli.messages, cli.window, &payload, true, |i| {
                    format!("durability/retained/{}/{}", i / 1000, i % 1000)
                })
                .await?;
        }
        Step::Retained => {
            let (mut subscriber, _) = Client::connect(cli.port, "durability-all", true).await?;
            subscriber.subscribe("durability/retained/#").await?;
            subscriber.receive(cli.messages).await?;
        }
    }
    let name = format!("{:?}", cli.step).to_lowercase();
    report(&name, cli.messages, started)
}

fn report(step: &str, messages: u64, started: Instant) -> Result<()> {
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "step": step,
            "messages": messages,
            "seconds": seconds,
            "messages_per_s": messages as f64 / seconds,
        })
    );
    Ok(())
}
