//! Retained messages: storing them and streaming them to new subscriptions a page at a time.

use std::sync::Arc;
use std::time::Instant;

use crate::authz::Access;
use crate::broker::{Broker, ConnectionId};
use crate::message::{Message, SessionKey};
use crate::output::Output;
use crate::retained::{is_sys_filter, RetainedPage};
use crate::router::SubscriptionEntry;
use crate::session::{Delivery, RetainedStream};

/// Retained messages read per page of a retained stream: what one session may hold read
/// ahead, and what goes out per write notification at QoS 0.
const RETAINED_PAGE: usize = 256;

impl Broker {
    /// Retained messages for new subscriptions, with RETAIN=1 [MQTT-3.3.1-8]: each request
    /// starts a stream that `pump` reads a page at a time. Not bounded by the session's queue
    /// limit: a wildcard subscriber gets every retained message, not only the first
    /// `max_queued_messages`; the stream's page is the bound on memory.
    pub(crate) fn send_retained(
        &mut self,
        now: Instant,
        key: SessionKey,
        requests: Vec<(String, SubscriptionEntry)>,
    ) {
        if requests.is_empty() {
            return;
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let streams = session.retained.get_or_insert_with(Box::default);
        for (filter, entry) in requests {
            streams.streams.push_back(RetainedStream {
                filter,
                entry,
                after: None,
                done: false,
            });
        }
        self.pump(now, key);
    }

    /// Moves a session's queued messages into its in-flight window, then continues its
    /// retained streams: when everything read has been sent, the next page is read (one per
    /// call, so a long stream never holds the broker task). After a page is sent the next
    /// waits for acknowledgements (QoS 1/2 in the window) or for [`Broker::handle_written`]
    /// (QoS 0, or a page with nothing to send).
    pub(crate) fn pump(&mut self, now: Instant, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.pump(now, &mut self.out);
        session.drop_finished_streams();
        if !session.wants_retained_page() {
            return;
        }
        let Some((filter, entry, after)) = session
            .retained
            .as_ref()
            .and_then(|streams| streams.streams.front())
            .map(|stream| (stream.filter.clone(), stream.entry, stream.after.clone()))
        else {
            return;
        };
        let page = self.read_retained(now, &filter, after.as_deref(), RETAINED_PAGE);
        let mut deliveries = Vec::with_capacity(page.messages.len());
        for message in page.messages {
            if !self.authorized(key, Access::Receive, &message.topic) {
                self.out.stats.denied_delivery += 1;
                continue;
            }
            deliveries.push(Delivery {
                seq: 0,
                qos: message.qos.min(entry.options.qos),
                retain: true,
                subscription_ids: entry.identifier.into_iter().collect(),
                message,
            });
        }
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(streams) = session.retained.as_deref_mut() else {
            return;
        };
        if let Some(stream) = streams.streams.front_mut() {
            stream.done = page.next.is_none();
            stream.after = page.next;
        }
        streams.ready.extend(deliveries);
        session.pump(now, &mut self.out);
        session.drop_finished_streams();
        let conn = session.link.as_ref().map(|link| link.conn);
        if let (Some(streams), Some(conn)) = (session.retained.as_deref_mut(), conn) {
            if streams.ready.is_empty() {
                streams.awaiting_write = true;
                self.out.outputs.push_back(Output::NotifyWritten { conn });
            }
        }
    }

    /// Everything written to `conn` up to an [`Output::NotifyWritten`] (or the notice the
    /// server sets after [`Broker::handle_congested`]) has reached its socket: the
    /// connection takes QoS 0 messages again, and its retained stream continues with its
    /// next page.
    pub fn handle_written(&mut self, now: Instant, conn: ConnectionId) {
        let Some(&key) = self.conns.get(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Some(link) = session.link.as_mut() {
            link.congested = false;
        }
        let Some(streams) = session.retained.as_deref_mut() else {
            return;
        };
        streams.awaiting_write = false;
        self.pump(now, key);
    }

    /// The server's writer for `conn` holds `max_outbound_buffer` unwritten, so it drops
    /// QoS 0 packets: until [`Broker::handle_written`] says it caught up, the core drops
    /// them first, counted per client, and builds no packet for them. One stalled
    /// subscriber of a busy topic then costs a flag test per message, not an encoding.
    pub fn handle_congested(&mut self, conn: ConnectionId) {
        let Some(&key) = self.conns.get(&conn) else {
            return;
        };
        if let Some(link) = self.sessions.get_mut(&key).and_then(|s| s.link.as_mut()) {
            link.congested = true;
        }
    }

    /// One page of retained messages matching `filter` after the cursor `after`: from the
    /// store when there is one, except `$SYS` topics, which are kept in memory only (see
    /// `set_retained`). Expired messages met are removed and left out.
    pub(crate) fn read_retained(
        &mut self,
        now: Instant,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> RetainedPage<Arc<Message>> {
        let mut page = match self.out.journal.as_mut().filter(|_| !is_sys_filter(filter)) {
            Some(journal) => match journal.store.read_retained(filter, after, limit) {
                Ok(page) => RetainedPage {
                    messages: page
                        .messages
                        .into_iter()
                        .map(|stored| Arc::new(journal.clock.message(stored)))
                        .collect(),
                    next: page.next,
                },
                // The store logged it; a stream that cannot be read ends, like a queue.
                Err(_) => RetainedPage {
                    messages: Vec::new(),
                    next: None,
                },
            },
            None => self.retained.read(filter, after, limit),
        };
        if page.messages.iter().any(|message| message.is_expired(now)) {
            let (expired, live) = page
                .messages
                .into_iter()
                .partition(|message| message.is_expired(now));
            page.messages = live;
            let expired: Vec<Arc<Message>> = expired;
            for message in expired {
                self.remove_retained(&message.topic);
            }
        }
        page
    }

    /// Stores `message` as its topic's retained message: in the store when there is one,
    /// except `$SYS` topics, which are stale after a restart and stay in memory.
    pub(crate) fn set_retained(&mut self, message: &Arc<Message>) {
        match self
            .out
            .journal
            .as_mut()
            .filter(|_| !is_sys_filter(&message.topic))
        {
            Some(journal) => journal
                .store
                .put_retained(&journal.clock.stored_message(message)),
            None => self.retained.set(Arc::clone(message)),
        }
    }

    /// Clears the retained message of `topic`, wherever `set_retained` put it.
    pub(crate) fn remove_retained(&mut self, topic: &str) {
        match self.out.journal.as_mut().filter(|_| !is_sys_filter(topic)) {
            Some(journal) => journal.store.delete_retained(topic),
            None => {
                self.retained.remove(topic);
            }
        }
    }

    /// A retained message another node published (replicated, see `Output::Retain`):
    /// stored here as if published here, without replicating it again. An empty payload
    /// clears the topic's.
    pub fn apply_retained(&mut self, message: Message) {
        if message.payload.is_empty() {
            self.remove_retained(&message.topic);
        } else {
            self.set_retained(&Arc::new(message));
        }
    }
}
