//! Keys, key files and the signed-trace envelope.
//!
//! Keys are ed25519 (RFC 8032, via ed25519-dalek, verified with `verify_strict`). A key id is
//! the SHA-256 of the 32-byte public key, shown as 64 hex digits (as in TUF).
//!
//! Signed-trace file: `b"TFS"`, one format-version byte ([`SIGNED_FORMAT_VERSION`]), then the
//! postcard encoding of [`SignedTrace`]: a [`SignedHeader`] (trace id, version, creation and
//! expiry times, SHA-256 of the compiled bytes), the compiled trace bytes, and signatures over
//! `b"tracefleet/v1/signed-trace\0" ‖ postcard(header)`. Verification ([`verify`]) is a pure
//! function of the bytes, the trusted keys, a threshold, the current time and, for a
//! confidential trace, the device's identity.
//!
//! A confidential trace ([`crate::confidential`]) has format byte [`SEALED_FORMAT_VERSION`]: the
//! header is followed by [`Sealed`] (the recipients), the content is the age ciphertext of the
//! compiled trace (the content hash is the ciphertext's), and the signatures cover
//! `b"tracefleet/v1/sealed-trace\0" ‖ postcard(header, sealed)` — so a device checks who vouches
//! for it, its expiry and that it is encrypted before it decrypts anything, and a signature over
//! one form never verifies the other. A plain trace keeps format byte 1, which every follower
//! reads.

use crate::compile::{self, DecodeError};
use crate::confidential::{self, ConfidentialError, Identity, Recipient};
use crate::ids::{TraceId, Version};
use crate::trace::Trace;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Magic bytes at the start of a signed trace.
pub const SIGNED_MAGIC: &[u8; 3] = b"TFS";
/// The signed-trace format version this build writes and reads.
pub const SIGNED_FORMAT_VERSION: u8 = 1;
/// Largest signed trace accepted (bytes).
pub const MAX_SIGNED_BYTES: usize = compile::MAX_COMPILED_BYTES + 64 * 1024;
/// Most signatures an envelope may carry.
pub const MAX_SIGNATURES: usize = 16;
/// Format byte of a confidential (encrypted) trace's envelope.
pub const SEALED_FORMAT_VERSION: u8 = 2;
/// Domain separation prefix of the signed message of a plain signed trace.
const SIGNING_CONTEXT: &[u8] = b"tracefleet/v1/signed-trace\0";
/// Domain separation prefix of a confidential trace's signed message: a signature over one
/// form never verifies the other.
const SEALED_SIGNING_CONTEXT: &[u8] = b"tracefleet/v1/sealed-trace\0";

/// SHA-256 of a public key: the key's id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The id of a public key.
    pub fn of(key: &VerifyingKey) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// What a key may sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Signs trust roots (kept offline).
    Root,
    /// Signs traces.
    Traces,
    /// Signs fleet commands.
    Commands,
    /// Signs the learner's audit log. Never in a trust root: devices trust no audit key.
    Audit,
}

impl std::str::FromStr for KeyRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "root" => Ok(KeyRole::Root),
            "traces" => Ok(KeyRole::Traces),
            "commands" => Ok(KeyRole::Commands),
            "audit" => Ok(KeyRole::Audit),
            other => Err(format!(
                "unknown key role {other:?}: expected root, traces, commands or audit"
            )),
        }
    }
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyRole::Root => "root",
            KeyRole::Traces => "traces",
            KeyRole::Commands => "commands",
            KeyRole::Audit => "audit",
        })
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Not JSON of the expected shape.
    #[error(
        "malformed key file: {0}: expected a tracefleet key file (JSON with type, role, key_id and the key in hex)"
    )]
    Json(#[from] serde_json::Error),
    /// The `type` field names another kind of file.
    #[error("key file has type {found:?}: expected {expected:?}")]
    WrongType {
        /// The expected type.
        expected: &'static str,
        /// The type found.
        found: String,
    },
    /// The key material is not 32 bytes of hex.
    #[error("key file field `{field}`: expected 64 hex digits")]
    BadHex {
        /// The field.
        field: &'static str,
    },
    /// Not a valid ed25519 public key.
    #[error("key file holds an invalid ed25519 public key")]
    BadKey,
    /// The stated key id is not the hash of the key.
    #[error("key file says key_id {stated} but the key's id is {actual}")]
    KeyIdMismatch {
        /// As written.
        stated: String,
        /// As computed.
        actual: KeyId,
    },
}

const PUBLIC_TYPE: &str = "tracefleet-ed25519-public-key";
const SECRET_TYPE: &str = "tracefleet-ed25519-secret-key";

#[derive(Serialize, Deserialize)]
struct KeyFileJson {
    #[serde(rename = "type")]
    kind: String,
    role: KeyRole,
    key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
}

fn hex32(s: Option<&str>, field: &'static str) -> Result<[u8; 32], KeyFileError> {
    let bytes = hex::decode(s.unwrap_or_default()).map_err(|_| KeyFileError::BadHex { field })?;
    bytes.try_into().map_err(|_| KeyFileError::BadHex { field })
}

/// A public key with its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// What it may sign.
    pub role: KeyRole,
    /// The ed25519 key.
    pub key: VerifyingKey,
}

impl PublicKey {
    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.key)
    }

    /// A key from its 32 raw bytes.
    ///
    /// # Errors
    /// [`KeyFileError::BadKey`] when the bytes are not a valid ed25519 point.
    pub fn from_bytes(role: KeyRole, bytes: &[u8; 32]) -> Result<Self, KeyFileError> {
        Ok(Self {
            role,
            key: VerifyingKey::from_bytes(bytes).map_err(|_| KeyFileError::BadKey)?,
        })
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key file (JSON text).
    pub fn to_file(&self) -> String {
        let j = KeyFileJson {
            kind: PUBLIC_TYPE.into(),
            role: self.role,
            key_id: self.key_id().to_string(),
            public_key: Some(hex::encode(self.key.as_bytes())),
            secret_key: None,
        };
        serde_json::to_string_pretty(&j).unwrap_or_default() + "\n"
    }

    /// Reads a public key file.
    ///
    /// # Errors
    /// [`KeyFileError`] when the text is not a well-formed public key file.
    pub fn from_file(text: &str) -> Result<Self, KeyFileError> {
        let j: KeyFileJson = serde_json::from_str(text)?;
        if j.kind != PUBLIC_TYPE {
            return Err(KeyFileError::WrongType {
                expected: PUBLIC_TYPE,
                found: j.kind,
            });
        }
        let key = VerifyingKey::from_bytes(&hex32(j.public_key.as_deref(), "public_key")?)
            .map_err(|_| KeyFileError::BadKey)?;
        let pk = Self { role: j.role, key };
        if pk.key_id().to_string() != j.key_id {
            return Err(KeyFileError::KeyIdMismatch {
                stated: j.key_id,
                actual: pk.key_id(),
            });
        }
        Ok(pk)
    }
}

/// A secret signing key with its role. Its `Debug` does not show the secret.
pub struct SecretKey {
    /// What it may sign.
    pub role: KeyRole,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, {})", self.role, self.public().key_id())
    }
}

impl SecretKey {
    /// A key from 32 bytes of secret seed (take them from the OS: `getrandom`).
    pub fn from_seed(role: KeyRole, seed: [u8; 32]) -> Self {
        Self {
            role,
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            role: self.role,
            key: self.key.verifying_key(),
        }
    }

    /// The secret key file (JSON text). Write it with 0600 permissions.
    pub fn to_file(&self) -> String {
        let j = KeyFileJson {
            kind: SECRET_TYPE.into(),
            role: self.role,
            key_id: self.public().key_id().to_string(),
            public_key: None,
            secret_key: Some(hex::encode(self.key.to_bytes())),
        };
        serde_json::to_string_pretty(&j).unwrap_or_default() + "\n"
    }

    /// Reads a secret key file.
    ///
    /// # Errors
    /// [`KeyFileError`] when the text is not a well-formed secret key file.
    pub fn from_file(text: &str) -> Result<Self, KeyFileError> {
        let j: KeyFileJson = serde_json::from_str(text)?;
        if j.kind != SECRET_TYPE {
            return Err(KeyFileError::WrongType {
                expected: SECRET_TYPE,
                found: j.kind,
            });
        }
        let k = Self::from_seed(j.role, hex32(j.secret_key.as_deref(), "secret_key")?);
        let actual = k.public().key_id();
        if actual.to_string() != j.key_id {
            return Err(KeyFileError::KeyIdMismatch {
                stated: j.key_id,
                actual,
            });
        }
        Ok(k)
    }
}

/// What the signatures vouch for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeader {
    /// Must equal the compiled trace's id.
    pub trace_id: TraceId,
    /// Must equal the compiled trace's version.
    pub version: Version,
    /// Signing time, seconds since the Unix epoch.
    pub created_at: u64,
    /// After this time (seconds since the Unix epoch) the signed trace is refused.
    pub expires_at: u64,
    /// SHA-256 of `compiled`.
    pub content_hash: [u8; 32],
}

/// One signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// Which key signed.
    pub key_id: KeyId,
    /// The 64-byte ed25519 signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// For whom a confidential trace is encrypted: part of what the signatures cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The recipients (`age1…`, canonical form, 1 to
    /// [`MAX_RECIPIENTS`](crate::confidential::MAX_RECIPIENTS)), in the order given at signing.
    pub recipients: Vec<String>,
}

impl Sealed {
    /// The recipients, parsed.
    ///
    /// # Errors
    /// The first that does not parse.
    pub fn parsed(&self) -> Result<Vec<Recipient>, ConfidentialError> {
        self.recipients.iter().map(|r| r.parse()).collect()
    }
}

/// A compiled trace in its signature envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTrace {
    /// What is signed.
    pub header: SignedHeader,
    /// `Some` for a confidential trace: then [`Self::compiled`] holds the age ciphertext of the
    /// compiled trace, and the recipients are signed with the header.
    pub sealed: Option<Sealed>,
    /// The compiled trace bytes (see [`crate::compile`]), or their ciphertext when sealed.
    pub compiled: Vec<u8>,
    /// Signatures over the header (and [`Self::sealed`]).
    pub signatures: Vec<SignatureEntry>,
}

impl SignedTrace {
    /// The exact bytes the signatures cover.
    #[must_use]
    pub fn signing_message(&self) -> Vec<u8> {
        signing_message(&self.header, self.sealed.as_ref())
    }
}

// The envelopes as postcard sees them. The content is one byte string (the same wire format
// as a sequence of `u8`, decoded as a copy instead of byte by byte).
#[derive(Serialize)]
struct PlainOut<'a> {
    header: &'a SignedHeader,
    #[serde(with = "serde_bytes")]
    compiled: &'a [u8],
    signatures: &'a [SignatureEntry],
}

#[derive(Serialize)]
struct SealedOut<'a> {
    header: &'a SignedHeader,
    sealed: &'a Sealed,
    #[serde(with = "serde_bytes")]
    compiled: &'a [u8],
    signatures: &'a [SignatureEntry],
}

#[derive(Deserialize)]
struct PlainIn {
    header: SignedHeader,
    #[serde(with = "serde_bytes")]
    compiled: Vec<u8>,
    signatures: Vec<SignatureEntry>,
}

#[derive(Deserialize)]
struct SealedIn {
    header: SignedHeader,
    sealed: Sealed,
    #[serde(with = "serde_bytes")]
    compiled: Vec<u8>,
    signatures: Vec<SignatureEntry>,
}

fn signing_message(header: &SignedHeader, sealed: Option<&Sealed>) -> Vec<u8> {
    // Serialising plain structs into a Vec cannot fail.
    match sealed {
        None => postcard::to_extend(header, SIGNING_CONTEXT.to_vec()).unwrap_or_default(),
        Some(s) => {
            postcard::to_extend(&(header, s), SEALED_SIGNING_CONTEXT.to_vec()).unwrap_or_default()
        }
    }
}

/// The exact bytes the signatures of a plain signed trace cover (for benchmarks and other
/// verifiers): the domain tag followed by the postcard encoding of the header.
pub fn signing_message_for(header: &SignedHeader) -> Vec<u8> {
    signing_message(header, None)
}

/// Signs compiled bytes.
///
/// # Errors
/// [`DecodeError`] when `compiled` is not a valid compiled trace.
pub fn sign(
    compiled: &[u8],
    key: &SecretKey,
    created_at: u64,
    expires_at: u64,
) -> Result<SignedTrace, DecodeError> {
    let trace = compile::decode_compiled(compiled)?;
    Ok(envelope(
        &trace,
        compiled.to_vec(),
        None,
        key,
        created_at,
        expires_at,
    ))
}

/// Why a confidential trace could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Not a valid compiled trace.
    #[error(transparent)]
    Compiled(#[from] DecodeError),
    /// The recipients, or encryption.
    #[error(transparent)]
    Confidential(#[from] ConfidentialError),
    /// The envelope would be larger than a device accepts.
    #[error(
        "the encrypted trace's envelope would be {found} bytes: expected at most {MAX_SIGNED_BYTES}; encrypt to fewer recipients (each costs about 160 bytes) or shorten the trace"
    )]
    TooLarge {
        /// Its size.
        found: usize,
    },
}

/// Encrypts compiled bytes to `recipients` and signs the result: a confidential trace
/// (format byte [`SEALED_FORMAT_VERSION`]). Duplicate recipients are encrypted to once.
///
/// # Errors
/// [`SealError`]: not a compiled trace, no or too many recipients, or an envelope over
/// [`MAX_SIGNED_BYTES`].
pub fn sign_sealed(
    compiled: &[u8],
    recipients: &[Recipient],
    key: &SecretKey,
    created_at: u64,
    expires_at: u64,
) -> Result<SignedTrace, SealError> {
    let trace = compile::decode_compiled(compiled)?;
    let mut unique: Vec<Recipient> = Vec::with_capacity(recipients.len());
    for r in recipients {
        if !unique.contains(r) {
            unique.push(r.clone());
        }
    }
    let ciphertext = confidential::encrypt(compiled, &unique)?;
    let sealed = Sealed {
        recipients: unique.iter().map(ToString::to_string).collect(),
    };
    let s = envelope(
        &trace,
        ciphertext,
        Some(sealed),
        key,
        created_at,
        expires_at,
    );
    let found = encode_signed(&s).len();
    if found > MAX_SIGNED_BYTES {
        return Err(SealError::TooLarge { found });
    }
    Ok(s)
}

fn envelope(
    trace: &Trace,
    content: Vec<u8>,
    sealed: Option<Sealed>,
    key: &SecretKey,
    created_at: u64,
    expires_at: u64,
) -> SignedTrace {
    let header = SignedHeader {
        trace_id: trace.id.clone(),
        version: trace.version,
        created_at,
        expires_at,
        content_hash: Sha256::digest(&content).into(),
    };
    let entry = sign_message(&signing_message(&header, sealed.as_ref()), key);
    SignedTrace {
        header,
        sealed,
        compiled: content,
        signatures: vec![entry],
    }
}

/// Encodes a signed trace to its file form (format byte 1, or
/// [`SEALED_FORMAT_VERSION`] for a confidential trace).
pub fn encode_signed(s: &SignedTrace) -> Vec<u8> {
    let mut out = SIGNED_MAGIC.to_vec();
    // Serialising plain structs into a Vec cannot fail.
    match &s.sealed {
        None => {
            out.push(SIGNED_FORMAT_VERSION);
            postcard::to_extend(
                &PlainOut {
                    header: &s.header,
                    compiled: &s.compiled,
                    signatures: &s.signatures,
                },
                out,
            )
            .unwrap_or_default()
        }
        Some(sealed) => {
            out.push(SEALED_FORMAT_VERSION);
            postcard::to_extend(
                &SealedOut {
                    header: &s.header,
                    sealed,
                    compiled: &s.compiled,
                    signatures: &s.signatures,
                },
                out,
            )
            .unwrap_or_default()
        }
    }
}

/// Whether `bytes` start like a confidential trace (magic and format byte only: nothing is
/// verified), so a device reads its identity only when it needs it.
#[must_use]
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && &bytes[..3] == SIGNED_MAGIC && bytes[3] == SEALED_FORMAT_VERSION
}

/// Why a signed trace was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Over the size limit.
    #[error("signed trace is {found} bytes: expected at most {limit}")]
    TooLarge {
        /// Bytes given.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a signed trace.
    #[error("not a signed trace: expected magic bytes \"TFS\" and a format byte, found \"{}\" ({} bytes)", found.escape_ascii(), found.len())]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A format this build does not read.
    #[error(
        "signed trace format version {found}: this build reads versions {SIGNED_FORMAT_VERSION} (signed) and {SEALED_FORMAT_VERSION} (signed and encrypted)"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The envelope does not decode.
    #[error("malformed signed trace envelope: {0}")]
    Envelope(postcard::Error),
    /// Bytes after the envelope.
    #[error("signed trace has {0} trailing bytes: expected none")]
    Trailing(usize),
    /// Too many signatures.
    #[error("signed trace carries {found} signatures: expected at most {MAX_SIGNATURES}")]
    TooManySignatures {
        /// Signatures found.
        found: usize,
    },
    /// The compiled bytes do not hash to the signed content hash.
    #[error(
        "content hash mismatch: the signed header vouches for sha256 {expected} but the content (the compiled trace, or its ciphertext) hashes to {found} (tampered or corrupted)"
    )]
    ContentHash {
        /// Hash in the header.
        expected: String,
        /// Hash of the bytes.
        found: String,
    },
    /// Fewer valid signatures from trusted keys than the threshold.
    #[error(
        "signature check failed: {valid} valid signature(s) from trusted trace-signing keys, expected at least {threshold}; signed by [{signers}], trusted [{trusted}]"
    )]
    Threshold {
        /// Distinct trusted keys whose signature verified.
        valid: usize,
        /// Needed.
        threshold: usize,
        /// Key ids in the envelope (with `(invalid)` or `(untrusted)` marks).
        signers: String,
        /// Trusted key ids.
        trusted: String,
    },
    /// Past its expiry.
    #[error("signed trace expired at {expires_at} (unix seconds); now is {now}")]
    Expired {
        /// Expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The trust root that would vouch for it has expired.
    #[error(
        "the device's trust root v{version} expired at {expires_at} (unix seconds); now is {now}: install a newer trust root"
    )]
    RootExpired {
        /// Root version.
        version: u32,
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The header expires before it was created.
    #[error(
        "signed header is created at {created_at} but expires at {expires_at} (unix seconds): expected expiry after creation"
    )]
    InvalidValidity {
        /// Creation time.
        created_at: u64,
        /// Expiry time.
        expires_at: u64,
    },
    /// The compiled bytes do not decode.
    #[error("signed content is not a valid compiled trace: {0}")]
    Compiled(#[from] DecodeError),
    /// The recipients list of a confidential trace is empty, too long or not canonical.
    #[error("confidential trace header: {0}")]
    Recipients(String),
    /// A confidential trace, and no identity to decrypt it with.
    #[error(
        "{trace_id} {version} is a confidential trace (encrypted to {recipients} recipient(s)) and this device has no identity to decrypt it: expected one in its state directory (`follower identity`)"
    )]
    NoIdentity {
        /// The trace.
        trace_id: TraceId,
        /// Its version.
        version: Version,
        /// How many recipients the header lists.
        recipients: usize,
    },
    /// Decrypting a confidential trace failed: not a recipient, or tampered ciphertext.
    #[error("{trace_id} {version}: {source}")]
    Confidential {
        /// The trace.
        trace_id: TraceId,
        /// Its version.
        version: Version,
        /// Why.
        source: ConfidentialError,
    },
    /// The header names another trace or version than the content.
    #[error(
        "signed header names {header_id} {header_version} but the content is {content_id} {content_version}"
    )]
    HeaderMismatch {
        /// Id in the header.
        header_id: TraceId,
        /// Version in the header.
        header_version: Version,
        /// Id in the content.
        content_id: TraceId,
        /// Version in the content.
        content_version: Version,
    },
}

/// Why a set of signatures did not reach its threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThresholdFailure {
    /// Distinct trusted keys whose signature verified.
    pub valid: usize,
    /// Needed.
    pub threshold: usize,
    /// Key ids in the envelope, marked `(untrusted)` or `(invalid)`.
    pub signers: String,
    /// Key ids trusted for the role.
    pub trusted: String,
}

/// Counts distinct keys of `role` in `trusted` with a valid ed25519 (`verify_strict`)
/// signature over `message`; a key id listed twice counts once. At least one is always
/// required, whatever `threshold` says.
///
/// # Errors
/// [`ThresholdFailure`] when fewer than `threshold` keys signed.
pub fn check_threshold(
    message: &[u8],
    signatures: &[SignatureEntry],
    trusted: &[PublicKey],
    role: KeyRole,
    threshold: usize,
) -> Result<Vec<KeyId>, ThresholdFailure> {
    let mut signed_by: Vec<KeyId> = Vec::new();
    let mut signers = Vec::new();
    for entry in signatures {
        let key = trusted
            .iter()
            .find(|k| k.role == role && k.key_id() == entry.key_id);
        let valid = key.is_some_and(|k| {
            <[u8; 64]>::try_from(entry.signature.as_slice())
                .ok()
                .is_some_and(|b| {
                    k.key
                        .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&b))
                        .is_ok()
                })
        });
        let mark = match (key.is_some(), valid) {
            (false, _) => " (untrusted)",
            (true, false) => " (invalid)",
            (true, true) => "",
        };
        signers.push(format!("{}{mark}", entry.key_id));
        if valid && !signed_by.contains(&entry.key_id) {
            signed_by.push(entry.key_id);
        }
    }
    let threshold = threshold.max(1);
    if signed_by.len() < threshold {
        return Err(ThresholdFailure {
            valid: signed_by.len(),
            threshold,
            signers: signers.join(", "),
            trusted: trusted
                .iter()
                .filter(|k| k.role == role)
                .map(|k| k.key_id().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(signed_by)
}

/// Signs `message` with `key` (for envelopes other than signed traces).
pub fn sign_message(message: &[u8], key: &SecretKey) -> SignatureEntry {
    SignatureEntry {
        key_id: key.public().key_id(),
        signature: key.key.sign(message).to_bytes().to_vec(),
    }
}

/// Adds `key`'s signature to a signed trace (threshold signing: each key holder adds one).
pub fn add_signature(signed: &mut SignedTrace, key: &SecretKey) {
    let entry = sign_message(&signed.signing_message(), key);
    signed.signatures.retain(|e| e.key_id != entry.key_id);
    signed.signatures.push(entry);
}

/// Decodes the envelope without verifying it (for `inspect`).
///
/// # Errors
/// [`VerifyError`] for size, magic, version, malformed envelope or trailing bytes.
pub fn decode_signed(bytes: &[u8]) -> Result<SignedTrace, VerifyError> {
    if bytes.len() > MAX_SIGNED_BYTES {
        return Err(VerifyError::TooLarge {
            found: bytes.len(),
            limit: MAX_SIGNED_BYTES,
        });
    }
    if bytes.len() < 4 || &bytes[..3] != SIGNED_MAGIC {
        return Err(VerifyError::BadMagic {
            found: bytes.iter().take(4).copied().collect(),
        });
    }
    let body = &bytes[4..];
    let s = match bytes[3] {
        SIGNED_FORMAT_VERSION => {
            let (p, rest) =
                postcard::take_from_bytes::<PlainIn>(body).map_err(VerifyError::Envelope)?;
            trailing(rest)?;
            SignedTrace {
                header: p.header,
                sealed: None,
                compiled: p.compiled,
                signatures: p.signatures,
            }
        }
        SEALED_FORMAT_VERSION => {
            let (p, rest) =
                postcard::take_from_bytes::<SealedIn>(body).map_err(VerifyError::Envelope)?;
            trailing(rest)?;
            check_recipients(&p.sealed)?;
            SignedTrace {
                header: p.header,
                sealed: Some(p.sealed),
                compiled: p.compiled,
                signatures: p.signatures,
            }
        }
        found => return Err(VerifyError::UnsupportedVersion { found }),
    };
    if s.signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures {
            found: s.signatures.len(),
        });
    }
    Ok(s)
}

fn trailing(rest: &[u8]) -> Result<(), VerifyError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(VerifyError::Trailing(rest.len()))
    }
}

fn check_recipients(sealed: &Sealed) -> Result<(), VerifyError> {
    let n = sealed.recipients.len();
    if n == 0 || n > confidential::MAX_RECIPIENTS {
        return Err(VerifyError::Recipients(
            ConfidentialError::RecipientCount { found: n }.to_string(),
        ));
    }
    for (i, r) in sealed.recipients.iter().enumerate() {
        r.parse::<Recipient>()
            .map_err(|e| VerifyError::Recipients(format!("recipient {}: {e}", i + 1)))?;
        if sealed.recipients[..i].contains(r) {
            return Err(VerifyError::Recipients(format!(
                "recipient {} repeats {r}: expected each once",
                i + 1
            )));
        }
    }
    Ok(())
}

/// A signed trace that passed [`verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// The decoded trace.
    pub trace: Trace,
    /// The header the signatures vouch for.
    pub header: SignedHeader,
    /// Trusted keys whose signatures verified.
    pub signed_by: Vec<KeyId>,
    /// The recipients when it was a confidential trace (decrypted with the given identity).
    pub sealed: Option<Sealed>,
}

/// Verifies a signed trace against trusted trace-signing keys.
///
/// Checks, in order: size and format; content hash; at least `threshold` distinct trusted keys
/// with role [`KeyRole::Traces`] whose signature verifies (a key id listed twice counts once);
/// expiry against `now` (unix seconds); for a confidential trace, that `identity` decrypts it
/// (nothing is decrypted before the signatures and expiry passed); that the content decodes
/// and matches the header.
///
/// # Errors
/// The first failed check as a [`VerifyError`]: a confidential trace without an identity is
/// [`VerifyError::NoIdentity`], one this identity is not a recipient of (or whose ciphertext
/// was altered) [`VerifyError::Confidential`].
pub fn verify(
    bytes: &[u8],
    trusted: &[PublicKey],
    threshold: usize,
    now: u64,
    identity: Option<&Identity>,
) -> Result<Verified, VerifyError> {
    let s = decode_signed(bytes)?;
    let hash: [u8; 32] = Sha256::digest(&s.compiled).into();
    if hash != s.header.content_hash {
        return Err(VerifyError::ContentHash {
            expected: hex::encode(s.header.content_hash),
            found: hex::encode(hash),
        });
    }
    let message = s.signing_message();
    let signed_by = check_threshold(&message, &s.signatures, trusted, KeyRole::Traces, threshold)
        .map_err(|t| VerifyError::Threshold {
        valid: t.valid,
        threshold: t.threshold,
        signers: t.signers,
        trusted: t.trusted,
    })?;
    if s.header.created_at > s.header.expires_at {
        return Err(VerifyError::InvalidValidity {
            created_at: s.header.created_at,
            expires_at: s.header.expires_at,
        });
    }
    if now >= s.header.expires_at {
        return Err(VerifyError::Expired {
            expires_at: s.header.expires_at,
            now,
        });
    }
    let plain;
    let compiled = match &s.sealed {
        None => &s.compiled,
        Some(sealed) => {
            let Some(identity) = identity else {
                return Err(VerifyError::NoIdentity {
                    trace_id: s.header.trace_id,
                    version: s.header.version,
                    recipients: sealed.recipients.len(),
                });
            };
            // Refused by name first: the signed header lists the recipients.
            let me = identity.recipient().to_string();
            if !sealed.recipients.contains(&me) {
                return Err(VerifyError::Confidential {
                    trace_id: s.header.trace_id,
                    version: s.header.version,
                    source: ConfidentialError::NotARecipient { identity: me },
                });
            }
            plain = confidential::decrypt(&s.compiled, identity, compile::MAX_COMPILED_BYTES)
                .map_err(|source| VerifyError::Confidential {
                    trace_id: s.header.trace_id.clone(),
                    version: s.header.version,
                    source,
                })?;
            &plain
        }
    };
    let trace = compile::decode_compiled(compiled)?;
    if trace.id != s.header.trace_id || trace.version != s.header.version {
        return Err(VerifyError::HeaderMismatch {
            header_id: s.header.trace_id,
            header_version: s.header.version,
            content_id: trace.id,
            content_version: trace.version,
        });
    }
    Ok(Verified {
        trace,
        header: s.header,
        signed_by,
        sealed: s.sealed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "---\ntrace_id: t\nversion: \"1.2.3\"\ngoal_signature: g\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo hi\n```\n";

    fn compiled() -> Vec<u8> {
        let (t, _) = crate::compile_source("t.trace.md", SRC).unwrap();
        crate::encode_compiled(&t)
    }

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(KeyRole::Traces, [seed; 32])
    }

    fn signed_by(k: &SecretKey, created: u64, expires: u64) -> SignedTrace {
        sign(&compiled(), k, created, expires).unwrap()
    }

    #[test]
    fn a_short_or_foreign_start_is_shown_as_text_with_its_length() {
        let e = decode_signed(b"TFS").unwrap_err().to_string();
        assert!(e.contains("found \"TFS\" (3 bytes)"), "{e}");
        let e = decode_signed(b"\x7fELF\x02\x01").unwrap_err().to_string();
        assert!(e.contains("found \"\\x7fELF\" (4 bytes)"), "{e}");
    }

    #[test]
    fn valid_signature_verifies() {
        let k = key(1);
        let bytes = encode_signed(&signed_by(&k, 100, 200));
        let v = verify(&bytes, &[k.public()], 1, 150, None).unwrap();
        assert_eq!(v.trace.id.as_str(), "t");
        assert_eq!(v.signed_by, vec![k.public().key_id()]);
    }

    #[test]
    fn refusals_say_why() {
        let k = key(1);
        let other = key(2);
        let s = signed_by(&k, 100, 200);
        let err = |s: &SignedTrace, trusted: &[PublicKey], threshold: usize, now: u64| {
            verify(&encode_signed(s), trusted, threshold, now, None)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&s, &[other.public()], 1, 150).contains("(untrusted)"));
        assert!(err(&s, &[k.public()], 1, 200).contains("expired"));
        // A duplicated signature counts once.
        let mut dup = s.clone();
        dup.signatures.push(dup.signatures[0].clone());
        assert!(err(&dup, &[k.public()], 2, 150).contains("1 valid signature(s)"));
        // A key of another role does not count.
        let mut commands = k.public();
        commands.role = KeyRole::Commands;
        assert!(err(&s, &[commands], 1, 150).contains("expected at least 1"));
        // Tampered content.
        let mut t = s.clone();
        let last = t.compiled.len() - 1;
        t.compiled[last] ^= 1;
        assert!(err(&t, &[k.public()], 1, 150).contains("content hash mismatch"));
        // Tampered header (signature no longer matches).
        let mut h = s.clone();
        h.header.expires_at = 10_000;
        assert!(err(&h, &[k.public()], 1, 150).contains("(invalid)"));
        // Created after it expires.
        let backwards = signed_by(&k, 300, 200);
        assert!(err(&backwards, &[k.public()], 1, 150).contains("expected expiry after creation"));
    }

    #[test]
    fn header_must_name_the_content() {
        let k = key(1);
        let mut s = signed_by(&k, 100, 200);
        s.header.version = "9.9.9".parse().unwrap();
        s.signatures = vec![SignatureEntry {
            key_id: k.public().key_id(),
            signature: k.key.sign(&s.signing_message()).to_bytes().to_vec(),
        }];
        let e = verify(&encode_signed(&s), &[k.public()], 1, 150, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("signed header names t 9.9.9 but the content is t 1.2.3"),
            "{e}"
        );
    }

    fn compiled_at(version: &str) -> Vec<u8> {
        let src = SRC.replace("1.2.3", version);
        let (t, _) = crate::compile_source("t.trace.md", &src).unwrap();
        crate::encode_compiled(&t)
    }

    #[test]
    fn a_sealed_trace_verifies_only_with_a_recipients_identity() {
        let k = key(1);
        let (a, b, other) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let s = sign_sealed(
            &compiled(),
            &[a.recipient(), b.recipient(), a.recipient()],
            &k,
            100,
            200,
        )
        .unwrap();
        let bytes = encode_signed(&s);
        assert!(is_sealed(&bytes));
        assert_eq!(bytes[3], SEALED_FORMAT_VERSION);
        assert_eq!(
            s.sealed.as_ref().unwrap().recipients.len(),
            2,
            "duplicates once"
        );
        // No plaintext in the envelope: the shell command and the goal are not there.
        let plain = encode_signed(&signed_by(&k, 100, 200));
        // The command is in the plain envelope, not in this one.
        let needle = b"echo hi";
        assert!(plain.windows(needle.len()).any(|w| w == needle));
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        for id in [&a, &b] {
            let v = verify(&bytes, &[k.public()], 1, 150, Some(id)).unwrap();
            assert_eq!(v.trace.id.as_str(), "t");
            assert_eq!(v.sealed.as_ref(), s.sealed.as_ref());
        }
        let e = verify(&bytes, &[k.public()], 1, 150, Some(&other))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a recipient of this trace")
                && e.contains(&other.recipient().to_string()),
            "{e}"
        );
        let e = verify(&bytes, &[k.public()], 1, 150, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("confidential trace (encrypted to 2 recipient(s))"),
            "{e}"
        );
        // Signatures and expiry come first: an untrusted or expired one is refused as such,
        // even to a device without an identity.
        let e = verify(&bytes, &[key(2).public()], 1, 150, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(untrusted)"), "{e}");
        let e = verify(&bytes, &[k.public()], 1, 200, Some(&a))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
        // Cosigning keeps it sealed and verifiable.
        let mut cosigned = decode_signed(&bytes).unwrap();
        add_signature(&mut cosigned, &key(3));
        let v = verify(
            &encode_signed(&cosigned),
            &[k.public(), key(3).public()],
            2,
            150,
            Some(&a),
        );
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn a_sealed_envelope_refuses_tampering_and_swaps() {
        let k = key(1);
        let a = Identity::generate();
        let s = sign_sealed(&compiled(), &[a.recipient()], &k, 100, 200).unwrap();
        let err = |s: &SignedTrace| {
            verify(&encode_signed(s), &[k.public()], 1, 150, Some(&a))
                .unwrap_err()
                .to_string()
        };
        // Flipped ciphertext bytes: the content hash no longer matches.
        let mut flipped = s.clone();
        let mid = flipped.compiled.len() / 2;
        flipped.compiled[mid] ^= 1;
        assert!(err(&flipped).contains("content hash mismatch"));
        // ... and with the hash fixed up, the signature fails.
        flipped.header.content_hash = Sha256::digest(&flipped.compiled).into();
        assert!(err(&flipped).contains("(invalid)"));
        // Re-signed over flipped bytes by the trusted key itself: age's authentication fails.
        flipped.signatures = vec![sign_message(&flipped.signing_message(), &k)];
        let e = err(&flipped);
        assert!(e.contains("does not decrypt"), "{e}");
        // Another trace's ciphertext under this header and signatures.
        let other = sign_sealed(&compiled_at("2.0.0"), &[a.recipient()], &k, 100, 200).unwrap();
        let mut swapped = s.clone();
        swapped.compiled = other.compiled.clone();
        assert!(err(&swapped).contains("content hash mismatch"));
        // A validly signed envelope whose ciphertext is another version's: the header must
        // name the content.
        let mut lying = other.clone();
        lying.header.version = "1.2.3".parse().unwrap();
        lying.signatures = vec![sign_message(&lying.signing_message(), &k)];
        assert!(err(&lying).contains("signed header names t 1.2.3 but the content is t 2.0.0"));
        // Stripping the seal (the same bytes presented as a plain trace) breaks the signature.
        let mut stripped = s.clone();
        stripped.sealed = None;
        assert!(err(&stripped).contains("(invalid)"));
        // Changing the recipients list breaks it too.
        let mut widened = s.clone();
        widened
            .sealed
            .as_mut()
            .unwrap()
            .recipients
            .push(Identity::generate().recipient().to_string());
        assert!(err(&widened).contains("(invalid)"));
        // A plain trace's signature does not verify a sealed envelope of the same header.
        let plain = signed_by(&k, 100, 200);
        let mut grafted = s.clone();
        grafted.header = plain.header.clone();
        grafted.header.content_hash = Sha256::digest(&grafted.compiled).into();
        grafted.signatures = plain.signatures.clone();
        assert!(err(&grafted).contains("(invalid)"));
    }

    #[test]
    fn a_sealed_header_lists_valid_distinct_recipients() {
        let k = key(1);
        let a = Identity::generate();
        let s = sign_sealed(&compiled(), &[a.recipient()], &k, 100, 200).unwrap();
        let with = |recipients: Vec<String>| {
            let mut t = s.clone();
            t.sealed = Some(Sealed { recipients });
            decode_signed(&encode_signed(&t)).unwrap_err().to_string()
        };
        assert!(with(vec![]).contains("0 recipients: expected 1 to 256"));
        let r = a.recipient().to_string();
        assert!(with(vec![r.clone(), r.clone()]).contains("recipient 2 repeats"));
        assert!(with(vec![r.to_uppercase()]).contains("recipient 1:"));
        assert!(
            sign_sealed(&compiled(), &[], &k, 100, 200)
                .unwrap_err()
                .to_string()
                .contains("0 recipients")
        );
    }

    #[test]
    fn key_files_round_trip_and_refuse_mismatch() {
        let k = key(3);
        let p = PublicKey::from_file(&k.public().to_file()).unwrap();
        assert_eq!(p, k.public());
        let back = SecretKey::from_file(&k.to_file()).unwrap();
        assert_eq!(back.public(), k.public());
        let forged = k
            .public()
            .to_file()
            .replace(&k.public().key_id().to_string(), &"0".repeat(64));
        assert!(
            PublicKey::from_file(&forged)
                .unwrap_err()
                .to_string()
                .contains("key_id")
        );
        assert!(
            PublicKey::from_file(&k.to_file())
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
    }
}
