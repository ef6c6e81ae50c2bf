//! Copying every readable record out of a damaged data file into a new one.
//!
//! redb stops an iteration at a damaged page (an error, or a panic caught here), so each table
//! is read in passes that skip past the damage: see [`copy_deliveries`] and
//! [`copy_string_table`]. Everything that is not copied is logged with the key range it lay in.

// redb's own error type is 160 bytes; it travels only on cold failure paths.
#![allow(clippy::result_large_err)]

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use halyard_core::store::StoreError;
use redb::{
    Builder, Database, Durability, Key, ReadOnlyTable, ReadTransaction, ReadableTable,
    TableDefinition, TableHandle, Value, WriteTransaction,
};
use tracing::{error, info, warn};

use crate::readable_copy::readable_copy;
use crate::redb_errors::{is_corruption, panic_message, RedbResult};
use crate::tables::{
    CACHE_BYTES, DELIVERIES, FORWARDS, FORWARDS_ACKED, INBOUND_QOS2, PEER_MARKS, RELAYS, RETAINED,
    SESSIONS, SUBSCRIPTIONS,
};

/// Copies every readable record of `table` from a damaged database into `to`: forward from
/// the first key until a damaged page stops the scan, then backward from the last key until
/// it meets a damaged page or what was already copied. Logs what was lost, between which keys.
fn copy_table<K, V>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<(), redb::Error>
where
    K: Key + 'static,
    V: Value + 'static,
    for<'a> K::SelfType<'a>: fmt::Debug,
{
    let name = table.name();
    let mut target = to.open_table(table)?;
    let mut copied = 0u64;
    let mut last_forward = None;
    let forward = catch_unwind(AssertUnwindSafe(|| -> Result<(), redb::Error> {
        for entry in from.open_table(table)?.iter()? {
            let (key, value) = entry?;
            target.insert(key.value(), value.value())?;
            copied += 1;
            last_forward = Some(format!("{:?}", key.value()));
        }
        Ok(())
    }));
    let damage = match forward {
        Ok(Ok(())) => {
            info!(table = name, copied, "table salvaged intact");
            return Ok(());
        }
        // An I/O error (say, writing the new file) is not damage of the old one.
        Ok(Err(e)) if !is_corruption(&e) => return Err(e),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_message(&*panic),
    };
    let mut first_backward = None;
    let backward = catch_unwind(AssertUnwindSafe(|| -> Result<(), redb::Error> {
        for entry in from.open_table(table)?.iter()?.rev() {
            let (key, value) = entry?;
            if target.get(key.value())?.is_some() {
                break;
            }
            target.insert(key.value(), value.value())?;
            copied += 1;
            first_backward = Some(format!("{:?}", key.value()));
        }
        Ok(())
    }));
    if let Ok(Err(e)) = backward {
        if !is_corruption(&e) {
            return Err(e);
        }
    }
    error!(
        table = name,
        copied,
        after_key = last_forward.as_deref().unwrap_or("(start of table)"),
        before_key = first_backward.as_deref().unwrap_or("(end of table)"),
        %damage,
        "records of this table between these keys were unreadable and are lost"
    );
    Ok(())
}

/// What reading a damaged table from a key on found first.
enum Probe {
    /// A readable record.
    Readable,
    /// No record at or after the key.
    End,
    /// A damaged page (a redb corruption error or panic).
    Damaged,
}

/// Whether the deliveries from `key` on start with a readable record.
fn probe_deliveries(
    source: &ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    key: (&str, u64),
) -> Result<Probe, redb::Error> {
    let first = catch_unwind(AssertUnwindSafe(|| -> Result<bool, redb::Error> {
        match source.range(key..)?.next() {
            None => Ok(false),
            Some(entry) => entry.map(|_| true).map_err(redb::Error::from),
        }
    }));
    match first {
        Ok(Ok(true)) => Ok(Probe::Readable),
        Ok(Ok(false)) => Ok(Probe::End),
        Ok(Err(e)) if !is_corruption(&e) => Err(e),
        Ok(Err(_)) | Err(_) => Ok(Probe::Damaged),
    }
}

/// The first sequence number after `last` of `client`'s queue from which the deliveries
/// read again, found by doubling steps past the damage, then halving back to its end; `None`
/// when no later sequence number of the client reads.
fn resume_after(
    source: &ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    client: &str,
    last: u64,
) -> Result<Option<u64>, redb::Error> {
    let mut damaged = last;
    let mut step = 1u64;
    let readable = loop {
        let Some(probe) = last.checked_add(step) else {
            return Ok(None);
        };
        match probe_deliveries(source, (client, probe))? {
            Probe::Readable => break probe,
            Probe::End => return Ok(None),
            Probe::Damaged => damaged = probe,
        }
        step = step.saturating_mul(2);
    };
    // Every probe in (last, damaged] failed and `readable` reads: narrow the boundary.
    let mut readable = readable;
    while readable - damaged > 1 {
        let mid = damaged + (readable - damaged) / 2;
        match probe_deliveries(source, (client, mid))? {
            Probe::Damaged => damaged = mid,
            Probe::Readable | Probe::End => readable = mid,
        }
    }
    Ok(Some(readable))
}

/// [`copy_table`] for the deliveries, the table that holds the queues and so most of the
/// data: past a damaged page it resumes at the next readable sequence number of the same
/// queue (see [`resume_after`]), so damage in several places loses only the damaged pages'
/// records; what lies beyond a queue's last readable record is left to the backward scan.
fn copy_deliveries(from: &ReadTransaction, to: &WriteTransaction) -> Result<(), redb::Error> {
    let opened = catch_unwind(AssertUnwindSafe(|| from.open_table(DELIVERIES)));
    // A table that does not even open is left to `copy_table`, which reports why.
    let Ok(Ok(source)) = opened else {
        return copy_table(from, to, DELIVERIES);
    };
    let mut copied = 0u64;
    let mut start: Option<(String, u64)> = None;
    {
        let mut target = to.open_table(DELIVERIES)?;
        loop {
            let mut last: Option<(String, u64)> = None;
            let pass = catch_unwind(AssertUnwindSafe(|| -> Result<(), redb::Error> {
                let range = match &start {
                    None => source.iter()?,
                    Some((client, seq)) => source.range((client.as_str(), *seq)..)?,
                };
                for entry in range {
                    let (key, value) = entry?;
                    target.insert(key.value(), value.value())?;
                    copied += 1;
                    let (client, seq) = key.value();
                    match &mut last {
                        Some((c, s)) if c == client => *s = seq,
                        _ => last = Some((client.to_owned(), seq)),
                    }
                }
                Ok(())
            }));
            match pass {
                Ok(Ok(())) => {
                    info!(table = DELIVERIES.name(), copied, "table salvaged");
                    return Ok(());
                }
                Ok(Err(e)) if !is_corruption(&e) => return Err(e),
                Ok(Err(_)) | Err(_) => {}
            }
            let Some((client, seq)) = last.or(start.take()) else {
                break;
            };
            match resume_after(&source, &client, seq)? {
                Some(next) => {
                    error!(
                        table = DELIVERIES.name(),
                        %client,
                        after_seq = seq,
                        before_seq = next,
                        "queued messages between these sequence numbers were unreadable and are lost"
                    );
                    start = Some((client, next));
                }
                None => break,
            }
        }
    }
    // Past the last queue that reads forward: the backward scan takes the rest.
    copy_table(from, to, DELIVERIES)
}

/// A string strictly between `lo` and `hi` (`lo < hi`), about halfway in key order: strings
/// read as fractions in base 128 when both are ASCII (most client ids and topics), else in
/// the base of Unicode scalar values. `None` when none lies between at this precision.
fn string_between(lo: &str, hi: &str) -> Option<String> {
    const SURROGATES: u32 = 0x800;
    let ascii = lo.is_ascii() && hi.is_ascii();
    let base: u64 = if ascii {
        128
    } else {
        0x11_0000 - u64::from(SURROGATES)
    };
    let digit = |c: char| {
        let c = u32::from(c);
        u64::from(if c >= 0xE000 { c - SURROGATES } else { c })
    };
    let len = lo.chars().count().max(hi.chars().count()) + 1;
    let digits = |text: &str| {
        let mut out: Vec<u64> = text.chars().map(digit).collect();
        out.resize(len, 0);
        out
    };
    let (a, b) = (digits(lo), digits(hi));
    // (a + b) / 2, digit by digit from the most significant, carrying remainders down.
    let mut mid = Vec::with_capacity(len);
    let mut carry = 0u64;
    let mut sum: Vec<u64> = vec![0; len];
    for i in (0..len).rev() {
        let total = a[i] + b[i] + carry;
        sum[i] = total % base;
        carry = total / base;
    }
    let mut remainder = carry;
    for &d in &sum {
        let value = remainder * base + d;
        mid.push(value / 2);
        remainder = value % 2;
    }
    let text: Option<String> = mid
        .into_iter()
        .map(|d| {
            let d = u32::try_from(d).ok()?;
            char::from_u32(if d >= 0xD800 { d + SURROGATES } else { d })
        })
        .collect();
    text.filter(|m| lo < m.as_str() && m.as_str() < hi)
}

/// Whether the records of a string-keyed table from `key` on start with a readable one.
fn probe_strings(
    source: &ReadOnlyTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Probe, redb::Error> {
    let first = catch_unwind(AssertUnwindSafe(|| -> Result<bool, redb::Error> {
        match source.range::<&str>(key..)?.next() {
            None => Ok(false),
            Some(entry) => entry.map(|_| true).map_err(redb::Error::from),
        }
    }));
    match first {
        Ok(Ok(true)) => Ok(Probe::Readable),
        Ok(Ok(false)) => Ok(Probe::End),
        Ok(Err(e)) if !is_corruption(&e) => Err(e),
        Ok(Err(_)) | Err(_) => Ok(Probe::Damaged),
    }
}

/// Probes allowed per damaged stretch; enough for keys sharing a prefix of some 30 ASCII
/// characters, and each is one B-tree descent.
const MAX_PROBES: usize = 256;

/// [`copy_table`] for a string-keyed table (sessions, retained messages): it first copies
/// backward from the last key to the first damaged page, then forward from the first key,
/// and past each damaged page resumes at the next readable key, found by halving the key
/// range between the damage and the lowest key read backward (see [`string_between`]).
fn copy_string_table(
    from: &ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<&'static str, &'static [u8]>,
) -> Result<(), redb::Error> {
    let name = table.name();
    let opened = catch_unwind(AssertUnwindSafe(|| from.open_table(table)));
    let Ok(Ok(source)) = opened else {
        return copy_table(from, to, table);
    };
    let mut target = to.open_table(table)?;
    let mut copied = 0u64;
    // Backward: the lowest key read from the end, where forward copying may stop.
    let mut lowest: Option<String> = None;
    let backward = catch_unwind(AssertUnwindSafe(|| -> Result<(), redb::Error> {
        for entry in source.iter()?.rev() {
            let (key, value) = entry?;
            target.insert(key.value(), value.value())?;
            copied += 1;
            lowest = Some(key.value().to_owned());
        }
        Ok(())
    }));
    match backward {
        Ok(Ok(())) => {
            info!(table = name, copied, "table salvaged intact");
            return Ok(());
        }
        Ok(Err(e)) if !is_corruption(&e) => return Err(e),
        Ok(Err(_)) | Err(_) => {}
    }
    let mut start: Option<String> = None;
    loop {
        let mut last: Option<String> = None;
        let forward = catch_unwind(AssertUnwindSafe(|| -> Result<(), redb::Error> {
            let range = match &start {
                None => source.iter()?,
                Some(key) => source.range::<&str>(key.as_str()..)?,
            };
            for entry in range {
                let (key, value) = entry?;
                let key = key.value();
                if lowest.as_deref().is_some_and(|low| key >= low) {
                    return Ok(()); // Met what the backward pass copied.
                }
                target.insert(key, value.value())?;
                copied += 1;
                last = Some(key.to_owned());
            }
            Ok(())
        }));
        match forward {
            Ok(Ok(())) => break,
            Ok(Err(e)) if !is_corruption(&e) => return Err(e),
            Ok(Err(_)) | Err(_) => {}
        }
        // Nothing read yet: the damage may start at the first key.
        let damaged_after = last.or(start.take()).unwrap_or_default();
        let Some(high) = lowest.clone() else {
            error!(table = name, after_key = %damaged_after.escape_debug(), "records of this table after this key were unreadable and are lost");
            break;
        };
        // Every probe in (damaged_after, low] fails; `high` reads.
        let (mut low, mut high) = (damaged_after.clone(), high);
        for _ in 0..MAX_PROBES {
            let Some(mid) = string_between(&low, &high) else {
                break;
            };
            match probe_strings(&source, &mid)? {
                Probe::Damaged => low = mid,
                Probe::Readable | Probe::End => high = mid,
            }
        }
        error!(table = name, after_key = %damaged_after.escape_debug(), before_key = %high.escape_debug(), "records of this table between these keys were unreadable and are lost");
        if lowest.as_deref() == Some(high.as_str()) {
            break;
        }
        start = Some(high);
    }
    info!(table = name, copied, "table salvaged in part");
    Ok(())
}

/// Whether `table` exists in the database read by `txn`.
fn has_table<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> bool {
    !matches!(
        txn.open_table(table),
        Err(redb::TableError::TableDoesNotExist(_))
    )
}

/// Copies every readable record of every table from a damaged database into `to`.
pub(crate) fn copy_all(damaged: &Database, to: &Database) -> Result<(), StoreError> {
    let from = catch_unwind(AssertUnwindSafe(|| damaged.begin_read()))
        .map_err(|panic| StoreError::new(format!("salvaging: {}", panic_message(&*panic))))?
        .or_store("salvaging")?;
    let mut to = to.begin_write().or_store("salvaging")?;
    to.set_durability(Durability::Immediate);
    copy_string_table(&from, &to, SESSIONS).or_store("salvaging")?;
    copy_table(&from, &to, SUBSCRIPTIONS).or_store("salvaging")?;
    copy_table(&from, &to, INBOUND_QOS2).or_store("salvaging")?;
    copy_deliveries(&from, &to).or_store("salvaging")?;
    copy_string_table(&from, &to, RETAINED).or_store("salvaging")?;
    // Files written before the cluster's outbox have none of its tables.
    if has_table(&from, FORWARDS) {
        copy_table(&from, &to, FORWARDS).or_store("salvaging")?;
    }
    if has_table(&from, FORWARDS_ACKED) {
        copy_table(&from, &to, FORWARDS_ACKED).or_store("salvaging")?;
    }
    if has_table(&from, PEER_MARKS) {
        copy_table(&from, &to, PEER_MARKS).or_store("salvaging")?;
    }
    if has_table(&from, RELAYS) {
        copy_table(&from, &to, RELAYS).or_store("salvaging")?;
    }
    to.commit().or_store("salvaging")
}

/// Copies what can still be read from a file redb would not open (set aside at `aside`) into
/// the new database `to`, through a [`readable_copy`] beside it that is removed afterwards.
/// What cannot be read is logged; only an I/O error on the new file is returned.
pub(crate) fn recover_unopenable(aside: &Path, to: &Database) -> Result<(), StoreError> {
    let mut name = aside.as_os_str().to_owned();
    name.push(".readable");
    let copy = PathBuf::from(name);
    let lost = "the store starts empty: the sessions, queued messages and retained messages \
                of the set-aside file are not loaded";
    match readable_copy(aside, &copy) {
        Ok(true) => {}
        Ok(false) => {
            error!(file = %aside.display(), "the file's header is unrecognisable, so its tables cannot be located; {lost}");
            return Ok(());
        }
        Err(e) => {
            error!(file = %aside.display(), error = %e, "cannot copy the damaged file to read it; {lost}");
            return Ok(());
        }
    }
    let mut builder = Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    let opened = catch_unwind(AssertUnwindSafe(|| builder.open(&copy)));
    let result = match opened {
        Ok(Ok(damaged)) => {
            let copied = copy_all(&damaged, to);
            if catch_unwind(AssertUnwindSafe(move || drop(damaged))).is_err() {
                warn!(file = %copy.display(), "closing the damaged copy failed");
            }
            copied.map(|()| info!(file = %aside.display(), "readable records of the set-aside file copied"))
        }
        Ok(Err(e)) => {
            error!(file = %aside.display(), error = %e, "redb cannot open even a length-corrected copy; {lost}");
            Ok(())
        }
        Err(panic) => {
            error!(file = %aside.display(), error = panic_message(&*panic), "redb cannot open even a length-corrected copy; {lost}");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(&copy) {
        warn!(file = %copy.display(), error = %e, "removing the salvage copy failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_between_lies_strictly_between() {
        let pairs = [
            ("client-00123", "client-00124"),
            ("a", "b"),
            ("", "a"),
            ("a", "a\u{0}\u{1}"),
            ("r\u{0}x", "r\u{0}y\u{0}z"),
            ("caf\u{e9}", "cafe\u{301}x"),
            ("\u{d7ff}", "\u{e000}"),
            ("x\u{10ffff}", "y"),
        ];
        for (lo, hi) in pairs {
            let (lo, hi) = if lo < hi { (lo, hi) } else { (hi, lo) };
            let mid = string_between(lo, hi).unwrap_or_else(|| panic!("{lo:?}..{hi:?}"));
            assert!(
                lo < mid.as_str() && mid.as_str() < hi,
                "{lo:?} {mid:?} {hi:?}"
            );
        }
        // Nothing lies between a string and its successor.
        assert_eq!(string_between("a", "a\u{0}"), None);
        // Halving converges on a boundary within the probe budget for long shared prefixes.
        let (mut lo, mut hi) = ("device-0000000000000001".to_owned(), "device-9".to_owned());
        let target = "device-0000000000000002";
        for _ in 0..MAX_PROBES {
            let Some(mid) = string_between(&lo, &hi) else {
                break;
            };
            if mid.as_str() < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let next = "device-0000000000000002\u{1}";
        assert!(target <= hi.as_str() && hi.as_str() < next, "{lo:?} {hi:?}");
    }
}
