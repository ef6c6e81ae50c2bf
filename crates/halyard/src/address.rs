//! `IP:PORT` values of the configuration file, the environment and the command line.
//!
//! The broker binds sockets before it could ask a resolver, and a name that resolves to
//! several addresses would be ambiguous, so only IP addresses are accepted; the error says so
//! instead of the standard library's bare "invalid socket address syntax".

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer};

/// Parses `IP:PORT` (`127.0.0.1:1883`, `[::1]:1883`).
pub fn parse(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    text.parse().map_err(|_| {
        let looks_like_host = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && !host.is_empty());
        if looks_like_host {
            format!(
                "`{text}` is not an IP:PORT address: an IP address is required, host names \
                 are not resolved (for example 127.0.0.1:1883 for this machine only, \
                 0.0.0.0:1883 for every IPv4 interface, [::1]:1883 for IPv6)"
            )
        } else {
            format!("`{text}` is not an IP:PORT address (for example 127.0.0.1:1883 or [::1]:1883)")
        }
    })
}

/// Serde `deserialize_with` for one address.
pub fn one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Serde `deserialize_with` for an optional address.
pub fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        Some(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

/// Serde `deserialize_with` for an optional list of addresses.
pub fn optional_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<SocketAddr>>, D::Error> {
    match Option::<Vec<String>>::deserialize(deserializer)? {
        Some(texts) => texts
            .iter()
            .map(|text| parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_parse_and_host_names_say_an_ip_is_required() {
        assert_eq!(
            parse("[::1]:1883"),
            Ok(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 1883)))
        );
        assert_eq!(
            parse(" 127.0.0.1:0 "),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        let message = parse("localhost:1883").expect_err("a host name");
        assert!(message.contains("an IP address is required"), "{message}");
        let message = parse("nowhere").expect_err("no port");
        assert!(message.contains("`nowhere` is not an IP:PORT"), "{message}");
    }
}
