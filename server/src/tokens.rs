//! API tokens: 32 random bytes from the kernel, shown once as `cst_` + 64 hex digits, kept only as
//! the SHA-256 of that text. SHA-256 and not a password hash: a token is checked on every
//! request, is as long as a key, and a slow hash there would be a denial-of-service lever.

use sha2::{Digest, Sha256};

/// What every construir token starts with (so a leaked one is recognisable, as GitLab's `glrt-`).
pub const PREFIX: &str = "cst_";

/// A new token's text.
pub fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(format!("{PREFIX}{}", hex(&bytes)))
}

/// `bytes` random bytes in hex (a CSRF token, a cookie's value).
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(std::io::Error::other)?;
    Ok(hex(&buf))
}

/// Whether a draw with a chance of `percent` in 100 comes up (the kernel's random source: a
/// runner cannot predict it from anything it sees).
pub fn draw(percent: u8) -> std::io::Result<bool> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(u64::from_le_bytes(bytes) % 100 < u64::from(percent))
}

/// What is stored for a token, and looked up on each request.
pub fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether `text` has the shape of a token (checked before any lookup, so garbage costs nothing).
pub fn well_formed(text: &str) -> bool {
    text.strip_prefix(PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The token of an `Authorization: Bearer TOKEN` header, if it holds a well-formed one (the one
/// reading of the header, for every kind of caller).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| well_formed(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_stored_hashed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(well_formed(&a), "{a}");
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(
            digest(&a),
            digest(&format!("{a}\n")),
            "a token file's newline"
        );
        for bad in [
            "",
            "cst_",
            "cst_xyz",
            &a[..a.len() - 1],
            &a.replace("cst_", "glrt"),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn draws_come_up_by_their_chance() {
        assert!((0..200).all(|_| !draw(0).unwrap()));
        assert!((0..200).all(|_| draw(100).unwrap()));
        // 1000 draws at 30%: well inside 200..400 unless the source is broken.
        let hits = (0..1000).filter(|_| draw(30).unwrap()).count();
        assert!((200..400).contains(&hits), "{hits} of 1000 at 30%");
    }
}
