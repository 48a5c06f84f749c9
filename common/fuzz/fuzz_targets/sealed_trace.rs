//! Fuzzes what a device does with a confidential trace once its signatures pass, inside a
//! correctly signed sealed envelope, decrypted with the device's identity: with the first byte
//! even, the rest is the plaintext (encrypted to the identity here: the decrypted bytes reach
//! the compiled-trace decoder); odd, the rest is the age ciphertext itself (the age header and
//! payload parsers). Never panics; nothing is accepted unless it decrypts to a valid compiled
//! trace naming the header's id and version. Also fuzzes identity files and recipients.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tracefleet::confidential::{self, Identity, Recipient};
use tracefleet::signed::{self, KeyRole, Sealed, SecretKey, SignedHeader, SignedTrace};

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(Identity::generate)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let _ = Identity::from_file(&text);
    let _ = text.parse::<Recipient>();
    let content = if mode % 2 == 0 {
        confidential::encrypt(rest, &[identity().recipient()]).expect("one recipient")
    } else {
        rest.to_vec()
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
    if let Ok(v) = signed::verify(&bytes, &[key.public()], 1, 5, Some(identity())) {
        assert_eq!(v.trace.id.as_str(), "t");
        assert!(v.sealed.is_some());
    }
});
