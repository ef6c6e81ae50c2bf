//! Shared harness for the end-to-end tests: start the real `halyard` binary on an ephemeral
//! port, talk to it with raw packets (through `halyard_codec`) or with rumqttc.
//!
//! Every test starts its own broker, so tests never share state and may run in parallel.
//! Each test binary uses a different subset of these helpers, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod fault_proxy;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use halyard_codec::{
    Connect, DecodeContext, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, Unsubscribe, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single expected event may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Path of the binary under test (built by cargo for integration tests).
pub const HALYARD: &str = env!("CARGO_BIN_EXE_halyard");

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A unique path in the system temp dir (no tempfile crate needed).
pub fn unique_temp_path(stem: &str, ext: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "halyard-test-{}-{}-{}-{}.{}",
        std::process::id(),
        stem,
        n,
        nanos,
        ext
    ))
}

/// Writes `toml` to a fresh temp file and returns its path.
pub fn write_temp_config(toml: &str) -> PathBuf {
    let path = unique_temp_path("config", "toml");
    std::fs::write(&path, toml).expect("write temp config");
    path
}

/// A `Command` for the binary under test, with any `HALYARD_*` variables of the caller's
/// environment removed so that tests are hermetic.
pub fn halyard_cmd() -> Command {
    let mut cmd = Command::new(HALYARD);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HALYARD_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A running broker process, owned by one test. Dropping it kills (SIGKILL) and reaps only
/// this child.
pub struct Broker {
    child: Child,
    addr: SocketAddr,
    /// The operations HTTP listener (always on an ephemeral loopback port in tests).
    http_addr: SocketAddr,
    /// Stdout lines up to the HTTP listening line (other listener kinds, see `listener_addr`).
    stdout_lines: Vec<String>,
    config_path: Option<PathBuf>,
    stderr_path: PathBuf,
    /// The broker's data directory: its own by default, so parallel tests never share a
    /// store; removed on drop unless the test supplied it (see `start_durable`).
    data_dir: PathBuf,
    owns_data_dir: bool,
}

impl Broker {
    /// A broker with the default configuration.
    pub fn start() -> Broker {
        Self::spawn(None, &[], None)
    }

    /// A broker with `toml` as its config file.
    pub fn start_with_config(toml: &str) -> Broker {
        Self::spawn(Some(write_temp_config(toml)), &[], None)
    }

    /// A broker with extra environment variables (e.g. `HALYARD_MAX_KEEPALIVE`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Broker {
        Self::spawn(None, env, None)
    }

    /// A broker on the caller's data directory, which outlives it: for restart and crash
    /// tests.
    pub fn start_durable(data_dir: &std::path::Path, toml: &str) -> Broker {
        Self::spawn(
            Some(write_temp_config(toml)),
            &[],
            Some(data_dir.to_path_buf()),
        )
    }

    /// SIGKILL, like a power cut or `kill -9`, and reap; the data directory stays.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn spawn(
        config_path: Option<PathBuf>,
        env: &[(&str, &str)],
        data_dir: Option<PathBuf>,
    ) -> Broker {
        let mut cmd = halyard_cmd();
        cmd.envs(env.iter().copied());
        let owns_data_dir = data_dir.is_none();
        let data_dir = data_dir.unwrap_or_else(|| unique_temp_path("data", "d"));
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        // Never the default 127.0.0.1:8080: parallel tests must not collide.
        cmd.arg("--http-listen").arg("127.0.0.1:0");
        cmd.arg("--data-dir").arg(&data_dir);
        if let Some(path) = &config_path {
            cmd.arg("--config").arg(path);
        }
        Self::launch(cmd, config_path, data_dir, owns_data_dir)
    }

    /// Starts a broker with `extra_args` after the usual `serve` flags and its own data
    /// directory; an error (with the broker's stderr) instead of a panic when it does not come
    /// up, so a caller can retry, e.g. after a port collision.
    pub fn try_start_with_args(extra_args: &[String]) -> Result<Broker, String> {
        Self::try_start_in(extra_args, unique_temp_path("data", "d"))
    }

    /// Like [`Broker::try_start_with_args`] on `data_dir`, which the new broker owns (and
    /// removes on drop): for restarting a node on the directory of one that died (see
    /// [`Broker::disown_data_dir`]).
    pub fn try_start_in(extra_args: &[String], data_dir: PathBuf) -> Result<Broker, String> {
        let mut cmd = halyard_cmd();
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        cmd.arg("--http-listen").arg("127.0.0.1:0");
        cmd.arg("--data-dir").arg(&data_dir);
        cmd.args(extra_args);
        Self::try_launch(cmd, None, data_dir, true)
    }

    /// A broker started with exactly `args` and `env` (on top of a hermetic environment),
    /// for tests of shipped command lines: the config they name must listen on 127.0.0.1
    /// port 0 and serve HTTP. `data_dir` is removed when the broker is dropped.
    pub fn start_with_args(args: &[&str], env: &[(&str, &str)], data_dir: PathBuf) -> Broker {
        Self::try_start_exact(args, env, data_dir).unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`Broker::start_with_args`], with an error (and the broker's stderr) instead of a
    /// panic when it does not come up, so a caller can retry after a port collision.
    pub fn try_start_exact(
        args: &[&str],
        env: &[(&str, &str)],
        data_dir: PathBuf,
    ) -> Result<Broker, String> {
        let mut cmd = halyard_cmd();
        cmd.args(args).envs(env.iter().copied());
        Self::try_launch(cmd, None, data_dir, true)
    }

    fn launch(
        cmd: Command,
        config_path: Option<PathBuf>,
        data_dir: PathBuf,
        owns_data_dir: bool,
    ) -> Broker {
        Self::try_launch(cmd, config_path, data_dir, owns_data_dir)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn try_launch(
        mut cmd: Command,
        config_path: Option<PathBuf>,
        data_dir: PathBuf,
        owns_data_dir: bool,
    ) -> Result<Broker, String> {
        let stderr_path = unique_temp_path("stderr", "log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("spawn halyard");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel::<String>();
        // Keep draining stdout for the life of the process so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        // Every stdout line up to the HTTP line (`halyard tls listening on ...` and the like).
        let mut stdout_lines = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    stdout_lines.push(line.clone());
                    if let Some(rest) = line.trim().strip_prefix("halyard listening on ") {
                        break rest.trim().parse::<SocketAddr>().unwrap_or_else(|e| {
                            panic!("bad address in listening line {line:?}: {e}")
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    let logs = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if owns_data_dir {
                        let _ = std::fs::remove_dir_all(&data_dir);
                    }
                    return Err(format!(
                        "halyard did not print its listening line (status {status:?}); stderr:\n{logs}"
                    ));
                }
            }
        };
        // The HTTP line follows the MQTT lines.
        let http_addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    stdout_lines.push(line.clone());
                    if let Some(rest) = line.trim().strip_prefix("halyard http listening on ") {
                        break rest.trim().parse::<SocketAddr>().unwrap_or_else(|e| {
                            panic!("bad address in http listening line {line:?}: {e}")
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let logs = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if owns_data_dir {
                        let _ = std::fs::remove_dir_all(&data_dir);
                    }
                    return Err(format!(
                        "halyard did not print its http listening line; stderr:\n{logs}"
                    ));
                }
            }
        };
        assert_eq!(
            addr.ip().to_string(),
            "127.0.0.1",
            "listener must bind 127.0.0.1"
        );
        assert_ne!(
            addr.port(),
            0,
            "listening line must show the real ephemeral port"
        );
        Ok(Broker {
            child,
            addr,
            http_addr,
            stdout_lines,
            config_path,
            stderr_path,
            data_dir,
            owns_data_dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Address from the `halyard <kind> listening on ADDR` line (`tls`, `ws`, `wss`).
    pub fn listener_addr(&self, kind: &str) -> SocketAddr {
        let prefix = format!("halyard {kind} listening on ");
        self.stdout_lines
            .iter()
            .find_map(|line| line.trim().strip_prefix(&prefix))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {kind} listener in {:?}", self.stdout_lines))
    }

    /// Address of the operations HTTP listener (metrics, admin API, status page).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Keeps the data directory when this broker is dropped and returns it, for a successor
    /// started on it.
    pub fn disown_data_dir(&mut self) -> PathBuf {
        self.owns_data_dir = false;
        self.data_dir.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the broker wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM to this broker (and only this one).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Sends SIGHUP to this broker (and only this one): reload certificates and files.
    pub fn sighup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- halyard stderr ----\n{}", self.logs());
        }
        let _ = std::fs::remove_file(&self.stderr_path);
        if self.owns_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        if let Some(path) = &self.config_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs `halyard` with `args` to completion (with a timeout) and returns (status, stdout, stderr).
pub fn run_halyard(args: &[&str]) -> (ExitStatus, String, String) {
    run_halyard_env(args, &[])
}

/// [`run_halyard`] with extra environment variables.
pub fn run_halyard_env(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut child = halyard_cmd()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn halyard");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("halyard {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

// ------------------------------------------------------------------------------------------
// Codec adapter: the only place that knows the codec's function signatures.
// ------------------------------------------------------------------------------------------

/// Encodes `packet` for protocol `version`.
pub fn encode_packet(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut buf = BytesMut::new();
    halyard_codec::encode(packet, version, &mut buf)
        .unwrap_or_else(|e| panic!("test bug: cannot encode {packet:?}: {e}"));
    buf
}

/// Decodes one packet from `buf` if it is complete.
pub fn decode_packet(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
) -> Result<Option<Packet>, String> {
    let ctx = DecodeContext {
        version,
        max_packet_size: 256 * 1024 * 1024,
    };
    halyard_codec::decode(buf, &ctx).map_err(|e| format!("{e:?}"))
}

// ------------------------------------------------------------------------------------------
// Raw-packet client
// ------------------------------------------------------------------------------------------

/// What ended a receive attempt without a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing arrived in time.
    Timeout,
    /// The server closed the connection (EOF or reset).
    Closed,
    /// The server sent bytes our codec cannot decode.
    Decode(String),
}

/// Opens the session of `connect`, subscribes it to `filter` at QoS 1 and disconnects it
/// cleanly, leaving a persistent session (given a session expiry or clean session 0) that
/// queues what is published to `filter`.
pub async fn offline_subscriber(addr: SocketAddr, connect: Connect, filter: &str) {
    let (mut client, _) = RawClient::handshake(addr, connect).await;
    client.subscribe(1, &[(filter, QoS::AtLeastOnce)]).await;
    client.disconnect().await;
}

/// A client that speaks raw MQTT packets, for byte-exact conformance checks.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// Packets read while waiting for a specific one (see `recv_where`), returned first.
    pending: std::collections::VecDeque<Packet>,
    /// The protocol level used to encode/decode after CONNECT.
    pub version: ProtocolVersion,
}

impl RawClient {
    /// Opens a TCP connection; no packet is sent.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        stream.set_nodelay(true).ok();
        RawClient {
            stream,
            buf: BytesMut::with_capacity(4096),
            pending: Default::default(),
            version: ProtocolVersion::V3_1_1,
        }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK.
    pub async fn handshake(
        addr: SocketAddr,
        connect: Connect,
    ) -> (RawClient, halyard_codec::ConnAck) {
        let mut c = RawClient::connect(addr).await;
        c.version = connect.protocol;
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts success; MQTT 3.1.1.
    pub async fn connect_v311(addr: SocketAddr, client_id: &str, clean: bool) -> RawClient {
        let (c, ack) = Self::handshake(
            addr,
            connect_packet(ProtocolVersion::V3_1_1, client_id, clean),
        )
        .await;
        assert_eq!(
            ack.code,
            ReasonCode::SUCCESS,
            "CONNACK for {client_id}: {ack:?}"
        );
        c
    }

    /// Connects and asserts success; MQTT 5 (clean start as given, no session expiry).
    pub async fn connect_v5(addr: SocketAddr, client_id: &str, clean: bool) -> RawClient {
        let (c, ack) =
            Self::handshake(addr, connect_packet(ProtocolVersion::V5, client_id, clean)).await;
        assert_eq!(
            ack.code,
            ReasonCode::SUCCESS,
            "CONNACK for {client_id}: {ack:?}"
        );
        c
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // A write may fail if the server already closed: tests then check with expect_closed.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    pub async fn send(&mut self, packet: &Packet) {
        let bytes = encode_packet(packet, self.version);
        self.send_bytes(&bytes).await;
    }

    /// Receives the next packet within `dur`.
    pub async fn try_recv(&mut self, dur: Duration) -> Result<Packet, RecvError> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(p);
        }
        self.try_recv_wire(dur).await
    }

    async fn try_recv_wire(&mut self, dur: Duration) -> Result<Packet, RecvError> {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match decode_packet(&mut self.buf, Some(self.version)) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(RecvError::Decode(e)),
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RecvError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RecvError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Receives the next packet or panics (timeout 5 s).
    pub async fn recv(&mut self) -> Packet {
        match self.try_recv(TIMEOUT).await {
            Ok(p) => p,
            Err(e) => panic!("expected a packet, got {e:?}"),
        }
    }

    /// Receives packets until one satisfies `pred` (5 s); the others are kept, in order, for
    /// later `recv` calls. Used where the server may interleave e.g. a PUBLISH with the ack
    /// being awaited.
    pub async fn recv_where(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv_wire(left).await {
                Ok(p) if pred(&p) => return p,
                Ok(p) => self.pending.push_back(p),
                Err(e) => panic!(
                    "expected {what}, got {e:?} (other packets: {:?})",
                    self.pending
                ),
            }
        }
    }

    /// Reads exactly `n` raw bytes (for byte-exact checks).
    pub async fn recv_exact_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for bytes");
            match read {
                Ok(0) | Err(_) => panic!(
                    "connection closed after {} of {n} bytes: {:02x?}",
                    self.buf.len(),
                    &self.buf[..]
                ),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        self.buf.split_to(n).to_vec()
    }

    /// Asserts the server closes the connection within 5 s without sending any packet.
    pub async fn expect_closed(&mut self) {
        self.expect_closed_within(TIMEOUT).await;
    }

    pub async fn expect_closed_within(&mut self, dur: Duration) {
        match self.try_recv(dur).await {
            Err(RecvError::Closed) => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }

    /// Asserts the server sends DISCONNECT with `reason` and then closes (MQTT 5).
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) {
        match self.try_recv(TIMEOUT).await {
            Ok(Packet::Disconnect(d)) => {
                assert_eq!(d.reason, reason, "DISCONNECT reason: {d:?}")
            }
            other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
        }
        self.expect_closed().await;
    }

    /// Asserts the connection is closed, tolerating one DISCONNECT (any reason) before it.
    /// For MQTT 5 cases where the DISCONNECT is optional (MAY/SHOULD).
    pub async fn expect_closed_maybe_disconnect(&mut self) -> Option<ReasonCode> {
        match self.try_recv(TIMEOUT).await {
            Err(RecvError::Closed) => None,
            Ok(Packet::Disconnect(d)) => {
                self.expect_closed().await;
                Some(d.reason)
            }
            other => panic!("expected close (optionally after DISCONNECT), got {other:?}"),
        }
    }

    /// Asserts nothing arrives for `ms` milliseconds (and the connection stays open).
    pub async fn expect_nothing(&mut self, ms: u64) {
        match self.try_recv(Duration::from_millis(ms)).await {
            Err(RecvError::Timeout) => {}
            other => panic!("expected silence for {ms} ms, got {other:?}"),
        }
    }

    /// Receives a PUBLISH or panics.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Receives a PUBLISH and acknowledges it according to its QoS (PUBACK, or the full
    /// PUBREC/PUBREL/PUBCOMP exchange).
    pub async fn recv_publish_ack(&mut self) -> Publish {
        let p = self.recv_publish().await;
        self.ack(&p).await;
        p
    }

    /// Acknowledges a received PUBLISH according to its QoS.
    pub async fn ack(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(pub_response(p.packet_id.unwrap())))
                    .await
            }
            QoS::ExactlyOnce => {
                let id = p.packet_id.unwrap();
                self.send(&Packet::PubRec(pub_response(id))).await;
                self.recv_where(
                    "PUBREL",
                    |p| matches!(p, Packet::PubRel(r) if r.packet_id == id),
                )
                .await;
                self.send(&Packet::PubComp(pub_response(id))).await;
            }
        }
    }

    /// SUBSCRIBE with one filter per (filter, qos) and returns the SUBACK reason codes.
    pub async fn subscribe(&mut self, packet_id: u16, filters: &[(&str, QoS)]) -> Vec<ReasonCode> {
        self.send(&Packet::Subscribe(subscribe_packet(packet_id, filters)))
            .await;
        self.expect_suback(packet_id).await
    }

    /// SUBSCRIBE with full options (MQTT 5) and returns the SUBACK reason codes.
    pub async fn subscribe_with(&mut self, sub: Subscribe) -> Vec<ReasonCode> {
        let id = sub.packet_id;
        self.send(&Packet::Subscribe(sub)).await;
        self.expect_suback(id).await
    }

    async fn expect_suback(&mut self, packet_id: u16) -> Vec<ReasonCode> {
        match self.recv().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id, "[MQTT-3.8.4-2] SUBACK packet id");
                ack.reasons
            }
            other => panic!("expected SUBACK (before any retained PUBLISH), got {other:?}"),
        }
    }

    /// Publishes and completes the QoS flow (waits for PUBACK / PUBREC+PUBCOMP). Returns the
    /// reason code of PUBACK/PUBREC (success for QoS 0).
    pub async fn publish(&mut self, p: Publish) -> ReasonCode {
        let qos = p.qos;
        let id = p.packet_id;
        self.send(&Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => ReasonCode::SUCCESS,
            QoS::AtLeastOnce => {
                let id = id.unwrap();
                match self
                    .recv_where(
                        "PUBACK",
                        |p| matches!(p, Packet::PubAck(a) if a.packet_id == id),
                    )
                    .await
                {
                    Packet::PubAck(a) => a.reason,
                    _ => unreachable!(),
                }
            }
            QoS::ExactlyOnce => {
                let id = id.unwrap();
                let reason = match self
                    .recv_where(
                        "PUBREC",
                        |p| matches!(p, Packet::PubRec(r) if r.packet_id == id),
                    )
                    .await
                {
                    Packet::PubRec(r) => r.reason,
                    _ => unreachable!(),
                };
                if reason.is_error() {
                    return reason;
                }
                self.send(&Packet::PubRel(pub_response(id))).await;
                self.recv_where(
                    "PUBCOMP",
                    |p| matches!(p, Packet::PubComp(c) if c.packet_id == id),
                )
                .await;
                reason
            }
        }
    }

    /// PINGREQ / PINGRESP round trip: proves the connection is alive and that everything the
    /// server sent before the PINGRESP has been read (returned, in order).
    pub async fn ping_collect(&mut self) -> Vec<Packet> {
        self.send(&Packet::PingReq).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Packet::PingResp => return before,
                p => before.push(p),
            }
        }
    }

    /// PINGREQ / PINGRESP round trip, asserting nothing else arrives first.
    pub async fn ping(&mut self) {
        let extra = self.ping_collect().await;
        assert!(
            extra.is_empty(),
            "unexpected packets before PINGRESP: {extra:?}"
        );
    }

    /// Clean MQTT DISCONNECT (normal) and close. Returns once the server has closed the
    /// connection, so the broker has processed the DISCONNECT before the test goes on (a
    /// publish from another connection could otherwise overtake it).
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(halyard_codec::Disconnect::default()))
            .await;
        let _ = self.stream.shutdown().await;
        let mut scratch = [0u8; 1024];
        let _ = tokio::time::timeout(TIMEOUT, async {
            while matches!(self.stream.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Drop the TCP connection without DISCONNECT (abnormal close: wills fire).
    pub async fn drop_abruptly(self) {
        drop(self);
    }
}

// ------------------------------------------------------------------------------------------
// Packet builders
// ------------------------------------------------------------------------------------------

pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 60,
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }
}

pub fn will(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Will {
    Will {
        topic: topic.to_string(),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        properties: Default::default(),
    }
}

/// PUBLISH builder; `packet_id` must be Some for QoS > 0.
pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: Option<u16>,
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.to_string(),
        packet_id,
        payload: Bytes::copy_from_slice(payload),
        properties: Default::default(),
    }
}

/// QoS 0 PUBLISH.
pub fn publish0(topic: &str, payload: &[u8]) -> Publish {
    publish_packet(topic, payload, QoS::AtMostOnce, false, None)
}

pub fn pub_response(packet_id: u16) -> halyard_codec::PubResponse {
    halyard_codec::PubResponse {
        packet_id,
        reason: ReasonCode::SUCCESS,
        properties: Default::default(),
    }
}

pub fn sub_options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

pub fn subscribe_packet(packet_id: u16, filters: &[(&str, QoS)]) -> Subscribe {
    Subscribe {
        packet_id,
        subscriptions: filters
            .iter()
            .map(|(f, q)| Subscription {
                filter: f.to_string(),
                options: sub_options(*q),
            })
            .collect(),
        properties: Default::default(),
    }
}

pub fn subscribe_opts(packet_id: u16, filter: &str, options: SubscriptionOptions) -> Subscribe {
    Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: filter.to_string(),
            options,
        }],
        properties: Default::default(),
    }
}

pub fn unsubscribe_packet(packet_id: u16, filters: &[&str]) -> Unsubscribe {
    Unsubscribe {
        packet_id,
        filters: filters.iter().map(|f| f.to_string()).collect(),
        properties: Default::default(),
    }
}

/// A hand-encoded MQTT 3.1.1 CONNECT (client id `id`, clean session, keep-alive 60): used
/// where the bytes themselves matter or must be corrupted.
pub fn raw_connect_v311(id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10];
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// Variable Byte Integer encoding of a remaining length.
pub fn encode_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// A raw packet: fixed-header byte, remaining length, body.
pub fn raw_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A UTF-8 string field (two-byte length prefix) from raw bytes.
pub fn raw_str(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Sleeps (async).
pub async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

// ------------------------------------------------------------------------------------------
// rumqttc wrappers (realistic client flows)
// ------------------------------------------------------------------------------------------

/// An MQTT 3.1.1 rumqttc client whose event loop runs in a task; incoming packets arrive on
/// a channel. The task stops at the first connection error (no silent auto-reconnect).
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl V4Client {
    pub fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects with clean session = `clean` and waits for CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (V4Client, rumqttc::ConnAck) {
        let mut o = Self::options(addr, id);
        o.set_clean_session(clean);
        Self::connect_with(o).await
    }

    pub async fn connect_with(options: rumqttc::MqttOptions) -> (V4Client, rumqttc::ConnAck) {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        break;
                    }
                }
            }
        });
        let mut c = V4Client {
            client,
            events: rx,
            task,
        };
        let ack = match c.next().await {
            rumqttc::Packet::ConnAck(a) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (c, ack)
    }

    /// Next incoming packet (PINGRESP skipped) or panic after 5 s.
    pub async fn next(&mut self) -> rumqttc::Packet {
        loop {
            match tokio::time::timeout(TIMEOUT, self.events.recv()).await {
                Err(_) => panic!("rumqttc: no packet within {TIMEOUT:?}"),
                Ok(None) => panic!("rumqttc event loop ended"),
                Ok(Some(Err(e))) => panic!("rumqttc connection error: {e}"),
                Ok(Some(Ok(rumqttc::Packet::PingResp))) => continue,
                Ok(Some(Ok(p))) => return p,
            }
        }
    }

    /// Next PUBLISH, skipping acks of our own traffic.
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        loop {
            match self.next().await {
                rumqttc::Packet::Publish(p) => return p,
                rumqttc::Packet::PubAck(_)
                | rumqttc::Packet::PubRec(_)
                | rumqttc::Packet::PubComp(_)
                | rumqttc::Packet::SubAck(_)
                | rumqttc::Packet::UnsubAck(_)
                | rumqttc::Packet::PubRel(_) => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Waits for the SUBACK and returns its return codes.
    pub async fn wait_suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        loop {
            match self.next().await {
                rumqttc::Packet::SubAck(s) => return s.return_codes,
                rumqttc::Packet::Publish(p) => panic!("PUBLISH before SUBACK: {p:?}"),
                _ => continue,
            }
        }
    }

    /// Waits for a PUBACK (QoS 1) or PUBCOMP (QoS 2) of our own publish.
    pub async fn wait_pub_done(&mut self) {
        loop {
            match self.next().await {
                rumqttc::Packet::PubAck(_) | rumqttc::Packet::PubComp(_) => return,
                rumqttc::Packet::Publish(p) => panic!("unexpected PUBLISH {p:?}"),
                _ => continue,
            }
        }
    }

    /// Asserts no PUBLISH arrives for `ms` milliseconds.
    pub async fn expect_no_publish(&mut self, ms: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return,
                Ok(Some(Ok(rumqttc::Packet::Publish(p)))) => panic!("unexpected PUBLISH {p:?}"),
                Ok(Some(Err(e))) => panic!("rumqttc connection error: {e}"),
                Ok(None) => panic!("rumqttc event loop ended"),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Clean DISCONNECT, then wait for the event loop to end.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(TIMEOUT, &mut self.task).await;
    }
}

impl Drop for V4Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 rumqttc client, same shape as [`V4Client`].
pub struct V5Client {
    pub client: rumqttc::v5::AsyncClient,
    events:
        tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::v5::mqttbytes::v5::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl V5Client {
    pub fn options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub async fn connect(
        addr: SocketAddr,
        id: &str,
        clean: bool,
    ) -> (V5Client, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let mut o = Self::options(addr, id);
        o.set_clean_start(clean);
        Self::connect_with(o).await
    }

    pub async fn connect_with(
        options: rumqttc::v5::MqttOptions,
    ) -> (V5Client, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::v5::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        break;
                    }
                }
            }
        });
        let mut c = V5Client {
            client,
            events: rx,
            task,
        };
        let ack = match c.next().await {
            rumqttc::v5::mqttbytes::v5::Packet::ConnAck(a) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (c, ack)
    }

    pub async fn next(&mut self) -> rumqttc::v5::mqttbytes::v5::Packet {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        loop {
            match tokio::time::timeout(TIMEOUT, self.events.recv()).await {
                Err(_) => panic!("rumqttc v5: no packet within {TIMEOUT:?}"),
                Ok(None) => panic!("rumqttc v5 event loop ended"),
                Ok(Some(Err(e))) => panic!("rumqttc v5 connection error: {e}"),
                Ok(Some(Ok(P::PingResp(_)))) => continue,
                Ok(Some(Ok(p))) => return p,
            }
        }
    }

    pub async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        loop {
            match self.next().await {
                P::Publish(p) => return p,
                P::PubAck(_)
                | P::PubRec(_)
                | P::PubComp(_)
                | P::SubAck(_)
                | P::UnsubAck(_)
                | P::PubRel(_) => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    pub async fn wait_suback(&mut self) -> rumqttc::v5::mqttbytes::v5::SubAck {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        loop {
            match self.next().await {
                P::SubAck(s) => return s,
                P::Publish(p) => panic!("PUBLISH before SUBACK: {p:?}"),
                _ => continue,
            }
        }
    }

    pub async fn expect_no_publish(&mut self, ms: u64) {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return,
                Ok(Some(Ok(P::Publish(p)))) => panic!("unexpected PUBLISH {p:?}"),
                Ok(Some(Err(e))) => panic!("rumqttc v5 connection error: {e}"),
                Ok(None) => panic!("rumqttc v5 event loop ended"),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(TIMEOUT, &mut self.task).await;
    }
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 exchange with `Connection: close`: (status, body). Blocking std I/O is fine
/// here; requests are tiny and the broker answers at once.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect http");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad response {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (with labels, exactly as exposed) in a metrics text.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// The text of `/metrics` at `addr`.
pub fn metrics(addr: SocketAddr) -> String {
    let (status, body) = http(addr, "GET", "/metrics", None, None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the Prometheus sample `name` (labels included, exactly as exposed, e.g.
/// `halyard_auth_refused_total{reason="jwt_expired"}`) on the broker's `/metrics`; 0 when
/// the sample is absent (a labelled counter appears once it was first incremented).
pub fn metric(broker: &Broker, name: &str) -> f64 {
    metrics(broker.http_addr())
        .lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
