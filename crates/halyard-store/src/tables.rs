//! The tables of the data file and the page cache every opening of it uses.

use redb::TableDefinition;

/// client id -> session record.
pub(crate) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (client id, filter) -> subscription entry; one client's filters are adjacent.
pub(crate) const SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("subscriptions");
/// (client id, packet id) -> (): inbound QoS 2 ids awaiting PUBREL.
pub(crate) const INBOUND_QOS2: TableDefinition<(&str, u16), ()> =
    TableDefinition::new("inbound_qos2");
/// (client id, seq) -> state + delivery; a session's queue is one ordered key range.
pub(crate) const DELIVERIES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("deliveries");
/// retained key (the topic's levels joined by U+0000, see `halyard_core::retained`) ->
/// retained message: key order is level-wise topic order, so a filter's matches lie in the key
/// range of its literal prefix and are read a page at a time.
pub(crate) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained_levels");
/// The retained table of earlier versions, keyed by topic; moved to [`RETAINED`] at open.
pub(crate) const LEGACY_RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// (destination node, seq) -> forward: a cluster node's outbox, one ordered range per
/// destination, kept until the destination has stored each forward.
pub(crate) const FORWARDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("forwards");
/// destination node -> every forward up to this seq was acknowledged (survives an empty
/// outbox, so sequence numbers keep rising).
pub(crate) const FORWARDS_ACKED: TableDefinition<u64, u64> = TableDefinition::new("forwards_acked");
/// origin node -> (incarnation, seq) of the newest forward stored from it: the duplicate
/// filter of the receiving side.
pub(crate) const PEER_MARKS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("peer_marks");
/// (client id, claim epoch) -> relay of a session that moved on (see `StoredRelay`).
pub(crate) const RELAYS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("relays");

/// Page cache of the database.
pub(crate) const CACHE_BYTES: usize = 16 * 1024 * 1024;
