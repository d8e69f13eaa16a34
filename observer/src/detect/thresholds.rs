//! Every threshold a detector uses, declared once.
//!
//! [`with_thresholds!`] holds the one table of thresholds: name, type, default and help. Each
//! place that needs a per-threshold shape expands it: this module into [`Thresholds`] (resolved
//! values), [`Overrides`] (what a layer sets) and the `started` report; the policy file into its
//! `[defaults]` and `[[rule]]` keys; the command line into its flags. Adding a threshold is one
//! row here, the rule that reads it, and its README row.
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de, ser::SerializeMap};

use crate::units;

/// The table. `$then!` is expanded with `{ $extra }` (passed through untouched) followed by one
/// `name: Type = default, "help";` per threshold. The name is the policy file key and, with
/// dashes, the flag; the type decides how values are parsed, checked and reported.
macro_rules! with_thresholds {
    ($then:ident { $($extra:tt)* }) => {
        $then! {
            { $($extra)* }
            idle_timeout: std::time::Duration = std::time::Duration::from_secs(60),
                "Alert `idle`: an established connection that sent and received no data for this \
                 long (a client went silent; a server thread waits in read()). Example: 5m";
            slow_after: std::time::Duration = std::time::Duration::from_secs(30),
                "Alert `slow_transfer` (slow-loris): data trickled one way below --slow-min-rate \
                 for this long while the other side sent nothing back. Example: 1m";
            slow_min_rate: $crate::detect::thresholds::BytesPerSec =
                $crate::detect::thresholds::BytesPerSec(64.0),
                "The rate, in bytes per second, below which a sustained one-way transfer counts \
                 as slow. Example: 256";
            blocked_timeout: std::time::Duration = std::time::Duration::from_secs(30),
                "Alert `blocked_send`: data waited to be sent this long while the peer, alive, \
                 took none (it stopped reading; the writer blocks). Example: 2m";
            retrans_timeout: std::time::Duration = std::time::Duration::from_secs(30),
                "Alert `retransmitting`: the kernel retransmitted unacknowledged data for this \
                 long to a peer that does not answer (it vanished; TCP retries ~15 min). \
                 Example: 1m";
            close_wait_timeout: std::time::Duration = std::time::Duration::from_secs(60),
                "Alert `close_wait`: the peer closed this long ago and the application never \
                 called close() (a leaked socket and fd). Example: 5m";
            // AWS NLB drops idle flows after 350 s, Azure LB after 4 min: 5 min catches both.
            middlebox_idle: std::time::Duration = std::time::Duration::from_secs(300),
                "Alert `keepalive_missing`: a non-loopback connection silent this long without a \
                 keepalive due sooner; a load balancer or NAT will drop it. Example: 240s";
            fd_threshold: $crate::detect::thresholds::Fraction =
                $crate::detect::thresholds::Fraction(0.9),
                "Alert `fd_pressure` when a process uses this fraction of its fd limit \
                 (RLIMIT_NOFILE), or whenever its accept() fails with EMFILE/ENFILE. Example: 0.8";
            connect_timeout: std::time::Duration = std::time::Duration::from_secs(5),
                "Alert `connect_stalled`: a watched process's connect() has had no answer for \
                 this long (the peer drops SYNs or its listen queue is full; without a connect \
                 timeout the caller waits through minutes of SYN retries). Example: 10s";
            closing_timeout: std::time::Duration = std::time::Duration::from_secs(60),
                "Alert `closing_stalled`: a closed or shut-down connection has not finished \
                 closing for this long (FIN_WAIT1, FIN_WAIT2, LAST_ACK or CLOSING: unsent data to \
                 a peer that does not read, or a peer that never answers the FIN). Example: 2m";
            spin_cpu: $crate::detect::thresholds::Cpus = $crate::detect::thresholds::Cpus(0.5),
                "Alert `accept_spinning` when a process at its fd limit, with connections waiting \
                 in a listener's queue, used at least this much CPU (in CPUs, 0.5 = half of one) \
                 over the last second: its accept loop retries EMFILE without backing off. \
                 Example: 0.8";
        }
    };
}
pub(crate) use with_thresholds;

/// What a threshold's type brings: how it is written, checked and reported.
pub trait ThresholdValue: Copy + Sized {
    /// The value's name in `--help`.
    const VALUE_NAME: &'static str;
    /// Appended to the threshold's name in the `started` event, for its unit.
    const REPORT_SUFFIX: &'static str;
    /// From a flag's text.
    fn parse(text: &str) -> Result<Self, String>;
    /// From a policy file value, checked as [`Self::parse`] checks.
    fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    /// As the `started` event reports it.
    fn report(self) -> serde_json::Value;
    /// As `--help` shows the default.
    fn show(self) -> String;
}

impl ThresholdValue for Duration {
    const VALUE_NAME: &'static str = "DURATION";
    const REPORT_SUFFIX: &'static str = "_ms";

    fn parse(text: &str) -> Result<Self, String> {
        units::positive_duration(text)
    }

    fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        units::duration(&text).map_err(de::Error::custom).and_then(|v| {
            if v.is_zero() {
                Err(de::Error::custom("a threshold must be greater than zero"))
            } else {
                Ok(v)
            }
        })
    }

    fn report(self) -> serde_json::Value {
        (self.as_millis() as u64).into()
    }

    fn show(self) -> String {
        format!("{}s", self.as_secs())
    }
}

/// A threshold given as a plain number, in a range its type sets.
pub trait Number: Copy + Sized {
    const VALUE_NAME: &'static str;
    const REPORT_SUFFIX: &'static str;
    /// Values must be above the first and at most the second.
    const RANGE: (f64, f64);
    /// What a value is and how to give one, for errors: "a rate: give ...".
    const EXPECTED: &'static str;
    fn new(v: f64) -> Self;
    fn value(self) -> f64;
}

impl<T: Number> ThresholdValue for T {
    const VALUE_NAME: &'static str = T::VALUE_NAME;
    const REPORT_SUFFIX: &'static str = T::REPORT_SUFFIX;

    fn parse(text: &str) -> Result<Self, String> {
        let v = text.trim().parse().map_err(|_| format!("'{text}' is not a number"))?;
        checked(v)
    }

    fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(f64::deserialize(d)?).map_err(de::Error::custom)
    }

    fn report(self) -> serde_json::Value {
        self.value().into()
    }

    fn show(self) -> String {
        self.value().to_string()
    }
}

fn checked<T: Number>(v: f64) -> Result<T, String> {
    let (above, at_most) = T::RANGE;
    if v.is_finite() && v > above && v <= at_most {
        Ok(T::new(v))
    } else {
        Err(format!("{v} is not {}", T::EXPECTED))
    }
}

/// Bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct BytesPerSec(pub f64);

impl Number for BytesPerSec {
    const VALUE_NAME: &'static str = "BYTES_PER_SEC";
    const REPORT_SUFFIX: &'static str = "_bytes_per_sec";
    const RANGE: (f64, f64) = (0.0, f64::MAX);
    const EXPECTED: &'static str = "a rate: give bytes per second above zero, like 64";

    fn new(v: f64) -> Self {
        BytesPerSec(v)
    }

    fn value(self) -> f64 {
        self.0
    }
}

/// A fraction of a limit: above 0, at most 1.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Fraction(pub f64);

impl Number for Fraction {
    const VALUE_NAME: &'static str = "FRACTION";
    const REPORT_SUFFIX: &'static str = "";
    const RANGE: (f64, f64) = (0.0, 1.0);
    const EXPECTED: &'static str =
        "a fraction of the fd limit: give one above 0, at most 1, like 0.9";

    fn new(v: f64) -> Self {
        Fraction(v)
    }

    fn value(self) -> f64 {
        self.0
    }
}

/// An amount of CPU time per unit of time, in CPUs: 0.5 is half of one CPU, 2 is two whole ones.
/// Above 0, at most 1024 (a threshold above the machine's CPU count never fires, but a policy
/// file written for a big machine should still load on a small one).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Cpus(pub f64);

impl Number for Cpus {
    const VALUE_NAME: &'static str = "CPUS";
    const REPORT_SUFFIX: &'static str = "";
    const RANGE: (f64, f64) = (0.0, 1024.0);
    const EXPECTED: &'static str =
        "a share of CPU time: give CPUs above 0, at most 1024, like 0.5 (half of one CPU)";

    fn new(v: f64) -> Self {
        Cpus(v)
    }

    fn value(self) -> f64 {
        self.0
    }
}

/// For policy file fields: `#[serde(default, deserialize_with = "threshold")]`.
pub fn threshold<'de, D: Deserializer<'de>, T: ThresholdValue>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

macro_rules! define_thresholds {
    ({} $( $name:ident : $ty:ty = $default:expr, $help:literal; )*) => {
        /// Every threshold's value, as it applies to one connection or process.
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct Thresholds {
            $( pub $name: $ty, )*
        }

        /// The built-in defaults.
        pub const DEFAULT_THRESHOLDS: Thresholds = Thresholds { $( $name: $default, )* };

        /// The thresholds that one layer (the policy file's defaults, a rule, the command line)
        /// sets; the rest are inherited from the layer below.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Overrides {
            $( pub $name: Option<$ty>, )*
        }

        impl Overrides {
            pub fn apply_to(&self, t: &mut Thresholds) {
                $( if let Some(v) = self.$name { t.$name = v; } )*
            }
        }

        impl Serialize for Thresholds {
            /// `name` + the type's unit suffix: `idle_timeout_ms`, `fd_threshold`, ...
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(None)?;
                $(
                    map.serialize_entry(
                        &format!("{}{}", stringify!($name), <$ty as ThresholdValue>::REPORT_SUFFIX),
                        &ThresholdValue::report(self.$name),
                    )?;
                )*
                map.end()
            }
        }
    };
}
with_thresholds!(define_thresholds {});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_reports_each_threshold_with_its_unit() {
        let v = serde_json::to_value(DEFAULT_THRESHOLDS).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(keys.contains(&"slow_min_rate_bytes_per_sec"), "{keys:?}");
        assert_eq!(v["close_wait_timeout_ms"], 60_000);
        assert_eq!(v["fd_threshold"], 0.9);
        assert_eq!(v["connect_timeout_ms"], 5_000);
        assert_eq!(v["closing_timeout_ms"], 60_000);
        assert_eq!(v["spin_cpu"], 0.5);
        assert_eq!(keys.len(), 11);
    }

    #[test]
    fn values_parse_and_refuse_with_a_hint() {
        assert_eq!(<Duration as ThresholdValue>::parse("2s"), Ok(Duration::from_secs(2)));
        assert!(<Duration as ThresholdValue>::parse("0s").is_err());
        assert!(BytesPerSec::parse("-3").unwrap_err().contains("bytes per second"));
        assert!(BytesPerSec::parse("fast").unwrap_err().contains("not a number"));
        assert!(Fraction::parse("1.5").unwrap_err().contains("at most 1"));
        assert_eq!(Fraction::parse("1"), Ok(Fraction(1.0)));
        assert_eq!(Cpus::parse("2.5"), Ok(Cpus(2.5)));
        assert!(Cpus::parse("0").unwrap_err().contains("CPUs above 0"));
        assert!(Cpus::parse("5000").is_err());
    }
}
