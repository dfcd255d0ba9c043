//! Timestamps as stored: RFC 3339 text for people, milliseconds since the epoch for comparisons.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second RFC 3339 can express (9999-12-31T23:59:59Z).
const LAST_SECOND: u64 = 253_402_300_799;

/// `t` as RFC 3339 in UTC with whole seconds, e.g. `2026-11-29T12:00:00Z`.
///
/// Times outside 1970..=9999 are clamped: the formatter cannot express them, and a state file
/// is no place to fail over an absurd clock.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let last = UNIX_EPOCH + Duration::from_secs(LAST_SECOND);
    let t = t.clamp(UNIX_EPOCH, last);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The earliest stored timestamp at or after `since` (RFC 3339 in UTC, e.g.
/// `2026-11-29T12:00:00Z` or `2026-11-29T12:00:00.5Z`), in the stored form, which sorts like
/// the times it names: stored times are whole seconds, so a fraction rounds up.
pub(crate) fn parse_since(since: &str) -> crate::Result<String> {
    let t = humantime::parse_rfc3339(since).map_err(|source| crate::Error::InvalidTime {
        given: since.to_owned(),
        source,
    })?;
    let after = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    Ok(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)))
}

/// Milliseconds since the Unix epoch, negative before it, saturating at the ends of `i64`.
pub(crate) fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// `now + lease`, saturating instead of overflowing on an absurd lease.
pub(crate) fn add(now: SystemTime, lease: Duration) -> SystemTime {
    now.checked_add(lease)
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(LAST_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_clamps() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_953_600_250);
        assert_eq!(rfc3339(t), "2026-11-29T12:00:00Z");
        assert_eq!(unix_millis(t), 1_795_953_600_250);
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(5)), -5000);
        let far = add(t, Duration::MAX);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn since_rounds_fractions_up_and_refuses_other_text() {
        assert_eq!(
            parse_since("2026-11-29T12:00:00Z").unwrap(),
            "2026-11-29T12:00:00Z"
        );
        assert_eq!(
            parse_since("2026-11-29T12:00:00.25Z").unwrap(),
            "2026-11-29T12:00:01Z"
        );
        let err = parse_since("yesterday").unwrap_err();
        assert!(
            matches!(&err, crate::Error::InvalidTime { given, .. } if given == "yesterday"),
            "{err:?}"
        );
    }
}
