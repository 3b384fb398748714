//! Keys and signatures: ed25519 key pairs as hex, strict verification, key ids, and the form
//! in which the server publishes its key.

use super::{ALGORITHM, TrustError, echo};
use crate::types::InvalidField;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An ed25519 key pair: a runner's or the server's.
pub struct KeyPair {
    key: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    // The secret half is never printed, whoever logs the pair.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A new key pair from 32 bytes of the system's random source.
    pub fn generate() -> Result<KeyPair, TrustError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| TrustError::Random(e.to_string()))?;
        Ok(KeyPair {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key pair whose seed is `hex`: 64 lower-case hex digits, surrounding whitespace
    /// (a file's newline) ignored.
    pub fn from_seed_hex(hex: &str) -> Result<KeyPair, TrustError> {
        // The seed is secret: an error names its length, never its digits.
        let text = hex.trim();
        let seed = decode_hex::<32>(text).ok_or_else(|| TrustError::Hex {
            what: "the key's seed",
            digits: 64,
            got: format!("{} characters", text.len()),
        })?;
        Ok(KeyPair {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The seed as 64 lower-case hex digits (what [`KeyPair::from_seed_hex`] reads back).
    pub fn seed_hex(&self) -> String {
        encode_hex(self.key.as_bytes())
    }

    /// The public key as 64 lower-case hex digits.
    pub fn public_hex(&self) -> String {
        encode_hex(self.key.verifying_key().as_bytes())
    }

    /// The signature of `context` followed by `payload`, as 128 lower-case hex digits.
    pub fn sign(&self, context: &[u8], payload: &[u8]) -> String {
        encode_hex(&self.key.sign(&signed_bytes(context, payload)).to_bytes())
    }
}

/// Checks `signature_hex` as `public_hex`'s signature of `context` followed by `payload`, by
/// ed25519's strict rules (no small-order keys or points, no malleable encodings).
pub fn verify_signature(
    public_hex: &str,
    context: &[u8],
    payload: &[u8],
    signature_hex: &str,
) -> Result<(), TrustError> {
    let key = verifying_key("the public key", public_hex)?;
    let bytes = decode_hex::<64>(signature_hex).ok_or_else(|| TrustError::Hex {
        what: "the signature",
        digits: 128,
        got: echo(signature_hex, 140),
    })?;
    key.verify_strict(
        &signed_bytes(context, payload),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| TrustError::BadSignature {
        what: "the text",
        key: public_hex.to_string(),
    })
}

/// Whether `hex` is an ed25519 public key that can sign: 64 lower-case hex digits of a curve
/// point that is not of small order.
pub fn valid_public_key(hex: &str) -> bool {
    verifying_key("", hex).is_ok()
}

/// A key's short name: the first 16 hex digits of the sha256 of its 32 bytes. Text that is not
/// 64 hex digits has no id: the empty string, which no key's id equals.
pub fn key_id(public_hex: &str) -> String {
    match decode_hex::<32>(public_hex) {
        Some(bytes) => encode_hex(&Sha256::digest(bytes)[..8]),
        None => String::new(),
    }
}

/// What `/.well-known/construir/server-key` serves: the key receipts are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServerKey {
    /// Always [`ALGORITHM`], `ed25519`.
    pub algorithm: String,
    /// 64 lower-case hex digits.
    pub public_key: String,
    /// [`key_id`] of the key.
    pub key_id: String,
}

impl ServerKey {
    pub fn of(public_hex: &str) -> ServerKey {
        ServerKey {
            algorithm: ALGORITHM.to_string(),
            public_key: public_hex.to_string(),
            key_id: key_id(public_hex),
        }
    }

    /// Checks the algorithm, the key, and that the id is the key's.
    pub fn validate(&self) -> Result<(), TrustError> {
        let refuse =
            |field, why: String| Err(TrustError::InvalidServerKey(InvalidField::new(field, why)));
        if self.algorithm != ALGORITHM {
            return refuse(
                "algorithm",
                format!("{} is not {ALGORITHM}", echo(&self.algorithm, 40)),
            );
        }
        if !valid_public_key(&self.public_key) {
            return refuse(
                "public_key",
                "expected an ed25519 public key, 64 lower-case hex digits".into(),
            );
        }
        let want = key_id(&self.public_key);
        if self.key_id != want {
            return refuse(
                "key_id",
                format!("{} is not the key's id {want}", echo(&self.key_id, 40)),
            );
        }
        Ok(())
    }
}

/// The bytes a signature covers: the context, then the payload.
fn signed_bytes(context: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(context.len() + payload.len());
    bytes.extend_from_slice(context);
    bytes.extend_from_slice(payload);
    bytes
}

fn verifying_key(what: &'static str, hex: &str) -> Result<VerifyingKey, TrustError> {
    let bad = || TrustError::BadPublicKey {
        what,
        key: echo(hex, 80),
    };
    let bytes = decode_hex::<32>(hex).ok_or_else(|| TrustError::Hex {
        what,
        digits: 64,
        got: echo(hex, 80),
    })?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
    // A small-order key "signs" messages it never saw; verify_strict refuses it too, but it is
    // better named at the key.
    if key.is_weak() { Err(bad()) } else { Ok(key) }
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// `text` as N bytes, if it is exactly 2N lower-case hex digits.
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}
