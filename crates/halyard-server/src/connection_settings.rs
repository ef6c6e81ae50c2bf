//! What every connection task of a listener is started with.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::auth::Security;
use crate::event::Event;
use crate::inbound_budget::InboundBudget;
use crate::park::Parker;

/// Per-listener settings every connection task needs.
#[derive(Debug)]
pub(crate) struct ConnectionSettings {
    /// Time allowed between accept and a complete CONNECT.
    pub(crate) connect_timeout: Duration,
    /// Largest packet the decoder accepts.
    pub(crate) max_packet_size: u32,
    /// Password database and ACL; CONNECTs are authenticated against it before they are
    /// forwarded to the broker task.
    pub(crate) security: Arc<Security>,
    /// Where idle plain TCP connections park; `None` = they never park.
    pub(crate) parker: Option<Arc<Parker>>,
    /// The byte bound of the event channel to the broker task, shared with it.
    pub(crate) inbound: Arc<InboundBudget>,
    /// The broker task's lane for events of acknowledgements and PINGREQ only, which it
    /// takes before the main lane (see [`crate::event::takes_ack_lane`]); `None`: one lane.
    pub(crate) acks: Option<mpsc::Sender<Event>>,
}
