//! Conversion between the broker's monotonic `Instant`s and the wall-clock times the store
//! keeps, so that expiry deadlines mean the same after a restart.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::message::{boxed_properties, Message};
use crate::session::Delivery;
use crate::store::{StoredDelivery, StoredMessage};

/// One instant known on both clocks, taken when the broker was built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockAnchor {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl ClockAnchor {
    pub fn to_wall(self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.wall + after,
            None => self.wall - self.instant.duration_since(at),
        }
    }

    /// A wall-clock time as an instant; times before the anchor map to the anchor (they are
    /// already due).
    pub fn to_instant(self, at: SystemTime) -> Instant {
        match at.duration_since(self.wall) {
            Ok(after) => self.instant + after,
            Err(_) => self.instant,
        }
    }

    pub fn stored_message(&self, message: &Message) -> StoredMessage {
        StoredMessage {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos: message.qos,
            retain: message.retain,
            properties: message.properties.as_deref().cloned().unwrap_or_default(),
            expires_at: message.expires_at.map(|at| self.to_wall(at)),
        }
    }

    pub fn message(&self, stored: StoredMessage) -> Message {
        Message {
            topic: stored.topic,
            payload: stored.payload,
            qos: stored.qos,
            retain: stored.retain,
            properties: boxed_properties(stored.properties),
            expires_at: stored.expires_at.map(|at| self.to_instant(at)),
            publisher: None,
        }
    }

    pub fn stored_delivery(&self, delivery: &Delivery) -> StoredDelivery {
        StoredDelivery {
            message: self.stored_message(&delivery.message),
            qos: delivery.qos,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids.clone(),
        }
    }

    pub fn delivery(&self, seq: u64, stored: StoredDelivery) -> Delivery {
        Delivery {
            seq,
            message: Arc::new(self.message(stored.message)),
            qos: stored.qos,
            retain: stored.retain,
            subscription_ids: stored.subscription_ids,
        }
    }
}
