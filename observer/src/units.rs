//! Values as users write them, on the command line and in the policy file.
use std::time::Duration;

/// Parses `500ms`, `2s`, `5m`, `1h30m`.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("'{text}' is not a duration: give a number with a unit, like 500ms, 2s or 5m")
    })
}

/// A duration above zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("must be greater than zero, like 500ms, 2s or 5m".into()),
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
}
