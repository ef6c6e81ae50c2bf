//! Halyard's broker as a deterministic state machine.
//!
//! Nothing here touches a socket or a clock: the server hands in decoded packets with the
//! current time (`now`) and drains what the broker wants done with [`Broker::poll_output`],
//! in the manner of quinn-proto. Every rule of the MQTT specs is therefore testable with a
//! fake clock and no I/O.

#![forbid(unsafe_code)]

pub mod acl;
pub mod admin;
pub mod authz;
mod broker;
mod broker_topics;
mod close;
mod config;
mod connect;
mod disk_full;
mod enhanced_auth;
mod footprint;
mod forward_outbox;
mod lazy;
mod limits;
mod memory_meter;
mod message;
mod move_window;
mod output;
mod packet_ids;
mod peer_flow;
mod persistence;
mod publish;
mod pushback;
mod registry;
pub mod retained;
mod retained_delivery;
mod router;
mod routing;
mod session;
mod stats;
pub mod store;
mod subscribe;
pub mod sys;
mod time;
mod timer_queue;
mod timers;
mod transfer;

pub use acl::{Acl, AclError};
pub use admin::Kicked;
pub use authz::{Access, AllowAll, Authorizer, ClientInfo};
pub use broker::{Broker, BrokerParts, ConnectionId};
pub use config::BrokerConfig;
pub use forward_outbox::PendingForward;
pub use message::{boxed_properties, Message, NodeId, OpenExchange, SessionKey};
pub use move_window::{MAX_HELD, RELAY_WINDOW};
pub use output::{Output, SubscriptionUpdate};
pub use packet_ids::PacketIds;
pub use peer_flow::{ForwardOffer, PeerForward};
pub use pushback::{QueueFullPolicy, PUSHBACK_TIMEOUT};
pub use registry::{
    ClaimOutcome, ClaimPoll, ClaimRequest, DeferredSessionRegistry, LocalSessionRegistry,
    SessionRegistry,
};
pub use retained::{MemoryRetained, RetainedStore};
pub use router::{
    FilterRef, LocalRouter, RouteMatch, RouteScope, RouteTarget, Router, SubscriptionEntry,
};
pub use stats::{BrokerStats, DropReason, DropReport};
pub use transfer::SessionState;

/// The maps of the per-message path (topic trie, sessions by key, client id and connection):
/// foldhash instead of SipHash, which cost 7% of fan-in's CPU in routing and lookups. Topic
/// levels and client ids come from peers; foldhash's per-process random seed keeps them from
/// choosing colliding keys.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
