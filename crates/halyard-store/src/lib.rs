//! Halyard's storage backends: implementations of [`halyard_core::store::Store`].
//!
//! - [`MemoryStore`] (`storage.backend = "memory"`): everything in RAM; survives a restart of
//!   the broker object, not of the process.
//! - [`RedbStore`] (`storage.backend = "redb"`): one redb file, group-committed per batch,
//!   with an [`FsyncPolicy`] deciding when a commit waits for the disk. Queued messages stay on
//!   disk and are read in pages. Every record carries a CRC32C checksum, verified at start-up
//!   and on every read. With [`OnCorruption::Salvage`] (the default) a damaged file or record
//!   never stops start-up: a damaged record is skipped, counted and removed; a file whose pages
//!   are damaged is set aside and every readable record copied to a new one; a file redb
//!   cannot open is set aside too, and its readable records are copied when its header still
//!   locates them, else the store starts empty; each loss is logged with what was lost. With
//!   [`OnCorruption::Refuse`] any of these stops start-up instead, changing nothing.
//!
//! The value format is described in the `format` module's source.

#![forbid(unsafe_code)]

mod deferred;
mod format;
mod memory;
mod readable_copy;
mod redb_errors;
mod redb_store;
mod salvage;
mod tables;

pub use memory::MemoryStore;
pub use redb_store::{FsyncPolicy, LoadReport, OnCorruption, RedbStore, FILE_NAME};
