//! Who the client is: the socket's peer, or behind trusted proxies (an ingress, a load
//! balancer) the address they say they forwarded for.
//!
//! `X-Forwarded-For` is read from the right: each proxy appends the address it received the
//! request from, so the entries a trusted proxy wrote are at the end, and the first untrusted
//! address met walking leftwards is the client (anything left of it is the client's own claim).
//! Without trusted proxies (the default) the header is ignored: anyone can send one.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

/// The most `X-Forwarded-For` entries looked at: a chain of proxies is a few hops long, and a
/// client must not make the gateway walk a header of thousands.
const MAX_HOPS: usize = 32;

/// The proxies whose `X-Forwarded-For` is believed (`gateway.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses a comma-separated list of addresses (`10.0.0.7`, `::1`) and networks
    /// (`10.0.0.0/8`, `fd00::/8`); empty means none.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => canonical_net(net.trunc()),
                Err(_) => match entry.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(canonical(ip)),
                    Err(_) => {
                        return Err(format!(
                            "{entry:?} is neither an IP address nor a network such as 10.0.0.0/8"
                        ));
                    }
                },
            };
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that came from `peer` with these headers.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if self.0.is_empty() || !self.trusts(client) {
            return client;
        }
        // Every X-Forwarded-For line, in order, makes one list (RFC 9110 §5.3), walked from
        // its end. Entries are split before they are decoded: a proxy appends the address it
        // saw to the client's own line, so a byte the client put at the start of that line
        // must not cost the address the proxy wrote after it.
        let lines: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let entries = lines
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(|b| *b == b','));
        for entry in entries.take(MAX_HOPS) {
            // What a trusted proxy wrote is an address; anything else ends what can be believed,
            // and the proxy that passed it on is the nearest known client.
            let Some(ip) = std::str::from_utf8(entry).ok().and_then(parse_entry) else {
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                return ip;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`), as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest
            .split_once("]:")
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .and_then(|(ip, _)| ip.parse::<Ipv6Addr>().ok())
            .map(|ip| canonical(IpAddr::V6(ip)));
    }
    entry
        .rsplit_once(':')
        .and_then(|(ip, port)| port.parse::<u16>().ok().and(ip.parse::<IpAddr>().ok()))
        .map(canonical)
}

/// A network of IPv4 addresses written as IPv6 (`::ffff:10.0.0.0/104`) is that IPv4 network:
/// clients' addresses are compared as IPv4 ([`canonical`]).
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(IpNet::V6(v6), IpNet::V4)
            }
            None => IpNet::V6(v6),
        },
        other => other,
    }
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.1`, what a dual-stack socket reports) is
/// that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The key a client's rate limits count under: its IPv4 address, or its IPv6 /64 network.
/// One IPv6 subscriber is usually given a whole /64 and may send from any of its 2^64
/// addresses; keyed by address, each would be a fresh bucket.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append("x-forwarded-for", line.parse().expect("value"));
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::parse("").expect("empty");
        assert_eq!(
            none.client(ip("10.0.0.9"), &headers(&["6.6.6.6"])),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn a_client_s_claim_is_ignored_unless_its_peer_is_a_trusted_proxy() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        assert_eq!(
            trusted.client(ip("203.0.113.5"), &headers(&["6.6.6.6"])),
            ip("203.0.113.5"),
            "an untrusted peer is the client, whatever it claims"
        );
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_first_untrusted_address_from_the_right() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1").expect("parse");
        // The client forged "6.6.6.6"; its real address was appended by the first proxy, then
        // a second trusted proxy appended the first's.
        let forwarded = headers(&["6.6.6.6, 198.51.100.7", "10.1.2.3"]);
        assert_eq!(
            trusted.client(ip("192.168.1.1"), &forwarded),
            ip("198.51.100.7")
        );
        // Only trusted hops: the leftmost is the nearest known client.
        assert_eq!(
            trusted.client(ip("10.0.0.1"), &headers(&["10.9.9.9, 10.1.1.1"])),
            ip("10.9.9.9")
        );
        // No header: the proxy itself.
        assert_eq!(
            trusted.client(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        // Garbage ends the trust at the proxy that passed it on.
        assert_eq!(
            trusted.client(
                ip("10.0.0.1"),
                &headers(&["198.51.100.7, nonsense, 10.2.2.2"])
            ),
            ip("10.2.2.2")
        );
    }

    #[test]
    fn entries_with_ports_and_mapped_addresses_are_understood() {
        let trusted = TrustedProxies::parse("127.0.0.1").expect("parse");
        let peer = ip("::ffff:127.0.0.1");
        assert_eq!(
            trusted.client(peer, &headers(&["198.51.100.7:4711"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            trusted.client(peer, &headers(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn a_byte_the_client_sent_does_not_hide_the_address_the_proxy_appended() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        let mut forwarded = HeaderMap::new();
        forwarded.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff, 198.51.100.7").expect("opaque bytes"),
        );
        assert_eq!(
            trusted.client(ip("10.0.0.1"), &forwarded),
            ip("198.51.100.7")
        );
        assert_eq!(
            trusted.client(ip("10.0.0.1"), &headers(&["[2001:db8::1]junk"])),
            ip("10.0.0.1"),
            "not an address: the proxy is the nearest known client"
        );
    }

    #[test]
    fn a_mapped_network_is_the_ipv4_network() {
        let trusted = TrustedProxies::parse("::ffff:10.0.0.0/104").expect("parse");
        assert_eq!(
            trusted.client(ip("10.1.2.3"), &headers(&["198.51.100.7"])),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn a_long_header_is_walked_only_so_far() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        let chain = vec!["10.0.0.2"; 1000].join(",");
        let forwarded = headers(&[&format!("198.51.100.7,{chain}")]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &forwarded), ip("10.0.0.2"));
    }

    #[test]
    fn a_bad_entry_in_the_setting_is_named() {
        let error = TrustedProxies::parse("10.0.0.0/8, proxy.local").expect_err("a name");
        assert!(error.contains("proxy.local"), "{error}");
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_ipv4_ones_by_address() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            limit_key(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:3::1")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_key(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(limit_key(ip("198.51.100.7")), ip("198.51.100.7"));
    }
}
