//! The compiled form of a trace: `b"TFC"`, one format-version byte
//! ([`COMPILED_FORMAT_VERSION`]), then the postcard encoding (postcard 1.x wire format) of
//! [`Trace`]. Decoding refuses inputs over [`MAX_COMPILED_BYTES`], a wrong magic or version,
//! and trailing bytes, and a trace that breaks a rule the compiler enforces
//! ([`crate::invariants`]).

use crate::trace::Trace;

/// Magic bytes at the start of a compiled trace.
pub const COMPILED_MAGIC: &[u8; 3] = b"TFC";
/// The compiled format version this build writes and reads.
pub const COMPILED_FORMAT_VERSION: u8 = 5;
/// Largest compiled trace accepted by [`decode_compiled`] (bytes).
pub const MAX_COMPILED_BYTES: usize = 1024 * 1024;

/// Why compiled bytes were refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Over the size limit.
    #[error("compiled trace is {found} bytes: expected at most {limit}")]
    TooLarge {
        /// Bytes given.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a compiled trace.
    #[error("not a compiled trace: expected magic bytes \"TFC\" and a format byte, found \"{}\" ({} bytes)", found.escape_ascii(), found.len())]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A format this build does not read.
    #[error(
        "compiled trace format version {found}: this build reads version {COMPILED_FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The postcard body is malformed.
    #[error("malformed compiled trace body: {0}")]
    Body(#[from] postcard::Error),
    /// Bytes after the body.
    #[error("compiled trace has {0} trailing bytes after its body: expected none")]
    Trailing(usize),
    /// Well-formed bytes whose trace breaks a rule the compiler enforces (a tampered or
    /// foreign compiled trace, even when a trusted key signed it).
    #[error("compiled trace breaks a rule the compiler enforces: {0}")]
    Invariant(String),
}

/// Encodes a trace in the compiled form.
pub fn encode_compiled(trace: &Trace) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(COMPILED_MAGIC);
    out.push(COMPILED_FORMAT_VERSION);
    // Serialising plain data into a Vec cannot fail.
    postcard::to_extend(trace, out).unwrap_or_default()
}

/// Decodes a compiled trace with limits.
///
/// # Errors
/// [`DecodeError`] for oversize input, a wrong magic or version, a malformed body (including
/// ids and versions that fail validation) or trailing bytes.
pub fn decode_compiled(bytes: &[u8]) -> Result<Trace, DecodeError> {
    if bytes.len() > MAX_COMPILED_BYTES {
        return Err(DecodeError::TooLarge {
            found: bytes.len(),
            limit: MAX_COMPILED_BYTES,
        });
    }
    if bytes.len() < 4 || &bytes[..3] != COMPILED_MAGIC {
        return Err(DecodeError::BadMagic {
            found: bytes.iter().take(4).copied().collect(),
        });
    }
    if bytes[3] != COMPILED_FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: bytes[3] });
    }
    let (trace, rest) = postcard::take_from_bytes::<Trace>(&bytes[4..])?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    crate::invariants::check(&trace).map_err(DecodeError::Invariant)?;
    Ok(trace)
}
