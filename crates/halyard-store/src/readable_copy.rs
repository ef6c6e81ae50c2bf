//! A copy of a damaged data file that redb will open, so its intact records can be read.
//!
//! redb refuses a file shorter than the layout its header records (a file truncated by a
//! full disk or a cut-short copy), and runs a repair pass, which gives up on the first damaged
//! page, on a file marked as not closed cleanly. Neither refusal concerns the pages that are
//! intact. The copy made here has the recorded length (the missing tail reads as zeros, which
//! redb reports as damaged pages) and no "repair needed" mark, so redb opens it and the store
//! copies out every record it can still read. This knows four fields of redb's file header
//! (file format v3, redb 2.x; `corruption.rs` tests pin it): a header whose magic number or
//! layout is gone leaves nothing to locate the tables by, and no copy is made.

use std::fs;
use std::io;
use std::path::Path;

/// redb's magic number, the first bytes of every file it writes.
const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// The header byte holding redb's flags, and its "repair needed on open" flag.
const GOD_BYTE: usize = 9;
const RECOVERY_REQUIRED: u8 = 2;
/// Little-endian u32 fields of the header: page size, then the region layout.
const PAGE_SIZE: usize = 12;
const REGION_HEADER_PAGES: usize = 16;
const REGION_MAX_DATA_PAGES: usize = 20;
const FULL_REGIONS: usize = 24;
const TRAILING_REGION_DATA_PAGES: usize = 28;
const LAYOUT_END: usize = 32;

fn field(header: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&header[at..at + 4]);
    u64::from(u32::from_le_bytes(bytes))
}

/// The file length the header records, if the header is recognisable and consistent.
fn recorded_len(header: &[u8]) -> Option<u64> {
    if header.len() < LAYOUT_END || header[..MAGIC.len()] != MAGIC {
        return None;
    }
    let page_size = field(header, PAGE_SIZE);
    if !page_size.is_power_of_two() || !(512..=1 << 20).contains(&page_size) {
        return None;
    }
    let region_header = field(header, REGION_HEADER_PAGES);
    let region_data = field(header, REGION_MAX_DATA_PAGES);
    let full_regions = field(header, FULL_REGIONS);
    let trailing = field(header, TRAILING_REGION_DATA_PAGES);
    // The super-header page, the full regions, then a partial one if it has data pages.
    let full = full_regions.checked_mul(region_header.checked_add(region_data)?)?;
    let partial = if trailing > 0 {
        region_header.checked_add(trailing)?
    } else {
        0
    };
    let pages = 1u64.checked_add(full)?.checked_add(partial)?;
    pages.checked_mul(page_size)
}

/// Writes to `copy` a version of `damaged` that redb opens without its repair pass, at the
/// length its header records. Returns `Ok(false)` (and writes nothing) when the header is
/// unrecognisable: then no record can be located.
pub(crate) fn readable_copy(damaged: &Path, copy: &Path) -> io::Result<bool> {
    let mut bytes = fs::read(damaged)?;
    let Some(len) = recorded_len(&bytes) else {
        return Ok(false);
    };
    let Ok(len) = usize::try_from(len) else {
        return Ok(false);
    };
    // A header claiming far more than the file held is damage too, not a layout to honour.
    if len > bytes.len().saturating_mul(64).max(1 << 20) {
        return Ok(false);
    }
    bytes.resize(len, 0);
    bytes[GOD_BYTE] &= !RECOVERY_REQUIRED;
    fs::write(copy, &bytes)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(full_regions: u32, trailing: u32) -> Vec<u8> {
        let mut header = vec![0; 64];
        header[..MAGIC.len()].copy_from_slice(&MAGIC);
        header[GOD_BYTE] = RECOVERY_REQUIRED | 1;
        let mut put = |at: usize, v: u32| header[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(PAGE_SIZE, 4096);
        put(REGION_HEADER_PAGES, 2);
        put(REGION_MAX_DATA_PAGES, 100);
        put(FULL_REGIONS, full_regions);
        put(TRAILING_REGION_DATA_PAGES, trailing);
        header
    }

    #[test]
    fn recorded_length_follows_the_layout() {
        assert_eq!(recorded_len(&header(0, 10)), Some((1 + 2 + 10) * 4096));
        assert_eq!(recorded_len(&header(3, 0)), Some((1 + 3 * 102) * 4096));
        let mut no_magic = header(0, 10);
        no_magic[0] = 0;
        assert_eq!(recorded_len(&no_magic), None);
        let mut odd_page = header(0, 10);
        odd_page[PAGE_SIZE] = 3;
        assert_eq!(recorded_len(&odd_page), None);
        assert_eq!(recorded_len(&header(0, 10)[..20]), None);
    }

    #[test]
    fn copy_is_extended_and_unmarked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (damaged, copy) = (dir.path().join("d"), dir.path().join("c"));
        fs::write(&damaged, header(0, 10)).expect("write");
        assert!(readable_copy(&damaged, &copy).expect("copies"));
        let bytes = fs::read(&copy).expect("read");
        assert_eq!(bytes.len(), 13 * 4096);
        assert_eq!(bytes[GOD_BYTE], 1, "only the repair flag is cleared");

        fs::write(&damaged, vec![0; 8192]).expect("write");
        fs::remove_file(&copy).expect("remove");
        assert!(!readable_copy(&damaged, &copy).expect("no copy"));
        assert!(!copy.exists());
    }
}
