//! End-to-end tests: the real server on an ephemeral port, driven by rumqttc (3.1.1 and 5).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use halyard_server::{Server, ServerConfig, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(5);

/// A running server and the means to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    async fn start(config: ServerConfig) -> Running {
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addrs()[0];
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).expect("server still running");
        timeout(Duration::from_secs(10), self.task)
            .await
            .expect("graceful shutdown is bounded")
            .expect("server task")
            .expect("clean shutdown");
    }
}

fn local_config() -> ServerConfig {
    ServerConfig {
        listeners: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..ServerConfig::default()
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn bind_reports_the_real_port_and_shutdown_is_clean() {
    let running = Running::start(local_config()).await;
    assert_ne!(running.addr.port(), 0);
    running.stop().await;
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let running = Running::start(local_config()).await;
    let config = ServerConfig {
        listeners: vec![running.addr],
        ..ServerConfig::default()
    };
    let error = Server::bind(config).await.expect_err("address in use");
    assert!(
        error.to_string().contains(&running.addr.to_string()),
        "{error}"
    );
    running.stop().await;
}

#[tokio::test]
async fn socket_without_connect_is_closed_after_connect_timeout() {
    let running = Running::start(ServerConfig {
        connect_timeout: Duration::from_millis(200),
        ..local_config()
    })
    .await;
    let mut socket = TcpStream::connect(running.addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = within("the server to close", socket.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected a close, got {read:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn mqtt_3_1_1_round_trip_at_every_qos() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let running = Running::start(local_config()).await;
    let port = running.addr.port();

    let (subscriber, mut sub_loop) =
        AsyncClient::new(MqttOptions::new("sub-v4", "127.0.0.1", port), 16);
    subscriber
        .subscribe("rt/#", QoS::ExactlyOnce)
        .await
        .expect("queue subscribe");
    within("SUBACK", async {
        loop {
            match sub_loop.poll().await.expect("subscriber connection") {
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => continue,
            }
        }
    })
    .await;

    let (publisher, mut pub_loop) =
        AsyncClient::new(MqttOptions::new("pub-v4", "127.0.0.1", port), 16);
    let qos_levels = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (index, qos) in qos_levels.into_iter().enumerate() {
        publisher
            .publish(format!("rt/{index}"), qos, false, vec![index as u8; 3])
            .await
            .expect("queue publish");
    }
    let publisher_task = tokio::spawn(async move {
        let mut acknowledged = 0;
        while acknowledged < 2 {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => acknowledged += 1,
                Ok(_) => {}
                Err(error) => panic!("publisher connection: {error}"),
            }
        }
    });

    let mut received = Vec::new();
    within("three publishes", async {
        while received.len() < 3 {
            if let Event::Incoming(Packet::Publish(publish)) =
                sub_loop.poll().await.expect("subscriber connection")
            {
                received.push((publish.topic, publish.qos, publish.payload.to_vec()));
            }
        }
    })
    .await;
    received.sort_by(|a, b| a.0.cmp(&b.0));
    let expected: Vec<_> = qos_levels
        .into_iter()
        .enumerate()
        .map(|(index, qos)| (format!("rt/{index}"), qos, vec![index as u8; 3]))
        .collect();
    assert_eq!(received, expected);
    within("PUBACK and PUBCOMP", publisher_task)
        .await
        .expect("publisher task");
    running.stop().await;
}

#[tokio::test]
async fn mqtt_5_round_trip_at_every_qos_then_shutdown() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let running = Running::start(local_config()).await;
    let port = running.addr.port();

    let (subscriber, mut sub_loop) =
        AsyncClient::new(MqttOptions::new("sub-v5", "127.0.0.1", port), 16);
    subscriber
        .subscribe("rt5/#", QoS::ExactlyOnce)
        .await
        .expect("queue subscribe");
    within("SUBACK", async {
        loop {
            match sub_loop.poll().await.expect("subscriber connection") {
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => continue,
            }
        }
    })
    .await;

    let (publisher, mut pub_loop) =
        AsyncClient::new(MqttOptions::new("pub-v5", "127.0.0.1", port), 16);
    let qos_levels = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (index, qos) in qos_levels.into_iter().enumerate() {
        publisher
            .publish(format!("rt5/{index}"), qos, false, vec![index as u8; 3])
            .await
            .expect("queue publish");
    }
    let publisher_task = tokio::spawn(async move {
        let mut acknowledged = 0;
        while acknowledged < 2 {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => acknowledged += 1,
                Ok(_) => {}
                Err(error) => panic!("publisher connection: {error}"),
            }
        }
    });

    let mut received = Vec::new();
    within("three publishes", async {
        while received.len() < 3 {
            if let Event::Incoming(Packet::Publish(publish)) =
                sub_loop.poll().await.expect("subscriber connection")
            {
                received.push((
                    publish.topic.to_vec(),
                    publish.qos,
                    publish.payload.to_vec(),
                ));
            }
        }
    })
    .await;
    received.sort_by(|a, b| a.0.cmp(&b.0));
    let expected: Vec<_> = qos_levels
        .into_iter()
        .enumerate()
        .map(|(index, qos)| {
            (
                format!("rt5/{index}").into_bytes(),
                qos,
                vec![index as u8; 3],
            )
        })
        .collect();
    assert_eq!(received, expected);
    within("PUBACK and PUBCOMP", publisher_task)
        .await
        .expect("publisher task");

    // Graceful shutdown ends the connection. (The DISCONNECT 0x8B itself is checked byte for
    // byte in `shutdown_sends_disconnect_0x8b_to_mqtt_5_clients`: rumqttc 0.25 cannot decode a
    // DISCONNECT that omits the optional property length, and reports a plain abort.)
    let stopping = tokio::spawn(running.stop());
    within("the connection to end", async {
        while sub_loop.poll().await.is_ok() {}
    })
    .await;
    within("shutdown", stopping).await.expect("stop task");
}

#[tokio::test]
async fn garbage_before_connect_is_closed() {
    let running = Running::start(local_config()).await;
    let mut socket = TcpStream::connect(running.addr).await.expect("connect");
    // Not a CONNECT: a PINGREQ as the first packet is a protocol violation [MQTT-3.1.0-1].
    socket.write_all(&[0xC0, 0x00]).await.expect("write");
    let mut rest = Vec::new();
    let read = within("the server to close", socket.read_to_end(&mut rest)).await;
    assert!(read.is_ok() || rest.is_empty(), "unexpected {read:?}");
    running.stop().await;
}

#[tokio::test]
async fn shutdown_sends_disconnect_0x8b_to_mqtt_5_clients() {
    use bytes::BytesMut;
    use halyard_codec::{
        decode, encode, Connect, DecodeContext, Packet, ProtocolVersion, ReasonCode,
    };

    let running = Running::start(local_config()).await;
    let mut socket = TcpStream::connect(running.addr).await.expect("connect");
    let connect = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "raw-v5".to_owned(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }));
    let mut out = BytesMut::new();
    encode(&connect, ProtocolVersion::V5, &mut out).expect("encode");
    socket.write_all(&out).await.expect("write");
    let mut first = [0u8; 1];
    within("CONNACK", socket.read_exact(&mut first))
        .await
        .expect("read");
    assert_eq!(first[0], 0x20, "CONNACK first");

    let stopping = tokio::spawn(running.stop());
    let mut rest = Vec::new();
    within("close", socket.read_to_end(&mut rest))
        .await
        .expect("read");
    let mut buf = BytesMut::from(&[&first[..], &rest].concat()[..]);
    let ctx = DecodeContext {
        version: Some(ProtocolVersion::V5),
        max_packet_size: 1 << 20,
    };
    let mut packets = Vec::new();
    while let Some(packet) = decode(&mut buf, &ctx).expect("valid packets") {
        packets.push(packet);
    }
    let Some(Packet::Disconnect(disconnect)) = packets.last() else {
        panic!("expected DISCONNECT last, got {packets:?}");
    };
    assert_eq!(disconnect.reason, ReasonCode::SERVER_SHUTTING_DOWN);
    within("shutdown", stopping).await.expect("stop task");
}
