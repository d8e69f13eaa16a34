//! Thresholds and the policy file (`--config observer.toml`) that tunes them per connection.
//!
//! Resolution for a socket: built-in defaults, then the file's `[defaults]`, then the first
//! `[[rule]]` whose match keys all fit the socket, then any threshold flag given on the command
//! line. `ignore` lists (from `[defaults]` and the matching rule) silence reasons outright.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};
use thiserror::Error;

use super::{
    matchers::{Cidr, ContainerIdPattern, NamePattern},
    reason::Reason,
    thresholds::{DEFAULT_THRESHOLDS, Overrides, Thresholds, threshold, with_thresholds},
};

/// A set of reasons, small enough to copy around per socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonSet(u16);

impl ReasonSet {
    pub fn insert(&mut self, r: Reason) {
        self.0 |= 1 << r as u16;
    }

    pub fn contains(self, r: Reason) -> bool {
        self.0 & (1 << r as u16) != 0
    }

    fn union(self, other: ReasonSet) -> ReasonSet {
        ReasonSet(self.0 | other.0)
    }
}

impl FromIterator<Reason> for ReasonSet {
    fn from_iter<I: IntoIterator<Item = Reason>>(iter: I) -> Self {
        let mut set = ReasonSet::default();
        iter.into_iter().for_each(|r| set.insert(r));
        set
    }
}

/// What a rule is matched against. Process-level findings have no ports or addresses, so
/// rules that match on those never apply to them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Subject<'a> {
    pub local_port: Option<u16>,
    pub remote_ip: Option<IpAddr>,
    pub pid: Option<u32>,
    pub comm: Option<&'a str>,
    /// Where the process runs, when known (see `snapshot::Workload`).
    pub container_id: Option<&'a str>,
    pub pod: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Shared with the alerts it sets thresholds for.
    pub name: std::sync::Arc<str>,
    pub local_ports: Vec<u16>,
    pub remote_cidrs: Vec<Cidr>,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub container_ids: Vec<ContainerIdPattern>,
    pub pods: Vec<NamePattern>,
    pub namespaces: Vec<NamePattern>,
    pub overrides: Overrides,
    pub ignore: ReasonSet,
}

impl Rule {
    /// Every match key the rule has must fit; a rule with none matches everything.
    fn matches(&self, s: &Subject) -> bool {
        fn fits<T, V>(wanted: &[T], value: Option<V>, eq: impl Fn(&T, &V) -> bool) -> bool {
            wanted.is_empty() || value.is_some_and(|v| wanted.iter().any(|w| eq(w, &v)))
        }
        fits(&self.local_ports, s.local_port, |a, b| a == b)
            && fits(&self.remote_cidrs, s.remote_ip, |c, ip| c.contains(*ip))
            && fits(&self.pids, s.pid, |a, b| a == b)
            && fits(&self.comms, s.comm, |a, b| a == b)
            && fits(&self.container_ids, s.container_id, |p, id| p.matches(id))
            && fits(&self.pods, s.pod, |p, name| p.matches(name))
            && fits(&self.namespaces, s.namespace, |p, name| p.matches(name))
    }
}

/// The thresholds that apply to one subject, and why.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'p> {
    pub thresholds: Thresholds,
    pub ignored: ReasonSet,
    /// The rule that matched, if any.
    pub rule: Option<&'p std::sync::Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    base: Thresholds,
    base_ignore: ReasonSet,
    rules: Vec<Rule>,
    command_line: Overrides,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            base: DEFAULT_THRESHOLDS,
            base_ignore: ReasonSet::default(),
            rules: Vec::new(),
            command_line: Overrides::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum PolicyError {
    // The io error is part of the message, not a source, so it is printed once.
    #[error("cannot read policy file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("policy file {path} is not a regular file: give the path of a TOML file")]
    NotAFile { path: PathBuf },
    #[error(
        "policy file {path} is {bytes} bytes, more than the {MAX_POLICY_BYTES} a policy file may \
         have: split it, or match ports and addresses with lists and CIDR blocks"
    )]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
}

#[cfg(test)]
impl Applied<'_> {
    pub fn rule_name(&self) -> Option<&str> {
        self.rule.map(|r| &**r)
    }
}

impl Policy {
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = read_policy_text(path)?;
        Policy::parse(&text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |span| line_column(&text, span.start));
            // One line: toml's own messages can span several.
            let message = e.message().trim().replace('\n', "; ");
            PolicyError::Invalid { path: path.to_owned(), line, column, message }
        })
    }

    pub fn parse(text: &str) -> Result<Policy, toml::de::Error> {
        let file: PolicyFile = toml::from_str(text)?;
        let mut base = DEFAULT_THRESHOLDS;
        file.defaults.overrides().apply_to(&mut base);
        let rules = file
            .rule
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule {
                name: r.name.clone().unwrap_or_else(|| format!("rule {}", i + 1)).into(),
                local_ports: r.local_port.clone(),
                remote_cidrs: r.remote_cidr.clone(),
                pids: r.pid.clone(),
                comms: r.comm.clone(),
                container_ids: r.container_id.clone(),
                pods: r.pod.clone(),
                namespaces: r.namespace.clone(),
                overrides: r.overrides(),
                ignore: r.ignore.iter().map(|n| n.0).collect(),
            })
            .collect();
        Ok(Policy {
            base,
            base_ignore: file.defaults.ignore.iter().map(|n| n.0).collect(),
            rules,
            command_line: Overrides::default(),
        })
    }

    /// Threshold flags given on the command line win over the file, rules included.
    pub fn with_command_line(mut self, overrides: Overrides) -> Policy {
        self.command_line = overrides;
        self
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn apply(&self, subject: &Subject) -> Applied<'_> {
        let mut thresholds = self.base;
        let mut ignored = self.base_ignore;
        let rule = self.rules.iter().find(|r| r.matches(subject));
        if let Some(rule) = rule {
            rule.overrides.apply_to(&mut thresholds);
            ignored = ignored.union(rule.ignore);
        }
        self.command_line.apply_to(&mut thresholds);
        Applied { thresholds, ignored, rule: rule.map(|r| &r.name) }
    }

    /// The thresholds with no rule applied (what `started` reports).
    pub fn base(&self) -> Thresholds {
        self.apply(&Subject::default()).thresholds
    }
}

/// Default thresholds but for the idle timeout, for tests elsewhere.
#[cfg(test)]
pub(crate) fn idle_after(timeout: std::time::Duration) -> Policy {
    Policy::default()
        .with_command_line(Overrides { idle_timeout: Some(timeout), ..Default::default() })
}

/// The largest policy file read: about 16,000 rules, far more than a hand-written one has.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// A policy file's text. Only a regular file is read (a FIFO would block `check` forever), and
/// only up to [`MAX_POLICY_BYTES`].
fn read_policy_text(path: &Path) -> Result<String, PolicyError> {
    use std::io::Read;
    let read_error = |error| PolicyError::Read { path: path.to_owned(), error };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(PolicyError::NotAFile { path: path.to_owned() });
    }
    if meta.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge { path: path.to_owned(), bytes: meta.len() });
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_POLICY_BYTES + 1).read_to_string(&mut text))
        .map_err(read_error)?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge { path: path.to_owned(), bytes: text.len() as u64 });
    }
    Ok(text)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// --- The file format -----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    defaults: DefaultsSection,
    #[serde(default)]
    rule: Vec<RuleSection>,
}

/// A section of the file: `extra` keys, `ignore`, and every threshold key.
macro_rules! policy_section {
    ({ $section:ident { $($extra:tt)* } } $( $name:ident : $ty:ty = $default:expr, $help:literal; )*) => {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $section {
            $($extra)*
            #[serde(default)]
            ignore: Vec<ReasonName>,
            $(
                #[serde(default, deserialize_with = "threshold")]
                $name: Option<$ty>,
            )*
        }

        impl $section {
            fn overrides(&self) -> Overrides {
                Overrides { $( $name: self.$name, )* }
            }
        }
    };
}

with_thresholds!(policy_section { DefaultsSection {} });
with_thresholds!(policy_section {
    RuleSection {
        name: Option<String>,
        #[serde(default, deserialize_with = "one_or_many")]
        local_port: Vec<u16>,
        #[serde(default, deserialize_with = "one_or_many")]
        remote_cidr: Vec<Cidr>,
        #[serde(default, deserialize_with = "one_or_many")]
        pid: Vec<u32>,
        #[serde(default, deserialize_with = "one_or_many")]
        comm: Vec<String>,
        #[serde(default, deserialize_with = "one_or_many")]
        container_id: Vec<ContainerIdPattern>,
        #[serde(default, deserialize_with = "one_or_many")]
        pod: Vec<NamePattern>,
        #[serde(default, deserialize_with = "one_or_many")]
        namespace: Vec<NamePattern>,
    }
});

struct ReasonName(Reason);

impl fmt::Debug for ReasonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for ReasonName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map(ReasonName).map_err(de::Error::custom)
    }
}

/// Accepts `key = value` as well as `key = [value, ...]`.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visit<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visit<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a value or a list of values")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element()? {
                out.push(v);
            }
            Ok(out)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
            T::deserialize(de::value::I64Deserializer::new(v)).map(|v| vec![v])
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(de::value::StrDeserializer::new(v)).map(|v| vec![v])
        }
    }
    d.deserialize_any(Visit(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const EXAMPLE: &str = r#"
# Every connection: report idle ones after two minutes, never keepalive_missing.
[defaults]
idle_timeout = "2m"
ignore = ["keepalive_missing"]

# Long polling clients sit idle by design.
[[rule]]
name = "long-poll"
local_port = [8080, 8081]
idle_timeout = "15m"

# Batch uploads from the office are slow; do not call them slow-loris.
[[rule]]
name = "office uploads"
remote_cidr = ["10.0.0.0/8", "2001:db8::/32"]
comm = "uploader"
ignore = ["slow_transfer"]
slow_min_rate = 8
"#;

    fn subject(port: u16, ip: &str, comm: &str) -> Subject<'static> {
        Subject {
            local_port: Some(port),
            remote_ip: Some(ip.parse().unwrap()),
            pid: Some(1),
            comm: Some(Box::leak(comm.to_owned().into_boxed_str())),
            ..Subject::default()
        }
    }

    #[test]
    fn defaults_rules_and_ignores_resolve_in_order() {
        let policy = Policy::parse(EXAMPLE).unwrap();
        let plain = policy.apply(&subject(9000, "192.0.2.1", "srv"));
        assert_eq!(plain.thresholds.idle_timeout, Duration::from_secs(120));
        assert_eq!(plain.thresholds.close_wait_timeout, Duration::from_secs(60));
        assert!(plain.ignored.contains(Reason::KeepaliveMissing));
        assert_eq!(plain.rule_name(), None);

        let poll = policy.apply(&subject(8081, "192.0.2.1", "srv"));
        assert_eq!(poll.thresholds.idle_timeout, Duration::from_secs(900));
        assert_eq!(poll.rule_name(), Some("long-poll"));

        let office = policy.apply(&subject(9000, "10.1.2.3", "uploader"));
        assert!(office.ignored.contains(Reason::SlowTransfer));
        assert!(office.ignored.contains(Reason::KeepaliveMissing), "defaults' ignore still holds");
        assert_eq!(office.thresholds.slow_min_rate.0, 8.0);
        // Every key of a rule must fit: right network, wrong program.
        assert!(policy.apply(&subject(9000, "10.1.2.3", "other")).rule_name().is_none());
        // IPv4 clients of an IPv6 socket match IPv4 blocks.
        assert_eq!(
            policy.apply(&subject(9000, "::ffff:10.9.9.9", "uploader")).rule_name(),
            Some("office uploads")
        );
    }

    #[test]
    fn first_matching_rule_wins_and_command_line_wins_over_all() {
        let text =
            "[[rule]]\nlocal_port = 80\nidle_timeout = \"1m\"\n[[rule]]\nidle_timeout = \"9m\"\n";
        let policy = Policy::parse(text).unwrap().with_command_line(Overrides {
            blocked_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        });
        let web = policy.apply(&subject(80, "192.0.2.1", "x"));
        assert_eq!(
            (web.thresholds.idle_timeout, web.rule_name()),
            (Duration::from_secs(60), Some("rule 1"))
        );
        let other = policy.apply(&subject(81, "192.0.2.1", "x"));
        assert_eq!(
            (other.thresholds.idle_timeout, other.rule_name()),
            (Duration::from_secs(540), Some("rule 2"))
        );
        assert_eq!(other.thresholds.blocked_timeout, Duration::from_secs(5));
        let cli = policy.clone().with_command_line(Overrides {
            idle_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        });
        assert_eq!(
            cli.apply(&subject(80, "192.0.2.1", "x")).thresholds.idle_timeout,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn rules_match_where_a_process_runs() {
        let text = r#"
[[rule]]
name = "web pods"
pod = "web-*"
namespace = ["shop", "shop-staging"]
idle_timeout = "10m"

[[rule]]
name = "one container"
container_id = "4f1c8a3b9d2e"
ignore = ["idle"]
"#;
        let policy = Policy::parse(text).unwrap();
        let id = "4f1c8a3b9d2e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
        let web =
            Subject { pod: Some("web-7d9f8-x2x9q"), namespace: Some("shop"), ..Default::default() };
        assert_eq!(policy.apply(&web).rule_name(), Some("web pods"));
        let elsewhere = Subject { namespace: Some("other"), ..web };
        assert_eq!(policy.apply(&elsewhere).rule_name(), None);
        let container = Subject { container_id: Some(id), ..Default::default() };
        assert!(policy.apply(&container).ignored.contains(Reason::Idle));
        // Unknown is no match: a socket whose pod is not known is not a web pod.
        let unknown = Subject { namespace: Some("shop"), ..Default::default() };
        assert_eq!(policy.apply(&unknown).rule_name(), None);
    }

    #[test]
    fn rules_with_socket_keys_do_not_apply_to_processes() {
        let policy = Policy::parse("[[rule]]\nlocal_port = 80\nfd_threshold = 0.5\n").unwrap();
        let process = Subject { pid: Some(7), comm: Some("srv"), ..Default::default() };
        assert_eq!(policy.apply(&process).thresholds.fd_threshold.0, 0.9);
    }

    fn error_of(text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("observer-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("p{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let err = Policy::from_file(&path).unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err.replace(&path.display().to_string(), "FILE")
    }

    #[test]
    fn bad_files_are_rejected_with_line_and_reason() {
        // (file, the line the error names, what the message says)
        let cases = [
            ("[defaults]\nidle_timeout = \"60\"\n", 2, "like 500ms, 2s or 5m"),
            ("[[rule]]\nname = \"a\"\nignore = [\"idel\"]\n", 3, "unknown reason 'idel'"),
            ("\n\n[[rule]]\nremote_cidr = \"10.0.0.0/33\"\n", 4, "address block"),
            ("[[rule]]\nidle_timeuot = \"5s\"\n", 2, "idle_timeuot"),
            ("[defaults]\nfd_threshold = 1.5\n", 2, "fraction"),
            ("[defaults]\nlocal_port = 80\n", 2, "local_port"),
            ("[[rule]\n", 1, ""),
            ("[[rule]]\nlocal_port = 70000\n", 2, ""),
            ("[[rule]]\npod = \"Web_1\"\n", 2, "not a Kubernetes name"),
            ("[[rule]]\ncontainer_id = [\"abc\"]\n", 2, "not a container id"),
        ];
        for (text, line, says) in cases {
            let e = error_of(text);
            assert!(e.starts_with(&format!("FILE:{line}:")) && e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn only_regular_files_of_reasonable_size_are_read() {
        let err = Policy::from_file(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("observer-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.toml");
        std::fs::write(&big, "# x\n".repeat(300_000)).unwrap();
        let err = Policy::from_file(&big).unwrap_err().to_string();
        assert!(err.contains("more than the 1048576"), "{err}");
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn missing_file_says_so() {
        let err = Policy::from_file(Path::new("/nonexistent/observer.toml")).unwrap_err();
        assert!(err.to_string().contains("cannot read policy file /nonexistent/observer.toml"));
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
    }
}
