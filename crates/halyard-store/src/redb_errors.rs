//! redb's errors, and the panics it raises on some damaged pages, as the store reports them.

use halyard_core::store::{io_is_no_space, StoreError};

/// Turns a redb error into the store's, saying what was being done; a full file system
/// (ENOSPC, EDQUOT) becomes a `NoSpace` error, which degrades the broker instead of
/// stopping it.
pub(crate) fn failed(context: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| {
        let message = format!("{context}: {e}");
        if is_no_space(&e) {
            StoreError::no_space(message)
        } else {
            StoreError::new(message)
        }
    }
}

/// Whether redb failed because the file system has no space (or quota) left.
fn is_no_space(error: &redb::Error) -> bool {
    matches!(error, redb::Error::Io(io) if io_is_no_space(io))
}

/// Converts any redb error to [`redb::Error`], the type [`failed`] and [`is_corruption`] read.
pub(crate) trait RedbResult<T> {
    fn or_store(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> RedbResult<T> for Result<T, E> {
    fn or_store(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| failed(context)(e.into()))
    }
}

/// Whether the error means the file is damaged (rather than, say, unwritable or locked).
pub(crate) fn is_corruption(error: &redb::Error) -> bool {
    match error {
        redb::Error::Corrupted(_) => true,
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(errno: i32) -> StoreError {
        failed("committing")(redb::Error::Io(std::io::Error::from_raw_os_error(errno)))
    }

    #[test]
    fn a_full_disk_or_quota_is_no_space_and_other_io_errors_are_not() {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        const EACCES: i32 = 13;
        const EIO: i32 = 5;
        assert!(classified(ENOSPC).is_no_space());
        assert!(classified(EDQUOT).is_no_space());
        assert!(!classified(EACCES).is_no_space());
        assert!(!classified(EIO).is_no_space());
        assert!(!failed("committing")(redb::Error::PreviousIo).is_no_space());
    }
}
