//! Wall-clock time as the follower records and prints it: unix seconds for verification,
//! RFC 3339 text (seconds) for the store and for people.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now as RFC 3339 text, in seconds (`2026-11-21T00:00:00Z`).
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// RFC 3339 text for unix seconds; raw seconds past year 9999 (what RFC 3339 can show).
#[must_use]
pub fn unix_to_rfc3339(t: u64) -> String {
    const MAX_RFC3339: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if t > MAX_RFC3339 {
        return format!("{t} (unix seconds)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_text_and_raw_seconds_past_year_9999() {
        assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(
            unix_to_rfc3339(253_402_300_800),
            "253402300800 (unix seconds)"
        );
    }
}
