//! Fuzzes what a device does with a confidential trace once its signatures pass, inside a
//! correctly signed sealed envelope, decrypted with the device's identity (a fixed one, so a
//! crash reproduces). The first byte picks the mode:
//! - 0: the rest is the plaintext, encrypted to the identity here: the decrypted bytes reach
//!   the compiled-trace decoder;
//! - 1: the rest is encrypted, then the byte at the rest's first byte (as an offset past the
//!   age header) is flipped: age's payload authentication and stream parser;
//! - otherwise: the rest is the age file itself (the header parser).
//!
//! Never panics; nothing is accepted unless it decrypts to a valid compiled trace naming the
//! header's id and version. Also fuzzes identity files and recipients.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tracefleet::confidential::{self, Identity, Recipient};
use tracefleet::signed::{self, KeyRole, Sealed, SecretKey, SignedHeader, SignedTrace};

const IDENTITY: &str = "AGE-SECRET-KEY-1N7RH7M9CUGZML693A990CN93VYR7UWX9NK545U4RGN846JEHNRPQFJUSNQ";

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::from_file(IDENTITY).expect("the fixed identity"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let _ = Identity::from_file(&text);
    let _ = text.parse::<Recipient>();
    let content = match mode {
        0 => confidential::encrypt(rest, &[identity().recipient()]).expect("one recipient"),
        1 => {
            let Some((&at, plain)) = rest.split_first() else {
                return;
            };
            let mut c = confidential::encrypt(plain, &[identity().recipient()]).expect("one recipient");
            // The header of a one-recipient file is about 200 bytes.
            let i = (200 + usize::from(at)).min(c.len() - 1);
            c[i] ^= 1;
            c
        }
        _ => rest.to_vec(),
    };
    let key = SecretKey::from_seed(KeyRole::Traces, [7u8; 32]);
    let header = SignedHeader {
        trace_id: "t".parse().expect("id"),
        version: "1.0.0".parse().expect("version"),
        created_at: 0,
        expires_at: 10,
        content_hash: Sha256::digest(&content).into(),
    };
    let mut s = SignedTrace {
        header,
        sealed: Some(Sealed {
            recipients: vec![identity().recipient().to_string()],
        }),
        compiled: content,
        signatures: Vec::new(),
    };
    s.signatures.push(signed::sign_message(&s.signing_message(), &key));
    let bytes = signed::encode_signed(&s);
    let verified = signed::verify(&bytes, &[key.public()], 1, 5, Some(identity()));
    if mode == 1 {
        assert!(verified.is_err(), "a flipped ciphertext byte was accepted");
    }
    if let Ok(v) = verified {
        assert_eq!(v.trace.id.as_str(), "t");
        assert!(v.sealed.is_some());
    }
});
