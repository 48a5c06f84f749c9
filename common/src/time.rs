//! Time as the fleet writes it: whole seconds since the Unix epoch (UTC) in stored rows and
//! wire messages, RFC 3339 (`2026-11-30T01:02:03Z`) in reports, logs and exports.
//!
//! The rest of this crate takes the time as an argument (verification, expiry, rollouts are
//! pure functions of their inputs and `now`); [`unix_now`] is the one place the binaries read
//! the system clock, so that every store and message agrees on one representation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch now; 0 for a clock set before 1970.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `unix_secs` as RFC 3339 in UTC with whole seconds (`1970-01-01T00:00:00Z` for 0); past
/// the year 9999, which RFC 3339 cannot show, the raw seconds (`253402300800 (unix
/// seconds)`) — an expiry field of a hostile file may hold any number.
pub fn rfc3339(unix_secs: u64) -> String {
    const MAX_RFC3339: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if unix_secs > MAX_RFC3339 {
        return format!("{unix_secs} (unix seconds)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}

/// The time now as RFC 3339 in UTC with whole seconds.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_is_utc_with_whole_seconds() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_000_523), "2026-11-30T01:02:03Z");
        assert_eq!(super::rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(
            super::rfc3339(253_402_300_800),
            "253402300800 (unix seconds)"
        );
        let now = super::rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.ends_with('Z'), "{now}");
        assert!(super::unix_now() > 1_700_000_000);
    }
}
