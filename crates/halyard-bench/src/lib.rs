//! Halyard's load generator: drives any MQTT broker with many cheap clients built directly on
//! `halyard_codec`, and reports throughput, exact lost/duplicate counts, end-to-end latency and
//! connection figures as one JSON line.
//!
//! - [`payload`]: the (publisher, sequence, timestamp) header each message carries.
//! - [`accounting`]: per-publisher sequence tracking on the subscriber side.
//! - [`mqtt`]: connect / subscribe helpers and the pre-encoded PUBLISH template.
//! - [`run`]: the scenarios (`fanin`, `fanout`, `pairs`, `latency`, `conns`) and the report;
//!   `--subscriber-port` puts the subscribers on another cluster node.
//! - [`slow_subscriber`]: the `slow-subscriber` scenario (a healthy subscriber beside one
//!   that never reads, against a baseline without it).
//! - [`stalled_qos0`]: the `stalled-qos0` scenario (a QoS 1 pair's latency while QoS 0
//!   subscribers that never read are flooded).
//! - [`reconnect`]: the `reconnect` scenario (one client resuming its session in a loop).
//! - [`takeover`]: the `takeover` scenario (a persistent session moving between cluster nodes).
//! - [`sys`]: the tool's own CPU use and the open-file limit.

#![warn(missing_docs)]

pub mod accounting;
pub mod mqtt;
pub mod payload;
pub mod reconnect;
pub mod run;
pub mod slow_subscriber;
pub mod stalled_qos0;
pub mod sys;
pub mod takeover;
