//! Values as users write them, on the command line and in the policy file.
use std::time::Duration;

/// The longest duration anything takes: longer ones are typos (and would overflow the
/// millisecond clocks they are compared with).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest poll interval: below it the agent would do nothing but poll.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Parses `500ms`, `2s`, `5m`, `1h30m`, up to [`MAX_DURATION`].
pub fn duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|_| {
        format!("'{text}' is not a duration: give a number with a unit, like 500ms, 2s or 5m")
    })?;
    if d > MAX_DURATION {
        return Err(format!("'{text}' is too long: at most 30 days (720h)"));
    }
    Ok(d)
}

/// A duration above zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("must be greater than zero, like 500ms, 2s or 5m".into()),
        d => Ok(d),
    }
}

/// How often to poll: at least [`MIN_POLL_INTERVAL`].
pub fn poll_interval(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d < MIN_POLL_INTERVAL => {
            Err(format!("'{text}' is too short: poll at most every 10ms (like 200ms or 1s)"))
        }
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn durations_without_units_or_garbage_are_refused_with_a_hint() {
        for bad in ["5", "", "fast", "-1s", "2 parsecs"] {
            let err = duration(bad).unwrap_err();
            assert!(err.contains("like 500ms, 2s or 5m"), "{bad}: {err}");
        }
        assert!(positive_duration("0s").is_err());
    }

    #[test]
    fn durations_that_would_wrap_or_spin_are_refused() {
        // 2^64 ns: would wrap to 384 ms in a u64 of nanoseconds.
        assert!(duration("18446744073709552s").unwrap_err().contains("at most 30 days"));
        assert_eq!(duration("720h"), Ok(MAX_DURATION));
        assert!(duration("721h").is_err());
        assert!(poll_interval("1ns").unwrap_err().contains("at most every 10ms"));
        assert_eq!(poll_interval("10ms"), Ok(MIN_POLL_INTERVAL));
    }
}
