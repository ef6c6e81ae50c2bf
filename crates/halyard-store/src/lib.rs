//! Halyard's storage backends: implementations of [`halyard_core::store::Store`].
//!
//! - [`MemoryStore`] (`storage.backend = "memory"`): everything in RAM; survives a restart of
//!   the broker object, not of the process.
//! - [`RedbStore`] (`storage.backend = "redb"`): one redb file, group-committed per batch,
//!   with an [`FsyncPolicy`] deciding when a commit waits for the disk. Queued messages stay on
//!   disk and are read in pages. A damaged file or record never stops start-up: a file redb
//!   cannot open is set aside and the store starts empty; a file whose pages are damaged is set
//!   aside and every readable record copied to a new one; an undecodable record is skipped and
//!   removed; each loss is logged with what was lost.
//!
//! The value format is described in the `format` module's source.

#![forbid(unsafe_code)]

mod format;
mod memory;
mod redb_store;

pub use memory::MemoryStore;
pub use redb_store::{FsyncPolicy, LoadReport, RedbStore, FILE_NAME};
