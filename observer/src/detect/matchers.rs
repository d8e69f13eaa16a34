//! The values policy rules match on, each parsed (and refused with a reason) as the file is read.
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, de};

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let prefix = u32::from(self.prefix);
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an address block like 10.0.0.0/8 or 2001:db8::/32");
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let network: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A container, by its full id or the first 12 or more hex digits of it (as `docker ps`,
/// `podman ps` and `crictl ps` show ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerIdPattern(String);

impl ContainerIdPattern {
    pub fn matches(&self, id: &str) -> bool {
        id.starts_with(&self.0)
    }
}

impl std::str::FromStr for ContainerIdPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let id = s.trim().to_ascii_lowercase();
        let hex = id.bytes().all(|b| b.is_ascii_hexdigit());
        if hex && (12..=64).contains(&id.len()) {
            Ok(ContainerIdPattern(id))
        } else {
            Err(format!(
                "'{s}' is not a container id: give the full id or its first 12 or more hex digits"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for ContainerIdPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A Kubernetes name (pod, namespace), where `*` stands for any run of characters: pods of a
/// Deployment are named `<deployment>-<hash>-<suffix>`, so `web-*` matches all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern(String);

impl NamePattern {
    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

/// `*` matches any run of bytes; everything else itself. Backtracks only to the last `*`, so
/// it is linear in practice.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

impl std::str::FromStr for NamePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.*".contains(c);
        if !s.is_empty() && s.len() <= 253 && s.chars().all(allowed) {
            Ok(NamePattern(s.to_owned()))
        } else {
            Err(format!(
                "'{s}' is not a Kubernetes name: lower-case letters, digits, '-' and '.', with \
                 '*' for any run of them (e.g. \"web-*\")"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let one: Cidr = "2001:db8::1".parse().unwrap();
        assert!(one.contains("2001:db8::1".parse().unwrap()));
        assert!(!one.contains("2001:db8::2".parse().unwrap()));
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
    }

    #[test]
    fn container_ids_match_in_full_or_by_a_long_enough_prefix() {
        let id = "4f1c8a3b9d2e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
        let short: ContainerIdPattern = "4F1C8A3B9D2E".parse().unwrap();
        assert!(short.matches(id));
        assert!(id.parse::<ContainerIdPattern>().unwrap().matches(id));
        assert!(!"4f1c8a3b9d2f".parse::<ContainerIdPattern>().unwrap().matches(id));
        for bad in ["4f1c8a3b9d2", "web", &"a".repeat(65), ""] {
            assert!(bad.parse::<ContainerIdPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_match_exactly_or_by_glob() {
        let web: NamePattern = "web-*".parse().unwrap();
        assert!(web.matches("web-7d9f8c6b5-x2x9q"));
        assert!(!web.matches("webshop-1"));
        assert!("*-0".parse::<NamePattern>().unwrap().matches("db-0"));
        assert!("a*b*c".parse::<NamePattern>().unwrap().matches("axxbyyc"));
        assert!(!"a*b*c".parse::<NamePattern>().unwrap().matches("axxbyy"));
        assert!("*".parse::<NamePattern>().unwrap().matches(""));
        let exact: NamePattern = "kube-system".parse().unwrap();
        assert!(exact.matches("kube-system") && !exact.matches("kube-system2"));
        for bad in ["Web", "web_1", "", "a b"] {
            assert!(bad.parse::<NamePattern>().is_err(), "{bad}");
        }
    }
}
