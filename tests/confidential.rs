//! Confidential traces with the real binaries: `learner sign --encrypt-to`, devices that are
//! and are not recipients, tampering, versions, bundles, and what the store and the files hold.

use tracefleet::signed;
use tracefleet_e2e::Workspace;

/// Text only the trace holds: its step title, goal, file name and content.
const SECRETS: [&str; 4] = [
    "vault-7731",
    "keyring-42",
    "rotate the vault keys",
    "Copy the keyring",
];

fn source(version: &str) -> String {
    format!(
        "---\ntrace_id: secret-plan\nversion: \"{version}\"\ngoal_signature: \"rotate the vault keys (confidential fixture)\"\n---\n\n### Step 1: Copy the keyring\n\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: keyring-42.txt\n  content: \"vault-7731 rotated\"\n```\n"
    )
}

/// Compiles the fixture at `version` and signs it with `key`, encrypted to `to` (none: plain).
fn signed_secret(ws: &Workspace, version: &str, key: &str, to: &[&str], name: &str) -> String {
    std::fs::write(ws.path(&format!("{name}.trace.md")), source(version)).expect("source");
    let tfc = format!("{name}.tfc");
    let r = ws.learner(&["compile", &format!("{name}.trace.md"), "-o", &tfc]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = format!("{name}.tfs");
    let mut args = vec!["sign", tfc.as_str(), "--key", key, "-o", out.as_str()];
    for r in to {
        args.extend(["--encrypt-to", r]);
    }
    let r = ws.learner(&args);
    assert_eq!(r.code, Some(0), "{r:?}");
    if !to.is_empty() {
        assert!(r.stdout.contains("confidential: encrypted to"), "{r:?}");
    }
    out
}

/// Every file of the state directory `dir` (the database, its WAL and the rest).
fn files_hold(ws: &Workspace, dir: &str, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(ws.path(dir))
        .expect("state dir")
        .flatten()
    {
        if e.path().is_file() {
            let bytes = std::fs::read(e.path()).expect("store file");
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(e.path().display().to_string());
            }
        }
    }
    hits
}

fn state(ws: &Workspace, dir: &str) -> String {
    ws.follower(&["--state-dir", dir, "traces", "list", "--json"])
        .stdout
}

#[test]
fn a_confidential_trace_runs_on_its_recipient_only_and_stays_encrypted_at_rest() {
    let ws = Workspace::new();
    let key = ws.key("t");
    ws.trust(&key);
    // `trust init` created the device's identity; `follower identity` prints its recipient.
    let me = ws.follower(&["identity"]);
    assert_eq!(me.code, Some(0), "{me:?}");
    let me = me.stdout.trim().to_owned();
    assert!(me.starts_with("age1") && me.len() == 62, "{me}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(ws.state_dir().join("identity.txt"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Another device of the same fleet.
    let r = ws.follower(&["--state-dir", "other", "trust", "init", "root-v1.tfr"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("identity age1"), "{r:?}");

    let secret = signed_secret(&ws, "1.0.0", &key, &[&me], "secret");
    let file = std::fs::read(ws.path(&secret)).unwrap();
    for s in SECRETS {
        assert!(
            !file.windows(s.len()).any(|w| w == s.as_bytes()),
            "{s} in {secret}"
        );
    }

    // `inspect`: the whole trace with the identity, the header only without it.
    let r = ws.follower(&["inspect", &secret]);
    assert!(r.stdout.contains("Copy the keyring"), "{r:?}");
    let r = ws.follower(&["--state-dir", "other", "inspect", &secret]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains(
            "confidential trace secret-plan 1.0.0: encrypted to 1 recipient(s); header only"
        ) && r.stdout.contains(&me)
            && !r.stdout.contains("Copy the keyring"),
        "{r:?}"
    );

    // The other device refuses it, exit 2, and its store is unchanged.
    let before = state(&ws, "other");
    let r = ws.follower(&["--state-dir", "other", "install", &secret]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a recipient of this trace"), "{r:?}");
    assert_eq!(state(&ws, "other"), before);
    let r = ws.follower(&["--state-dir", "other", "run", &secret, "--base-dir", "x"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a recipient of this trace"), "{r:?}");
    assert!(!ws.path("x").exists());

    // The recipient installs and runs it; the store keeps only ciphertext.
    let r = ws.follower(&["install", &secret]);
    assert_eq!(r.code, Some(0), "{r:?}");
    for s in SECRETS {
        assert_eq!(files_hold(&ws, "state", s), Vec::<String>::new(), "{s}");
    }
    let r = ws.follower(&["run", "secret-plan", "--base-dir", "ran"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(ws.path("ran/keyring-42.txt")).unwrap(),
        "vault-7731 rotated"
    );
    let r = ws.follower(&["check"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // After the run the store holds its journal and report (the step title, the goal, the
    // outputs — here the written content: as for any trace), still not the trace itself.
    assert_eq!(files_hold(&ws, "state", "keyring-42"), Vec::<String>::new());

    // Versions never go backwards, encrypted or not.
    let older = signed_secret(&ws, "0.9.0", &key, &[&me], "older");
    let r = ws.follower(&["install", &older]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("versions never go backwards"), "{r:?}");
    let plain_older = signed_secret(&ws, "0.9.1", &key, &[], "plain-older");
    let r = ws.follower(&["install", &plain_older]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("versions never go backwards"), "{r:?}");

    // Flipped ciphertext bytes are refused.
    let newer = signed_secret(&ws, "1.1.0", &key, &[&me], "newer");
    let bytes = std::fs::read(ws.path(&newer)).unwrap();
    let before = state(&ws, "state");
    // (the ciphertext is the envelope's middle: header and recipients before it, the
    // signatures after it)
    for (i, at) in [bytes.len() / 3, bytes.len() / 2].into_iter().enumerate() {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        let name = format!("flipped-{i}.tfs");
        std::fs::write(ws.path(&name), b).unwrap();
        let r = ws.follower(&["install", &name]);
        assert_eq!(r.code, Some(2), "{name}: {r:?}");
        assert!(r.stderr.contains("content hash mismatch"), "{name}: {r:?}");
        assert_eq!(state(&ws, "state"), before);
    }
    // Another version's ciphertext under this one's header and signatures.
    let third = signed_secret(&ws, "1.2.0", &key, &[&me], "third");
    let mut swapped = signed::decode_signed(&bytes).unwrap();
    swapped.compiled = signed::decode_signed(&std::fs::read(ws.path(&third)).unwrap())
        .unwrap()
        .compiled;
    std::fs::write(ws.path("swapped.tfs"), signed::encode_signed(&swapped)).unwrap();
    let r = ws.follower(&["install", "swapped.tfs"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("content hash mismatch"), "{r:?}");
    assert_eq!(state(&ws, "state"), before);

    // A bundle carries it unchanged: no plaintext inside; a device that is not a recipient
    // leaves it out.
    let r = ws.learner(&[
        "bundle",
        "create",
        "-o",
        "usb.tfb",
        "--trust-root",
        "root-v1.tfr",
        "--key",
        &key,
        &newer,
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let usb = std::fs::read(ws.path("usb.tfb")).unwrap();
    for s in SECRETS {
        assert!(
            !usb.windows(s.len()).any(|w| w == s.as_bytes()),
            "{s} in the bundle"
        );
    }
    let r = ws.follower(&["--state-dir", "other", "install", "usb.tfb"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("left out secret-plan-1.1.0.tfs"), "{r:?}");
    assert!(r.stdout.contains("not a recipient"), "{r:?}");
    let r = ws.follower(&["install", "usb.tfb"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("installed secret-plan 1.1.0"), "{r:?}");

    // A device whose identity file was replaced can no longer run or install it.
    std::fs::remove_file(ws.state_dir().join("identity.txt")).unwrap();
    let r = ws.follower(&["identity"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_ne!(r.stdout.trim(), me);
    let r = ws.follower(&["run", "secret-plan", "--base-dir", "again"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a recipient of this trace"), "{r:?}");
    assert!(!ws.path("again").exists());
    let before = state(&ws, "state");
    let r = ws.follower(&["install", &third]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a recipient of this trace"), "{r:?}");
    assert_eq!(state(&ws, "state"), before);
    let r = ws.follower(&["check"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stdout.contains("not a recipient"), "{r:?}");
}

#[test]
fn sign_refuses_what_is_not_a_recipient_and_a_group_without_a_database() {
    let ws = Workspace::new();
    let key = ws.key("t");
    std::fs::write(ws.path("s.trace.md"), source("1.0.0")).unwrap();
    let r = ws.learner(&["compile", "s.trace.md", "-o", "s.tfc"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let sign = |to: &str| {
        ws.learner(&[
            "sign",
            "s.tfc",
            "--key",
            &key,
            "--encrypt-to",
            to,
            "-o",
            "s.tfs",
        ])
    };
    let r = sign("age1notarecipient");
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("expected an age X25519 recipient"),
        "{r:?}"
    );
    let r = sign("@lab");
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("pass --config learner.toml"), "{r:?}");
    assert!(!ws.path("s.tfs").exists());
}
