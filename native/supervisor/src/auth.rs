//! The handshake's proofs: HMAC-SHA256(secret, label + nonce hex), compared in constant time.
//! RustCrypto's `hmac`/`sha2` rather than our own SHA-256: they are the audited, widely used
//! implementations, and the cost is a few small crates and ~20 KiB of binary.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub fn proof(secret: &[u8], label: &str, nonce_hex: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.update(nonce_hex.as_bytes());
    hex(&mac.finalize().into_bytes())
}

pub fn verify(secret: &[u8], label: &str, nonce_hex: &str, proof_hex: &str) -> bool {
    let Some(given) = unhex(proof_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.update(nonce_hex.as_bytes());
    mac.verify_slice(&given).is_ok()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: writes at most n - got bytes into buf's remaining space.
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                e.kind() == std::io::ErrorKind::Interrupted,
                "getrandom: {e}"
            );
            continue;
        }
        got += r as usize;
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2() {
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proof_verifies_only_with_the_same_secret_label_and_nonce() {
        let p = proof(b"k", "sup:", "ab");
        assert!(verify(b"k", "sup:", "ab", &p));
        assert!(!verify(b"x", "sup:", "ab", &p));
        assert!(!verify(b"k", "agent:", "ab", &p));
        assert!(!verify(b"k", "sup:", "ac", &p));
        assert!(!verify(b"k", "sup:", "ab", "zz"));
        assert!(!verify(b"k", "sup:", "ab", &p[..10]));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
        assert_eq!(unhex("00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(unhex("ABcd").unwrap(), vec![0xab, 0xcd]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert_eq!(random_bytes(32).len(), 32);
    }
}
