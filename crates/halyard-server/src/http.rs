//! The operations HTTP listener (issue 5): Prometheus `/metrics`, `/livez` and `/readyz`
//! probes, the JSON admin API under `/api/v1`, and a self-contained status page at `/`.
//!
//! Every admin query runs on the broker task, sent over the same event channel as packets
//! ([`Event::Admin`]) with a oneshot reply: the core stays single-threaded and lock-free,
//! and answers reflect one consistent state.
//!
//! Security: when a token is configured every `/api/v1` request must carry
//! `Authorization: Bearer <token>`; binding a non-loopback address without a token is
//! refused at start-up, so the API is never open to the network by accident. `/metrics` and
//! the probes carry no client data and stay open (kubelets and Prometheus scrape them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use halyard_core::admin::AdminPublishError;
use halyard_core::{Broker, Kicked};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::cluster;
use crate::event::{AdminCall, Event};
use crate::metrics::{Metrics, Snapshot};
use crate::{Server, ServerError};
use halyard_cluster::{ClusterError, Coordinator};

/// How long an admin request waits for the broker task before answering 503.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest page the list endpoints return, whatever `limit` asks for.
const MAX_PAGE: usize = 1000;

/// The status page: static HTML and JavaScript, no build step and no network access.
const STATUS_PAGE: &str = include_str!("status.html");

/// Settings of the HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address to serve HTTP on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Bearer token required by `/api/v1` when set. Required for a non-loopback `listen`.
    pub token: Option<String>,
}

/// Operations state a [`Server`] carries from `bind` to `run`.
#[derive(Default)]
pub(crate) struct Ops {
    /// The bound HTTP listener, if enabled.
    pub(crate) http: Option<(TcpListener, SocketAddr, Option<String>)>,
    /// Period of `$SYS` publication; `None` = off.
    pub(crate) sys_interval: Option<Duration>,
    /// The effective configuration as shown by `/api/v1/config` (secrets already redacted).
    pub(crate) effective_config: Value,
    /// This server's metrics registry.
    pub(crate) metrics: Arc<Metrics>,
    /// The cluster this node belongs to, if any.
    pub(crate) cluster: Option<Arc<Coordinator>>,
}

impl Server {
    /// Binds the operations HTTP listener; returns the bound address (useful with port 0).
    /// Refuses a non-loopback address without a token, so that the admin API is never
    /// exposed unauthenticated by mistake.
    pub async fn bind_http(&mut self, config: HttpConfig) -> Result<SocketAddr, ServerError> {
        let token = config.token.filter(|token| !token.is_empty());
        if token.is_none() && !config.listen.ip().is_loopback() {
            return Err(ServerError::HttpTokenRequired(config.listen));
        }
        let addr = config.listen;
        let bind_error = |source| ServerError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        info!(%local, "http listening");
        self.ops.http = Some((listener, local, token));
        Ok(local)
    }

    /// Publishes `$SYS/broker/...` every `interval`; `None` (the default) turns it off.
    pub fn set_sys_interval(&mut self, interval: Option<Duration>) {
        self.ops.sys_interval = interval.filter(|i| !i.is_zero());
    }

    /// The configuration `/api/v1/config` shows; the caller redacts secrets first.
    pub fn set_effective_config(&mut self, config: Value) {
        self.ops.effective_config = config;
    }

    /// The bound HTTP address, if [`Server::bind_http`] was called.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.ops.http.as_ref().map(|(_, addr, _)| *addr)
    }
}

/// Everything the HTTP handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
    started: Instant,
    config: Arc<Value>,
    mqtt_listeners: Arc<Vec<SocketAddr>>,
    http_addr: SocketAddr,
    sys_interval: Option<Duration>,
    /// Set once every listener is bound and the broker task runs; cleared at shutdown.
    pub(crate) ready: Arc<AtomicBool>,
    cluster: Option<Arc<Coordinator>>,
}

/// What [`Server::run`] needs to start the HTTP task.
pub(crate) struct HttpTask {
    listener: TcpListener,
    state: AppState,
}

impl HttpTask {
    /// Prepares the HTTP task of a running server, if HTTP was bound.
    pub(crate) fn new(
        ops: &mut Ops,
        events: mpsc::Sender<Event>,
        mqtt_listeners: Vec<SocketAddr>,
        ready: Arc<AtomicBool>,
    ) -> Option<HttpTask> {
        let (listener, http_addr, token) = ops.http.take()?;
        Some(HttpTask {
            listener,
            state: AppState {
                events,
                metrics: Arc::clone(&ops.metrics),
                token: token.map(Arc::from),
                started: Instant::now(),
                config: Arc::new(std::mem::take(&mut ops.effective_config)),
                mqtt_listeners: Arc::new(mqtt_listeners),
                http_addr,
                sys_interval: ops.sys_interval,
                ready,
                cluster: ops.cluster.clone(),
            },
        })
    }

    /// Serves HTTP until the task is aborted.
    pub(crate) async fn run(self) {
        let app = router(self.state);
        if let Err(error) = axum::serve(self.listener, app).await {
            warn!(%error, "http server failed");
        }
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/broker", get(broker_info))
        .route("/api/v1/config", get(effective_config))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/clients/{id}", get(client).delete(kick))
        .route("/api/v1/retained", get(retained))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/cluster/members", post(cluster_join))
        .route("/api/v1/cluster/members/{id}", delete(cluster_leave))
        .with_state(state)
}

/// An error answer: a status and a JSON `{"error": ...}` body.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// Runs `f` on the broker task and returns its result.
async fn call<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut Broker, Instant) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let call = AdminCall(Box::new(move |broker, now| {
        // The requester may have timed out and gone; nothing to do then.
        let _ = tx.send(f(broker, now));
    }));
    let unavailable = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker task unavailable".into(),
        )
    };
    tokio::time::timeout(ADMIN_TIMEOUT, state.events.send(Event::Admin(call)))
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())?;
    tokio::time::timeout(ADMIN_TIMEOUT, rx)
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())
}

/// Checks the bearer token (when one is configured), comparing in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::constant_time::secrets_equal(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

/// The process is up and serving HTTP.
async fn livez() -> &'static str {
    "ok\n"
}

/// Ready when every listener is bound, the node has joined its cluster (if it is in one)
/// and holds its lease (is not fenced), the broker task answers and the store is not out of
/// space.
async fn readyz(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting or stopping\n").into_response();
    }
    if let Some(coordinator) = state.cluster.as_deref() {
        if let Some(reason) = coordinator.status().fenced {
            let text = format!("fenced by the cluster: {reason}\n");
            return (StatusCode::SERVICE_UNAVAILABLE, text).into_response();
        }
        if !cluster::joined(coordinator) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not joined to the cluster\n",
            )
                .into_response();
        }
    }
    if state.cluster.as_deref().is_some_and(cluster::fenced) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "fenced: no contact with the cluster's quorum\n",
        )
            .into_response();
    }
    match call(&state, |broker, _| broker.is_disk_full()).await {
        // Out of the Service's endpoints, so new clients go to pods that can store their
        // sessions, but `/livez` stays 200: a restart frees no space.
        Ok(true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded: the data directory is full (QoS 1/2 publishes and new persistent \
             sessions are refused)\n",
        )
            .into_response(),
        Ok(false) => "ready\n".into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker task not answering\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> ApiResult {
    let snapshot = call(&state, |broker, _| {
        let (queued, inflight) = broker.admin_queue_depths();
        Snapshot {
            stats: broker.stats(),
            queued,
            inflight,
        }
    })
    .await?;
    state.metrics.update(&snapshot);
    let cluster = state.cluster.as_deref().map(cluster::registry);
    let text = state.metrics.encode(cluster.as_ref()).map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode metrics".into(),
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn broker_info(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers)?;
    let (stats, (queued, inflight)) = call(&state, |broker, _| {
        (broker.stats(), broker.admin_queue_depths())
    })
    .await?;
    Ok(Json(json!({
        "name": "halyard",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "mqtt_listeners": state.mqtt_listeners.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "http_listener": state.http_addr.to_string(),
        "sys_interval_secs": state.sys_interval.map(|i| i.as_secs_f64()),
        "connected_clients": stats.connected_clients,
        "sessions": stats.sessions,
        "subscriptions": stats.subscriptions,
        "retained_messages": stats.retained_messages,
        "messages_received": stats.messages_received,
        "messages_sent": stats.messages_sent,
        "bytes_received": state.metrics.bytes_received.get(),
        "bytes_sent": state.metrics.bytes_sent.get(),
        "queued_messages": queued,
        "inflight_messages": inflight,
        "dropped_qos0": stats.dropped_qos0,
        "dropped_too_large": stats.dropped_too_large,
        "dropped_queue_full": stats.dropped_queue_full,
        "dropped_slow_consumer": state.metrics.dropped_slow_consumer.get() + stats.dropped_slow_consumer,
        "refused_quota": stats.refused_quota,
        "disk_full": stats.disk_full,
        "disk_full_refusals": stats.disk_full_refusals,
    }))
    .into_response())
}

async fn effective_config(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers)?;
    Ok(Json(state.config.as_ref().clone()).into_response())
}

/// `?offset=&limit=` of the list endpoints, plus `filter` for retained messages.
#[derive(Debug, Deserialize)]
struct PageQuery {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
    filter: Option<String>,
}

impl PageQuery {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(100).min(MAX_PAGE)
    }
}

async fn clients(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let (offset, limit) = (query.offset, query.limit());
    let page = call(&state, move |broker, _| broker.admin_clients(offset, limit)).await?;
    Ok(Json(json!({
        "total": page.total,
        "offset": offset,
        "limit": limit,
        "items": page.items,
    }))
    .into_response())
}

async fn client(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let lookup = id.clone();
    match call(&state, move |broker, _| broker.admin_client(&lookup)).await? {
        Some(detail) => Ok(Json(detail).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no session for client id {id:?}"),
        )),
    }
}

async fn kick(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let target = id.clone();
    match call(&state, move |broker, now| broker.admin_kick(now, &target)).await? {
        Kicked::Disconnected => {
            info!(client_id = %id, "client disconnected by the admin API");
            let body = json!({ "client_id": id, "disconnected": true, "session_ended": false });
            Ok(Json(body).into_response())
        }
        Kicked::SessionEnded => {
            info!(client_id = %id, "offline session ended by the admin API");
            let body = json!({ "client_id": id, "disconnected": false, "session_ended": true });
            Ok(Json(body).into_response())
        }
        Kicked::NoSession => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no session for client id {id:?}"),
        )),
    }
}

async fn retained(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let (offset, limit) = (query.offset, query.limit());
    let filter = query.filter.unwrap_or_else(|| "#".to_owned());
    if !halyard_codec::topic::is_valid_topic_filter(&filter) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid topic filter {filter:?}"),
        ));
    }
    let shown = filter.clone();
    let page = call(&state, move |broker, now| {
        broker.admin_retained(now, &filter, offset, limit)
    })
    .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|message| {
            json!({
                "topic": message.topic,
                "qos": message.qos,
                "payload": std::str::from_utf8(&message.payload).ok(),
                "payload_base64": base64_encode(&message.payload),
                "size": message.payload.len(),
            })
        })
        .collect();
    Ok(Json(json!({
        "filter": shown,
        "total": page.total,
        "offset": offset,
        "limit": limit,
        "items": items,
    }))
    .into_response())
}

/// Body of `POST /api/v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    /// UTF-8 payload; or give `payload_base64` for binary data.
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
}

async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<PublishBody>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let bad = |message: &str| ApiError(StatusCode::BAD_REQUEST, message.to_owned());
    let payload = match (body.payload, body.payload_base64) {
        (Some(_), Some(_)) => return Err(bad("give payload or payload_base64, not both")),
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => {
            Bytes::from(base64_decode(&encoded).ok_or_else(|| bad("invalid payload_base64"))?)
        }
        (None, None) => Bytes::new(),
    };
    let (topic, qos, retain) = (body.topic, body.qos, body.retain);
    let shown = topic.clone();
    let outcome = call(&state, move |broker, now| {
        broker.admin_publish(now, &topic, payload, qos, retain)
    })
    .await?;
    match outcome {
        Ok(delivered) => {
            Ok(Json(json!({ "topic": shown, "delivered": delivered })).into_response())
        }
        Err(error @ AdminPublishError::QuotaExceeded) => {
            Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, error.to_string()))
        }
        Err(error) => Err(ApiError(StatusCode::BAD_REQUEST, error.to_string())),
    }
}

/// Standard base64 with padding, as `retained` answers it.
fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64 as `publish` accepts it: padding optional, whitespace ignored; `None` if
/// invalid.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).ok()
}

/// `GET /api/v1/cluster`: members, leader, term and indexes, peer links; 404 on a single
/// node.
async fn cluster_status(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers)?;
    match state.cluster.as_deref() {
        Some(coordinator) => Ok(Json(cluster::status_json(coordinator)).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "this node is not part of a cluster".into(),
        )),
    }
}

/// The coordinator of a cluster node, or 404 on a single node.
fn coordinator(state: &AppState) -> Result<&Coordinator, ApiError> {
    state.cluster.as_deref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this node is not part of a cluster".into(),
        )
    })
}

/// Body of `POST /api/v1/cluster/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    id: u64,
    /// The node's cluster port, `host:port`.
    addr: String,
    /// Promote it to voter once it is a learner.
    #[serde(default)]
    voter: bool,
}

/// `POST /api/v1/cluster/members`: adds a node as a learner (and promotes it with `voter`);
/// answers once the leader has committed the change.
async fn cluster_join(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<JoinBody>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let coordinator = coordinator(&state)?;
    coordinator
        .add_member(body.id, body.addr, body.voter)
        .await
        .map_err(membership_error)?;
    Ok(Json(cluster::status_json(coordinator)).into_response())
}

/// `DELETE /api/v1/cluster/members/{id}`: demotes the node if it is a voter, then removes it.
async fn cluster_leave(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    authorize(&state, &headers)?;
    let coordinator = coordinator(&state)?;
    coordinator
        .remove_member(id)
        .await
        .map_err(membership_error)?;
    Ok(Json(cluster::status_json(coordinator)).into_response())
}

fn membership_error(error: ClusterError) -> ApiError {
    let status = match error {
        ClusterError::Membership(_) | ClusterError::Config(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError(status, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\x00\xff\x10hello"] {
            let encoded = base64_encode(data);
            assert_eq!(base64_decode(&encoded).as_deref(), Some(data), "{encoded}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("!!"), None);
        assert_eq!(base64_decode("Zm8").as_deref(), Some(&b"fo"[..]));
        assert_eq!(
            base64_decode(" Zm9v\nYmFy ").as_deref(),
            Some(&b"foobar"[..])
        );
    }
}
