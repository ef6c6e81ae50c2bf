//! Probing a full store until it takes writes again (see `disk_full` in the core).

use std::time::{Duration, Instant};

use halyard_core::store::StoreError;
use halyard_core::Broker;
use tracing::{error, info};

use crate::blocking::blocking;

/// First wait between probes of a full store; doubled after each failed probe.
const FIRST_PROBE_DELAY: Duration = Duration::from_millis(250);

/// Longest wait between probes: space freed is noticed within this, and a probe (which
/// reopens the data file) costs little at this rate.
const MAX_PROBE_DELAY: Duration = Duration::from_secs(5);

/// When the broker task next probes a full store, with exponential backoff.
#[derive(Debug, Default)]
pub(crate) struct DiskFullProbe {
    next: Option<Instant>,
    delay: Duration,
}

impl DiskFullProbe {
    /// A degraded episode began: the first probe comes soon.
    pub(crate) fn start(&mut self) {
        self.delay = FIRST_PROBE_DELAY;
        self.next = Some(Instant::now() + self.delay);
    }

    /// When to probe, if the broker is degraded.
    pub(crate) fn due(&self, broker: &Broker) -> Option<Instant> {
        self.next.filter(|_| broker.is_disk_full())
    }

    /// Probes once; on success degraded mode ends (logged once), otherwise the wait doubles.
    pub(crate) fn probe(&mut self, broker: &mut Broker) -> Result<(), StoreError> {
        let since = broker.disk_full_since();
        let probed = blocking(true, || broker.probe_store(Instant::now()));
        let recovered = probed.inspect_err(|error| {
            error!(%error, "probing the full store failed with another error; stopping");
        })?;
        if recovered {
            let degraded_secs = since.map_or(0, |at| at.elapsed().as_secs());
            info!(
                degraded_secs,
                "the data directory has space again: degraded mode ended"
            );
            self.next = None;
        } else {
            self.delay = (self.delay * 2).min(MAX_PROBE_DELAY);
            self.next = Some(Instant::now() + self.delay);
        }
        Ok(())
    }
}
