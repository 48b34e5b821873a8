//! The outbound-address guard: every connection the daemon opens to a destination named in
//! config (webhooks, batched webhooks, Slack, enrichment lookups, the e-mail action's SMTP
//! server) goes only to a public address, unless `[outbound] allow` names the destination.
//!
//! A configured URL is data an attacker may influence (a template whose host comes from an
//! event, a DNS name that an outsider controls), so the check is made on the addresses a name
//! *resolves to*, not on the name: HTTP goes through [`GuardedResolver`] (the DNS resolver of
//! the process's reqwest client) or `webhook_client::GuardedResolve` (the connector's resolver
//! of the per-event webhook client), which drop refused addresses before a socket is opened;
//! URLs whose host is an IP literal never reach a resolver, so [`Guard::check_url`] checks
//! those before the request is built (and the webhook client's connector again before dialling). SMTP (lettre resolves names itself) is checked
//! with [`Guard::resolve_checked`] right before the send; see docs/security.md for the
//! rebinding window that leaves.
//!
//! Refused by default ([`classify`]): loopback, RFC 1918 private, CGNAT (100.64/10, which holds
//! Alibaba's metadata 100.100.100.200), link-local (169.254/16 with the usual cloud metadata
//! address, fe80::/10), unique-local fc00::/7 (AWS's fd00:ec2::254), unspecified, multicast,
//! broadcast, documentation, benchmarking and other reserved ranges, anything outside IPv6
//! global unicast 2000::/3, and the IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms of every
//! refused IPv4 address. A refusal is permanent: the delivery is dead-lettered with a reason
//! naming the host, the address, why, and the config key that would allow it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// `[outbound]` key that admits refused destinations, for messages.
pub const ALLOW_KEY: &str = "outbound.allow";
/// Its environment name.
pub const ALLOW_ENV: &str = "OBSERVER__OUTBOUND__ALLOW";

/// One entry of `[outbound] allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowEntry {
    /// An address range (a bare address is a /32 or /128).
    Net(IpNet),
    /// A host name, lower case, without a trailing dot: every address it resolves to.
    Host(String),
    /// `*.suffix`: every host name below `suffix` (not `suffix` itself).
    Suffix(String),
}

/// The compiled allow-list. Cheap to share (`Arc`).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    entries: Vec<AllowEntry>,
}

/// A destination the guard refused. Its message is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "outbound guard refused `{host}`: {addr} is {reason}; to allow it, add \"{suggest}\" to \
     {ALLOW_KEY} ({ALLOW_ENV})"
)]
pub struct Refused {
    /// The host as written in the URL or SMTP setting.
    pub host: String,
    /// The address it is (or resolved to).
    pub addr: IpAddr,
    /// Why the address is refused, e.g. "a loopback address (127.0.0.0/8)".
    pub reason: &'static str,
    /// The allow entry that would admit it: the host name, or the address as a /32 or /128.
    pub suggest: String,
}

/// Why resolving and checking a destination failed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("cannot resolve `{host}`: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("`{host}` resolved to no address")]
    NoAddress { host: String },
}

impl Guard {
    /// Compiles `[outbound] allow`. Every bad entry is reported as (`outbound.allow[i]`, why).
    pub fn new(allow: &[String]) -> Result<Guard, Vec<(String, String)>> {
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for (i, raw) in allow.iter().enumerate() {
            match parse_entry(raw) {
                Ok(e) => entries.push(e),
                Err(why) => problems.push((format!("{ALLOW_KEY}[{i}]"), format!("`{raw}`: {why}"))),
            }
        }
        if problems.is_empty() {
            Ok(Guard { entries })
        } else {
            Err(problems)
        }
    }

    /// Whether `host` (a name, as written) is admitted by a host entry.
    fn host_allowed(&self, host: &str) -> bool {
        let h = normalise_host(host);
        self.entries.iter().any(|e| match e {
            AllowEntry::Host(n) => *n == h,
            AllowEntry::Suffix(s) => {
                h.len() > s.len() + 1 && h.ends_with(s.as_str()) && {
                    let dot = h.len() - s.len() - 1;
                    h.as_bytes()[dot] == b'.'
                }
            }
            AllowEntry::Net(_) => false,
        })
    }

    /// Whether `addr` lies in an allowed range (IPv4-mapped IPv6 compared as IPv4).
    fn net_allowed(&self, addr: IpAddr) -> bool {
        let canonical = addr.to_canonical();
        self.entries.iter().any(|e| match e {
            AllowEntry::Net(n) => n.contains(&addr) || n.contains(&canonical),
            _ => false,
        })
    }

    /// Checks one address that `host` is (or resolved to).
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        let Some(reason) = classify(addr) else {
            return Ok(());
        };
        if self.net_allowed(addr) || (!is_ip_literal(host) && self.host_allowed(host)) {
            return Ok(());
        }
        let suggest = if is_ip_literal(host) {
            match addr {
                IpAddr::V4(_) => format!("{addr}/32"),
                IpAddr::V6(_) => format!("{addr}/128"),
            }
        } else {
            normalise_host(host)
        };
        Err(Refused {
            host: host.to_string(),
            addr,
            reason,
            suggest,
        })
    }

    /// Checks a URL whose host is an IP literal (reqwest does not resolve those, so the resolver
    /// never sees them). Host names pass here: [`GuardedResolver`] checks what they resolve to.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let Some(host) = url.host_str() else {
            return Ok(());
        };
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check_addr(host, ip),
            Err(_) => Ok(()),
        }
    }

    /// Keeps the addresses of `host` the guard admits. `Err` when there were addresses and all
    /// were refused (the first refusal is the reason).
    pub fn filter(
        &self,
        host: &str,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        let mut kept = Vec::new();
        let mut first_refusal = None;
        for a in addrs {
            match self.check_addr(host, a.ip()) {
                Ok(()) => kept.push(a),
                Err(r) => {
                    first_refusal.get_or_insert(r);
                }
            }
        }
        match (kept.is_empty(), first_refusal) {
            (true, Some(r)) => Err(r),
            _ => Ok(kept),
        }
    }

    /// Resolves `host:port` and requires **every** address to be admitted (for clients that
    /// resolve again themselves and may pick any of them, as lettre does).
    pub async fn resolve_checked(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_addr(host, ip)?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|source| GuardError::Resolve {
                host: host.to_string(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(GuardError::NoAddress {
                host: host.to_string(),
            });
        }
        for a in &addrs {
            self.check_addr(host, a.ip())?;
        }
        Ok(addrs)
    }
}

/// The refusal somewhere in a reqwest error's causes (the resolver's error travels inside it).
pub fn refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = c.source();
    }
    None
}

/// reqwest's DNS resolver for the process's HTTP client: the system resolver (getaddrinfo on a
/// blocking thread, as reqwest's default), then [`Guard::filter`].
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<Guard>,
}

impl GuardedResolver {
    pub fn new(guard: Arc<Guard>) -> GuardedResolver {
        GuardedResolver { guard }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = guard.filter(&host, addrs)?;
            let out: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(out)
        })
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

fn normalise_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn parse_entry(raw: &str) -> Result<AllowEntry, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| "is not a CIDR range like 10.0.0.0/8 or fd00::/8".to_string())?;
        if net.trunc() != net {
            return Err(format!(
                "has bits set after the prefix length: did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(AllowEntry::Net(net));
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(AllowEntry::Net(IpNet::from(ip)));
    }
    if s.contains(':') {
        return Err(
            "ports are not part of an allow entry: write the host name, an address or a CIDR range"
                .into(),
        );
    }
    let (wildcard, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let name = normalise_host(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(
            "is not a CIDR range (10.0.0.0/8), an IP address, a host name (hooks.internal) or `*.` and a domain (*.svc.cluster.local)"
                .into(),
        );
    }
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("looks like an incomplete IP address: write it in full, or as a CIDR".into());
    }
    Ok(if wildcard {
        AllowEntry::Suffix(name)
    } else {
        AllowEntry::Host(name)
    })
}

/// Why `addr` is refused by default, or `None` for a public address.
pub fn classify(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn in_v4(a: Ipv4Addr, net: [u8; 4], len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u8, &str)] = &[
        ([0, 0, 0, 0], 8, "an unspecified / \"this network\" address (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, "a private address (10.0.0.0/8)"),
        ([100, 64, 0, 0], 10, "a shared / carrier-grade NAT address (100.64.0.0/10, holds cloud metadata 100.100.100.200)"),
        ([127, 0, 0, 0], 8, "a loopback address (127.0.0.0/8)"),
        ([169, 254, 0, 0], 16, "a link-local address (169.254.0.0/16, holds cloud metadata 169.254.169.254)"),
        ([172, 16, 0, 0], 12, "a private address (172.16.0.0/12)"),
        ([192, 0, 0, 0], 24, "an IETF protocol assignment (192.0.0.0/24)"),
        ([192, 0, 2, 0], 24, "a documentation address (192.0.2.0/24)"),
        ([192, 88, 99, 0], 24, "a 6to4 relay anycast address (192.88.99.0/24)"),
        ([192, 168, 0, 0], 16, "a private address (192.168.0.0/16)"),
        ([198, 18, 0, 0], 15, "a benchmarking address (198.18.0.0/15)"),
        ([198, 51, 100, 0], 24, "a documentation address (198.51.100.0/24)"),
        ([203, 0, 113, 0], 24, "a documentation address (203.0.113.0/24)"),
        ([224, 0, 0, 0], 4, "a multicast address (224.0.0.0/4)"),
        ([255, 255, 255, 255], 32, "the broadcast address"),
        ([240, 0, 0, 0], 4, "a reserved address (240.0.0.0/4)"),
    ];
    RANGES
        .iter()
        .find(|(net, len, _)| in_v4(a, *net, *len))
        .map(|(_, _, why)| *why)
}

fn classify_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    let o = a.octets();
    let embedded = |i: usize| Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
    let prefix = |net: [u16; 8], len: u32| {
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        u128::from(a) & mask == u128::from(Ipv6Addr::from(net)) & mask
    };
    if a.is_unspecified() {
        return Some("the unspecified address (::)");
    }
    if a.is_loopback() {
        return Some("the loopback address (::1)");
    }
    // ::ffff:a.b.c.d reaches a.b.c.d: judge the IPv4 address.
    if prefix([0, 0, 0, 0, 0, 0xffff, 0, 0], 96) {
        return classify_v4(embedded(12))
            .map(|_| "an IPv4-mapped IPv6 address (::ffff:0:0/96) of a refused IPv4 address");
    }
    if prefix([0; 8], 96) {
        return Some("an IPv4-compatible IPv6 address (::/96, deprecated)");
    }
    if prefix([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return classify_v4(embedded(12))
            .map(|_| "a NAT64 address (64:ff9b::/96) of a refused IPv4 address");
    }
    if prefix([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48) {
        return Some("a local-use NAT64 address (64:ff9b:1::/48)");
    }
    if prefix([0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return classify_v4(embedded(2))
            .map(|_| "a 6to4 address (2002::/16) of a refused IPv4 address");
    }
    const RANGES: &[([u16; 8], u32, &str)] = &[
        (
            [0x100, 0, 0, 0, 0, 0, 0, 0],
            64,
            "a discard-only address (100::/64)",
        ),
        (
            [0x2001, 0, 0, 0, 0, 0, 0, 0],
            23,
            "an IETF protocol assignment (2001::/23, includes Teredo)",
        ),
        (
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
            32,
            "a documentation address (2001:db8::/32)",
        ),
        (
            [0x3fff, 0, 0, 0, 0, 0, 0, 0],
            20,
            "a documentation address (3fff::/20)",
        ),
        (
            [0x5f00, 0, 0, 0, 0, 0, 0, 0],
            16,
            "a segment-routing address (5f00::/16)",
        ),
        (
            [0xfc00, 0, 0, 0, 0, 0, 0, 0],
            7,
            "a unique-local address (fc00::/7, holds cloud metadata fd00:ec2::254)",
        ),
        (
            [0xfe80, 0, 0, 0, 0, 0, 0, 0],
            10,
            "a link-local address (fe80::/10)",
        ),
        (
            [0xfec0, 0, 0, 0, 0, 0, 0, 0],
            10,
            "a site-local address (fec0::/10, deprecated)",
        ),
        (
            [0xff00, 0, 0, 0, 0, 0, 0, 0],
            8,
            "a multicast address (ff00::/8)",
        ),
    ];
    if let Some((_, _, why)) = RANGES.iter().find(|(net, len, _)| prefix(*net, *len)) {
        return Some(why);
    }
    if s[0] & 0xe000 != 0x2000 {
        return Some("outside IPv6 global unicast (2000::/3)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        classify(s.parse().unwrap()).is_some()
    }

    #[test]
    fn ipv4_ranges() {
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.100.100.200",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(refused(bad), "{bad} must be refused");
        }
        for ok in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "198.17.255.255",
            "198.20.0.0",
            "169.253.255.255",
            "223.255.255.255",
            "93.184.215.14",
        ] {
            assert!(!refused(ok), "{ok} is public");
        }
        assert!(classify("127.0.0.1".parse().unwrap())
            .unwrap()
            .contains("loopback"));
        assert!(classify("169.254.169.254".parse().unwrap())
            .unwrap()
            .contains("metadata"));
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        for bad in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::8.8.8.8",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "3fff::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "4000::1",
            "1::1",
        ] {
            assert!(refused(bad), "{bad} must be refused");
        }
        for ok in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!refused(ok), "{ok} is public");
        }
    }

    #[test]
    fn allow_entries_parse_or_name_the_entry() {
        let g = Guard::new(&[
            "10.0.0.0/8".into(),
            "127.0.0.1".into(),
            "[::1]".into(),
            "Hooks.Internal.".into(),
            "*.svc.cluster.local".into(),
        ])
        .unwrap();
        assert_eq!(g.entries.len(), 5);
        let e = Guard::new(&[
            "10.0.0.0/8".into(),
            "10.0.0.1/8".into(),
            "not a host".into(),
            "hooks.internal:8080".into(),
            "".into(),
            "300.1.1.1/8".into(),
            "10.1".into(),
        ])
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "outbound.allow[1]",
                "outbound.allow[2]",
                "outbound.allow[3]",
                "outbound.allow[4]",
                "outbound.allow[5]",
                "outbound.allow[6]"
            ]
        );
        assert!(
            e[0].1.contains("`10.0.0.1/8`") && e[0].1.contains("10.0.0.0/8"),
            "{e:?}"
        );
        assert!(e[2].1.contains("ports"), "{e:?}");
    }

    #[test]
    fn allow_list_admits_exactly_what_it_names() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let meta: IpAddr = "169.254.169.254".parse().unwrap();
        let none = Guard::default();
        let r = none.check_addr("localhost", lo).unwrap_err();
        assert_eq!(r.suggest, "localhost");
        let msg = r.to_string();
        assert!(
            msg.contains("`localhost`")
                && msg.contains("127.0.0.1")
                && msg.contains("loopback")
                && msg.contains("outbound.allow")
                && msg.contains("OBSERVER__OUTBOUND__ALLOW"),
            "{msg}"
        );
        assert_eq!(
            none.check_addr("127.0.0.1", lo).unwrap_err().suggest,
            "127.0.0.1/32"
        );
        assert!(none
            .check_addr("example.com", "8.8.8.8".parse().unwrap())
            .is_ok());

        let g = Guard::new(&[
            "127.0.0.1/32".into(),
            "hooks.internal".into(),
            "*.svc.local".into(),
        ])
        .unwrap();
        assert!(g.check_addr("127.0.0.1", lo).is_ok());
        assert!(
            g.check_addr("localhost", lo).is_ok(),
            "the range admits any name"
        );
        assert!(g.check_addr("x", "127.0.0.2".parse().unwrap()).is_err());
        assert!(g
            .check_addr("x", "::ffff:127.0.0.1".parse().unwrap())
            .is_ok());
        assert!(g.check_addr("hooks.internal", meta).is_ok());
        assert!(g.check_addr("HOOKS.internal.", meta).is_ok());
        assert!(g.check_addr("other.internal", meta).is_err());
        assert!(g.check_addr("a.b.svc.local", meta).is_ok());
        assert!(g.check_addr("svc.local", meta).is_err());
        assert!(g.check_addr("xsvc.local", meta).is_err());
        // A host entry never admits an IP literal.
        let g = Guard::new(&["169.254.169.254.nip.io".into()]).unwrap();
        assert!(g.check_addr("169.254.169.254", meta).is_err());
    }

    #[test]
    fn urls_with_ip_literals_are_checked() {
        let g = Guard::default();
        for u in [
            "http://127.0.0.1:8080/x",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
        ] {
            let url = reqwest::Url::parse(u).unwrap();
            assert!(g.check_url(&url).is_err(), "{u}");
        }
        assert!(g
            .check_url(&reqwest::Url::parse("https://8.8.8.8/").unwrap())
            .is_ok());
        assert!(
            g.check_url(&reqwest::Url::parse("http://localhost/").unwrap())
                .is_ok(),
            "names are the resolver's job"
        );
    }

    #[test]
    fn filter_keeps_admitted_addresses() {
        let g = Guard::default();
        let a = |s: &str| SocketAddr::new(s.parse().unwrap(), 0);
        assert_eq!(
            g.filter("h", [a("10.0.0.1"), a("8.8.8.8")]).unwrap(),
            [a("8.8.8.8")]
        );
        assert!(g.filter("h", [a("10.0.0.1"), a("127.0.0.1")]).is_err());
        assert!(g.filter("h", []).unwrap().is_empty());
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_refused() {
        let g = Guard::default();
        match g.resolve_checked("localhost", 25).await {
            Err(GuardError::Refused(r)) => assert!(r.addr.is_loopback(), "{r}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let g = Guard::new(&["127.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(g.resolve_checked("localhost", 25).await.is_ok());
        assert!(g.resolve_checked("[::1]", 25).await.is_ok());
    }

    #[tokio::test]
    async fn the_http_client_refuses_after_resolution_without_connecting() {
        // A listener that counts connections: the refused request must not reach it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let client = crate::action::ActionContext::http_client(Arc::new(Guard::default())).unwrap();
        let e = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        let r = refusal(&e).unwrap_or_else(|| panic!("no refusal in {e:?}"));
        assert_eq!(r.host, "localhost");
        assert!(r.addr.is_loopback());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

        let allowed = Guard::new(&["localhost".into()]).unwrap();
        let client = crate::action::ActionContext::http_client(Arc::new(allowed)).unwrap();
        let _ = client
            .get(format!("http://localhost:{port}/"))
            .timeout(std::time::Duration::from_millis(300))
            .send()
            .await;
        assert!(
            accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "an allowed name connects"
        );
    }
}
