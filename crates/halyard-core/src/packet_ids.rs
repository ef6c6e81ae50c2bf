//! Which packet identifiers a session's owner gives the QoS 1/2 messages it sends.
//!
//! A client keeps the identifier of a QoS 2 message it acknowledged with PUBREC until the
//! PUBREL, and takes a PUBLISH under that identifier meanwhile as a resend, which it does
//! not deliver again [MQTT-4.3.3-9]. A cluster node that resumes a session from the
//! replicated subscriptions (its previous owner was lost) does not know which identifiers
//! the client still holds, so it must not number from where the lost owner did. Each claim
//! of a client id therefore numbers in its own slice of the identifier space, chosen by the
//! claim's generation: the next owner's slice never overlaps the previous one's, and only a
//! client holding an exchange of the owner [`SLICES`] claims back could see a collision.

/// How many slices the identifier space is cut into.
pub const SLICES: u32 = 16;

/// Identifiers per slice: 4,096, far more than a session's in-flight window (`max_inflight`,
/// 32 by default). A window wider than its slice numbers across the whole space.
const SLICE_LEN: u32 = 65_536 / SLICES;

/// An inclusive range of packet identifiers (never 0 [MQTT-2.2.1-3]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketIds {
    first: u16,
    last: u16,
}

impl PacketIds {
    /// The whole space: a single node, which keeps every session it owned.
    pub const ALL: PacketIds = PacketIds {
        first: 1,
        last: u16::MAX,
    };

    /// The slice for a claim of `generation` (see the module doc).
    pub fn for_generation(generation: u32) -> PacketIds {
        let slice = generation % SLICES;
        let start = slice * SLICE_LEN;
        let end = start + SLICE_LEN - 1;
        PacketIds {
            first: u16::try_from(start.max(1)).unwrap_or(1),
            last: u16::try_from(end).unwrap_or(u16::MAX),
        }
    }

    /// The first identifier of the range.
    pub fn first(self) -> u16 {
        self.first
    }

    /// How many identifiers the range has.
    pub fn len(self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty; here for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        false
    }

    /// Whether `id` is in the range.
    pub fn contains(self, id: u16) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// The identifier after `id` of the range, wrapping to its first.
    pub fn after(self, id: u16) -> u16 {
        if id >= self.last {
            self.first
        } else {
            id + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_generations_number_in_disjoint_slices_that_cover_the_space() {
        let slices: Vec<PacketIds> = (0..SLICES).map(PacketIds::for_generation).collect();
        assert_eq!(slices[0].first(), 1, "0 is never an identifier");
        assert_eq!(slices[15].last, u16::MAX);
        for pair in slices.windows(2) {
            assert_eq!(u32::from(pair[0].last) + 1, u32::from(pair[1].first));
        }
        let total: usize = slices.iter().map(|slice| slice.len()).sum();
        assert_eq!(total, usize::from(u16::MAX));
        assert_eq!(PacketIds::for_generation(SLICES + 3), slices[3]);
    }

    #[test]
    fn numbering_wraps_inside_its_slice() {
        let slice = PacketIds::for_generation(2);
        assert_eq!(slice.after(slice.first()), slice.first() + 1);
        assert_eq!(slice.after(slice.last), slice.first());
        assert!(slice.contains(slice.last) && !slice.contains(7));
        assert_eq!(PacketIds::ALL.after(u16::MAX), 1);
    }
}
