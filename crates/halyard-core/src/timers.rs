//! Deadlines: keep-alive, pushback bound, will delay and session expiry.

use std::time::Instant;

use halyard_codec::ReasonCode;

use crate::broker::{Broker, ConnectionId};
use crate::close::CloseKind;
use crate::message::SessionKey;

/// Deadlines the broker must act on. Each carries enough to tell whether it is still
/// current when it fires (see `TimerQueue` for how many there can be).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    KeepAlive(ConnectionId),
    /// Bound on how long a connection stays paused by backpressure.
    Pushback(ConnectionId),
    Will(SessionKey, u64),
    SessionExpiry(SessionKey, u64),
}

impl Broker {
    /// Time has passed: keep-alive deadlines, will delays and session expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::KeepAlive(conn) => self.check_keep_alive(now, conn),
                Timer::Pushback(conn) => self.check_pushback(now, conn),
                Timer::Will(key, epoch) => {
                    let Some(session) = self.sessions.get_mut(&key) else {
                        continue;
                    };
                    if session.epoch != epoch {
                        continue;
                    }
                    if let Some((due, will)) = session.delayed_will.take().map(|b| *b) {
                        if due <= now {
                            let client_id = session.client_id.clone();
                            self.save_session_record(key);
                            self.will_due(now, key, client_id, epoch, will);
                        } else {
                            session.delayed_will = Some(Box::new((due, will)));
                        }
                    }
                }
                Timer::SessionExpiry(key, epoch) => {
                    let expired = self.sessions.get(&key).is_some_and(|session| {
                        session.epoch == epoch
                            && session.link.is_none()
                            && session.expires_at.is_some_and(|at| at <= now)
                    });
                    if expired {
                        self.end_session(now, key);
                    }
                }
            }
        }
        self.retry_paused(now);
    }

    pub(crate) fn check_keep_alive(&mut self, now: Instant, conn: ConnectionId) {
        let Some(&key) = self.conns.get(&conn) else {
            return;
        };
        let Some(deadline) = self.link_mut(key).and_then(|link| link.deadline) else {
            return;
        };
        if deadline <= now && self.pushback.is_paused(conn) {
            // Silent because the server stopped reading it, not because it is gone.
            if let Some(link) = self.link_mut(key) {
                link.touch(now);
                if let Some(deadline) = link.deadline {
                    self.timers.arm(deadline, Timer::KeepAlive(conn));
                }
            }
            return;
        }
        if deadline <= now {
            // [MQTT-3.1.2-22]: silent for 1.5 x keep-alive.
            self.close_link(
                now,
                key,
                CloseKind::Abnormal(Some(ReasonCode::KEEP_ALIVE_TIMEOUT)),
            );
        } else {
            self.timers.arm(deadline, Timer::KeepAlive(conn));
        }
    }
}
