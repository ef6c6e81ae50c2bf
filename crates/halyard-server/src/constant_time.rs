//! The one constant-time comparison of secrets (password hashes, SCRAM proofs, the admin
//! token), so that timing never tells how much of a secret an attacker guessed right.

use subtle::ConstantTimeEq;

/// Whether `a` and `b` are equal, comparing every byte whatever the first difference
/// (a length difference is answered at once: lengths are not secret here).
pub(crate) fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_every_byte_is() {
        assert!(secrets_equal(b"token", b"token"));
        assert!(!secrets_equal(b"token", b"tokeN"));
        assert!(!secrets_equal(b"token", b"token!"));
        assert!(secrets_equal(b"", b""));
    }
}
