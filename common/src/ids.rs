//! Validated newtypes: once constructed, a value is known to be well formed ("parse, don't
//! validate"). Each `FromStr` error says what was expected and what was found.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {found:?}: expected {expected}")]
pub struct IdError {
    /// The kind of identifier (`trace id`, `version`, …).
    pub what: &'static str,
    /// The rule it breaks.
    pub expected: &'static str,
    /// The offending text (truncated to 80 characters).
    pub found: String,
}

fn id_error(what: &'static str, expected: &'static str, found: &str) -> IdError {
    IdError {
        what,
        expected,
        found: found.chars().take(80).collect(),
    }
}

/// A trace id: 1–128 characters of `[a-z0-9._-]`, starting with a letter or digit.
/// Safe as a file name and an MQTT topic level.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceId(String);

impl TraceId {
    const EXPECTED: &'static str =
        "1-128 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit";

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TraceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = (1..=128).contains(&s.len())
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(id_error("trace id", Self::EXPECTED, s))
        }
    }
}

impl TryFrom<String> for TraceId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<TraceId> for String {
    fn from(id: TraceId) -> Self {
        id.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A trace version, `MAJOR.MINOR.PATCH` ordered numerically. `MAJOR.MINOR` (LLMunix writes
/// `version: "1.0"`) is read as `MAJOR.MINOR.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Incompatible change of the trace's behaviour.
    pub major: u32,
    /// Compatible change.
    pub minor: u32,
    /// Fix.
    pub patch: u32,
}

impl FromStr for Version {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        const EXPECTED: &str = "MAJOR.MINOR.PATCH or MAJOR.MINOR with decimal numbers";
        let err = || id_error("version", EXPECTED, s);
        let s2 = s.strip_prefix('v').unwrap_or(s);
        let parts: Vec<&str> = s2.split('.').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(err());
        }
        let num = |p: &str| -> Result<u32, IdError> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        Ok(Self {
            major: num(parts[0])?,
            minor: num(parts[1])?,
            patch: parts.get(2).map(|p| num(p)).transpose()?.unwrap_or(0),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A variable name usable as `{name}` in a trace: `[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VarName(String);

impl VarName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` is a valid variable name.
    pub fn is_valid(s: &str) -> bool {
        (1..=64).contains(&s.len())
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }
}

impl FromStr for VarName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if Self::is_valid(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(id_error(
                "variable name",
                "1-64 characters of A-Z, a-z, 0-9, '_', not starting with a digit",
                s,
            ))
        }
    }
}

impl TryFrom<String> for VarName {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<VarName> for String {
    fn from(v: VarName) -> Self {
        v.0
    }
}

impl fmt::Display for VarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run id: a UUID in its 36-character hyphenated lowercase form (the follower uses UUIDv7,
/// so ids sort by start time).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RunId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(id_error(
                "run id",
                "a lowercase hyphenated UUID (8-4-4-4-12 hex digits)",
                s,
            ))
        }
    }
}

impl TryFrom<String> for RunId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<RunId> for String {
    fn from(v: RunId) -> Self {
        v.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device id: 1–64 bytes of `[A-Za-z0-9._-]`, not `.` or `..`. Safe as an MQTT topic level
/// (no wildcards or separators) and as a file name; the same rule as the fleet link's
/// topic levels ([`crate::wire::check_name`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest device id, bytes.
    pub const MAX_BYTES: usize = 64;

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = (1..=Self::MAX_BYTES).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s != "."
            && s != "..";
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(id_error(
                "device id",
                "1-64 characters of A-Z, a-z, 0-9, '.', '_', '-' (not '.' or '..')",
                s,
            ))
        }
    }
}

impl TryFrom<String> for DeviceId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<DeviceId> for String {
    fn from(v: DeviceId) -> Self {
        v.0
    }
}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl std::ops::Deref for DeviceId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    /// The id as text, padded as a `str` would be (`{:<16}` in listings).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trace_id_rules() {
        assert!("dpkg-log-triage".parse::<TraceId>().is_ok());
        assert!("a.b_c-1".parse::<TraceId>().is_ok());
        for bad in ["", "-x", "Upper", "a/b", "../x", "a b", &"x".repeat(129)] {
            let e = bad.parse::<TraceId>().unwrap_err();
            assert!(e.to_string().contains("expected"), "{e}");
        }
    }

    #[test]
    fn version_forms_and_order() {
        let v: Version = "1.0".parse().unwrap();
        assert_eq!(v.to_string(), "1.0.0");
        let a: Version = "1.2.10".parse().unwrap();
        let b: Version = "1.2.9".parse().unwrap();
        assert!(a > b, "numeric, not lexical, order");
        for bad in ["1", "1.x", "1..2", "1.2.3.4", "", "1.-2", "1.2.3a"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn run_id_rules() {
        assert!(
            "0192f3c4-5b6a-7c8d-9e0f-a1b2c3d4e5f6"
                .parse::<RunId>()
                .is_ok()
        );
        assert!(
            "0192F3C4-5b6a-7c8d-9e0f-a1b2c3d4e5f6"
                .parse::<RunId>()
                .is_err()
        );
        assert!("../../etc/passwd".parse::<RunId>().is_err());
    }

    #[test]
    fn device_id_rules_are_the_topic_level_rules() {
        for good in ["pi-01", "Jetson_7", "site.a", "x"] {
            assert!(good.parse::<DeviceId>().is_ok(), "{good}");
            assert!(crate::wire::check_name("device id", good).is_ok(), "{good}");
        }
        let long = "d".repeat(65);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "+",
            "#",
            "a b",
            "\u{202e}x",
            "pi\u{1b}[31m",
            &long,
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?}");
            assert!(
                crate::wire::check_name("device id", bad).is_err(),
                "{bad:?}"
            );
        }
        let id: DeviceId = serde_json::from_str("\"pi-01\"").unwrap();
        assert_eq!(id.as_str(), "pi-01");
        assert!(serde_json::from_str::<DeviceId>("\"../x\"").is_err());
    }

    #[test]
    fn device_id_pads_like_a_str_in_listings() {
        let id: DeviceId = "pi-01".parse().unwrap();
        assert_eq!(format!("{id:<8}|"), format!("{:<8}|", "pi-01"));
        assert_eq!(id.to_string(), "pi-01");
    }

    proptest! {
        #[test]
        fn version_display_parse_round_trip(major in 0u32..1_000_000, minor in 0u32..1_000_000, patch in 0u32..1_000_000) {
            let v = Version { major, minor, patch };
            prop_assert_eq!(v.to_string().parse::<Version>().unwrap(), v);
        }

        #[test]
        fn trace_id_parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<TraceId>();
        }
    }
}
