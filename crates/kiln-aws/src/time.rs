//! Timestamps as stored: RFC 3339 text for people, milliseconds since the epoch for DynamoDB
//! comparisons.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second RFC 3339 can express (9999-12-31T23:59:59Z).
const LAST_SECOND: u64 = 253_402_300_799;

/// `t` as RFC 3339 in UTC with whole seconds, clamped to 1970..=9999.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let last = UNIX_EPOCH + Duration::from_secs(LAST_SECOND);
    humantime::format_rfc3339_seconds(t.clamp(UNIX_EPOCH, last)).to_string()
}

/// Milliseconds since the Unix epoch, 0 before it, saturating.
pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the epoch.
pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `now + lease`, saturating instead of overflowing on an absurd lease.
pub(crate) fn add(now: SystemTime, lease: Duration) -> SystemTime {
    now.checked_add(lease)
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(LAST_SECOND))
        .min(UNIX_EPOCH + Duration::from_secs(LAST_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_saturates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_953_600_250);
        assert_eq!(rfc3339(t), "2026-11-29T12:00:00Z");
        assert_eq!(unix_millis(t), 1_795_953_600_250);
        assert_eq!(from_millis(unix_millis(t)), t);
        assert_eq!(rfc3339(add(t, Duration::MAX)), "9999-12-31T23:59:59Z");
    }
}
