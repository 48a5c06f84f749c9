//! Confidential traces: a compiled trace encrypted to the identities of the devices that may
//! run it.
//!
//! The ciphertext is an age v1 file (<https://age-encryption.org/v1>, C2SP `age`) with X25519
//! recipients, through the `age` crate: the same bytes `age -d -i identity.txt` decrypts. A
//! device's identity is an age X25519 identity file as `age-keygen` writes it: `#` comment
//! lines and one `AGE-SECRET-KEY-1…` line (Bech32); its recipient is `age1…` (Bech32, 62
//! characters). An age header holds one stanza per recipient (about 100 bytes) and does not
//! say whose it is; the signed envelope ([`crate::signed`]) lists the recipients beside it, so
//! a device refuses a trace not meant for it by name and the learner can encrypt the next
//! version to the same devices.
//!
//! What it protects: the trace (commands, paths, prompts, reference examples) at rest on a
//! device that is not a recipient, on a USB stick, in a broker's retained messages. What it
//! does not: a recipient device can decrypt and run it (its identity file is in its state
//! directory), and a running trace is plaintext in the follower's memory.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

/// Most recipients one confidential trace may be encrypted to: each costs about 160 bytes of
/// envelope (the recipient in the signed header and its stanza in the age header), and the
/// envelope must stay within [`crate::signed::MAX_SIGNED_BYTES`].
pub const MAX_RECIPIENTS: usize = 256;

/// Largest identity file read (bytes): a key line and a few comments.
pub const MAX_IDENTITY_FILE_BYTES: usize = 4096;

/// Why encrypting, decrypting or reading a key failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfidentialError {
    /// A recipient that does not parse.
    #[error(
        "recipient {found:?}: expected an age X25519 recipient (\"age1\" and 58 Bech32 characters): {why}"
    )]
    BadRecipient {
        /// What was given (up to 80 characters).
        found: String,
        /// The parser's reason.
        why: String,
    },
    /// An identity file that does not hold exactly one X25519 identity.
    #[error("identity file: {0}")]
    BadIdentity(String),
    /// No recipient, or too many.
    #[error("{found} recipients: expected 1 to {MAX_RECIPIENTS}")]
    RecipientCount {
        /// How many were given.
        found: usize,
    },
    /// The identity is not among the recipients.
    #[error("this device is not a recipient of this trace (its identity is {identity})")]
    NotARecipient {
        /// The device's recipient.
        identity: String,
    },
    /// The ciphertext is not an age file, or its payload fails authentication.
    #[error("encrypted trace does not decrypt: {0}")]
    Malformed(String),
    /// The plaintext is larger than a compiled trace may be.
    #[error("encrypted trace decrypts to more than {limit} bytes: expected a compiled trace")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// A device's public encryption key: an age X25519 recipient (`age1…`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Recipient(age::x25519::Recipient);

impl FromStr for Recipient {
    type Err = ConfidentialError;

    /// Parses `age1…`; only the canonical (lower-case) form is accepted, so a recipient has
    /// one spelling in headers, databases and listings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A secret key pasted where a recipient belongs is not printed back.
        let shown = if s.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
            "AGE-SECRET-KEY-… (a secret identity, not a recipient)".to_owned()
        } else {
            s.chars().take(80).collect()
        };
        let bad = |why: &str| ConfidentialError::BadRecipient {
            found: shown.clone(),
            why: why.into(),
        };
        let r = age::x25519::Recipient::from_str(s).map_err(bad)?;
        if r.to_string() != s {
            return Err(bad("not in canonical lower-case form"));
        }
        Ok(Self(r))
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.0)
    }
}

/// A device's secret decryption key: an age X25519 identity. Its `Debug` shows the
/// recipient only.
#[derive(Clone)]
pub struct Identity(age::x25519::Identity);

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity(recipient {})", self.recipient())
    }
}

impl Identity {
    /// A new random identity (the operating system's CSPRNG).
    #[must_use]
    pub fn generate() -> Self {
        Self(age::x25519::Identity::generate())
    }

    /// Its recipient, to encrypt to.
    #[must_use]
    pub fn recipient(&self) -> Recipient {
        Recipient(self.0.to_public())
    }

    /// The identity file, as `age-keygen` writes it: `# created: TIME`, `# public key:
    /// age1…`, then the `AGE-SECRET-KEY-1…` line. `created` is RFC 3339.
    #[must_use]
    pub fn to_file(&self, created: &str) -> String {
        use age::secrecy::ExposeSecret as _;
        format!(
            "# created: {created}\n# public key: {}\n{}\n",
            self.recipient(),
            self.0.to_string().expose_secret()
        )
    }

    /// Reads an identity file: blank and `#` lines are skipped, exactly one
    /// `AGE-SECRET-KEY-1…` line must remain.
    ///
    /// # Errors
    /// [`ConfidentialError::BadIdentity`] naming the line, or when none or several keys are
    /// found, or the file is too large.
    pub fn from_file(text: &str) -> Result<Self, ConfidentialError> {
        if text.len() > MAX_IDENTITY_FILE_BYTES {
            return Err(ConfidentialError::BadIdentity(format!(
                "{} bytes: expected at most {MAX_IDENTITY_FILE_BYTES}",
                text.len()
            )));
        }
        let mut found = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if found.is_some() {
                return Err(ConfidentialError::BadIdentity(format!(
                    "line {}: a second key: expected exactly one",
                    n + 1
                )));
            }
            let id = age::x25519::Identity::from_str(line).map_err(|why| {
                ConfidentialError::BadIdentity(format!(
                    "line {}: expected an age X25519 identity (\"AGE-SECRET-KEY-1…\"): {why}",
                    n + 1
                ))
            })?;
            found = Some(Self(id));
        }
        found.ok_or_else(|| {
            ConfidentialError::BadIdentity(
                "no key line: expected one \"AGE-SECRET-KEY-1…\" line".into(),
            )
        })
    }
}

/// Encrypts `plaintext` to every recipient (age v1, one X25519 stanza each).
///
/// # Errors
/// [`ConfidentialError::RecipientCount`] for none or more than [`MAX_RECIPIENTS`].
pub fn encrypt(plaintext: &[u8], recipients: &[Recipient]) -> Result<Vec<u8>, ConfidentialError> {
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return Err(ConfidentialError::RecipientCount {
            found: recipients.len(),
        });
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
            .map_err(|e| ConfidentialError::Malformed(e.to_string()))?;
    let mut out = Vec::with_capacity(plaintext.len() + 200 * recipients.len() + 64);
    // Writing into a Vec cannot fail.
    let io = |e: std::io::Error| ConfidentialError::Malformed(e.to_string());
    let mut w = encryptor.wrap_output(&mut out).map_err(io)?;
    w.write_all(plaintext).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(out)
}

/// Decrypts an age file with `identity`, refusing a plaintext over `limit` bytes.
///
/// # Errors
/// [`ConfidentialError::NotARecipient`] when no stanza is for this identity;
/// [`ConfidentialError::Malformed`] for a header or payload that does not parse or
/// authenticate (flipped bytes); [`ConfidentialError::TooLarge`].
pub fn decrypt(
    ciphertext: &[u8],
    identity: &Identity,
    limit: usize,
) -> Result<Vec<u8>, ConfidentialError> {
    let malformed = |e: &dyn fmt::Display| ConfidentialError::Malformed(e.to_string());
    let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|e| malformed(&e))?;
    if decryptor.is_scrypt() {
        return Err(ConfidentialError::Malformed(
            "encrypted with a passphrase: expected X25519 recipients".into(),
        ));
    }
    let mut reader = decryptor
        .decrypt(std::iter::once(&identity.0 as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => ConfidentialError::NotARecipient {
                identity: identity.recipient().to_string(),
            },
            other => malformed(&other),
        })?;
    let mut out = Vec::new();
    (&mut reader)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| malformed(&e))?;
    if out.len() > limit {
        return Err(ConfidentialError::TooLarge { limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_to_several_recipients_and_refusal_by_others() {
        let a = Identity::generate();
        let b = Identity::generate();
        let c = Identity::generate();
        let ct = encrypt(b"secret plan", &[a.recipient(), b.recipient()]).unwrap();
        assert!(!ct.windows(11).any(|w| w == b"secret plan"));
        assert_eq!(decrypt(&ct, &a, 100).unwrap(), b"secret plan");
        assert_eq!(decrypt(&ct, &b, 100).unwrap(), b"secret plan");
        let e = decrypt(&ct, &c, 100).unwrap_err();
        assert_eq!(
            e,
            ConfidentialError::NotARecipient {
                identity: c.recipient().to_string()
            }
        );
        assert_eq!(
            decrypt(&ct, &a, 5).unwrap_err(),
            ConfidentialError::TooLarge { limit: 5 }
        );
    }

    #[test]
    fn flipped_bytes_do_not_decrypt() {
        let a = Identity::generate();
        let ct = encrypt(b"secret plan", &[a.recipient()]).unwrap();
        for i in [0, ct.len() / 2, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert!(decrypt(&bad, &a, 100).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn identity_files_round_trip_and_refuse_what_is_not_one_key() {
        let a = Identity::generate();
        let text = a.to_file("2026-12-08T00:00:00Z");
        assert!(text.contains(&format!("# public key: {}", a.recipient())));
        let back = Identity::from_file(&text).unwrap();
        assert_eq!(back.recipient(), a.recipient());
        let twice = format!("{text}{text}");
        assert!(
            Identity::from_file(&twice)
                .unwrap_err()
                .to_string()
                .contains("line 6: a second key")
        );
        assert!(
            Identity::from_file("# nothing\n")
                .unwrap_err()
                .to_string()
                .contains("no key line")
        );
        let e = Identity::from_file("age1notakey\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1: expected an age X25519 identity"), "{e}");
    }

    #[test]
    fn recipients_parse_only_in_canonical_form() {
        let r = Identity::generate().recipient();
        let s = r.to_string();
        assert_eq!(s.len(), 62);
        assert_eq!(s.parse::<Recipient>().unwrap(), r);
        assert!(s.to_uppercase().parse::<Recipient>().is_err());
        let e = "age1xyz".parse::<Recipient>().unwrap_err().to_string();
        assert!(e.contains("expected an age X25519 recipient"), "{e}");
        let secret = Identity::generate().to_file("now");
        let key = secret.lines().last().unwrap();
        let e = key.parse::<Recipient>().unwrap_err().to_string();
        assert!(
            !e.contains(&key[20..]) && e.contains("a secret identity"),
            "{e}"
        );
        assert_eq!(
            encrypt(b"x", &[]).unwrap_err(),
            ConfidentialError::RecipientCount { found: 0 }
        );
    }
}
