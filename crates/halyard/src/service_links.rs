//! Kubernetes service links that share the `HALYARD_` prefix with the configuration.
//!
//! With `enableServiceLinks` at its default, Kubernetes gives every pod, for every Service of
//! its namespace, variables named after the Service. A Service called `halyard` yields
//! `HALYARD_SERVICE_HOST`, `HALYARD_SERVICE_PORT`, `HALYARD_SERVICE_PORT_<NAME>`,
//! `HALYARD_PORT` and `HALYARD_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`. They are not
//! configuration, so they are skipped, but only when both the name and the value have the
//! shape Kubernetes gives them: any other unknown `HALYARD_` variable (a typo) stays an error.

use std::net::{IpAddr, SocketAddr};

/// Whether `name` (without the `HALYARD_` prefix, upper case) and `value` are a variable
/// Kubernetes injects for a Service named `halyard`.
pub fn is_service_link(name: &str, value: &str) -> bool {
    let port = |text: &str| text.parse::<u16>().is_ok();
    let ip = |text: &str| text.parse::<IpAddr>().is_ok();
    match name {
        "SERVICE_HOST" => ip(value),
        "SERVICE_PORT" => port(value),
        "PORT" => is_url(value).is_some(),
        _ => {
            if let Some(port_name) = name.strip_prefix("SERVICE_PORT_") {
                return is_port_name(port_name) && port(value);
            }
            let Some(rest) = name.strip_prefix("PORT_") else {
                return false;
            };
            let mut parts = rest.splitn(3, '_');
            let (Some(number), Some(protocol)) = (parts.next(), parts.next()) else {
                return false;
            };
            if !port(number) || !["TCP", "UDP", "SCTP"].contains(&protocol) {
                return false;
            }
            match parts.next() {
                None => is_url(value).is_some_and(|(scheme, addr)| {
                    scheme.eq_ignore_ascii_case(protocol) && addr.port().to_string() == number
                }),
                Some("PROTO") => value.eq_ignore_ascii_case(protocol),
                Some("PORT") => value == number,
                Some("ADDR") => ip(value),
                Some(_) => false,
            }
        }
    }
}

/// `tcp://10.0.0.1:1883` as (`tcp`, address).
fn is_url(value: &str) -> Option<(&str, SocketAddr)> {
    let (scheme, addr) = value.split_once("://")?;
    Some((scheme, addr.parse().ok()?))
}

/// A Service port name as Kubernetes writes it into a variable: upper case, `-` as `_`.
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit() || byte == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_shapes_are_service_links() {
        for (name, value) in [
            ("SERVICE_HOST", "10.96.0.12"),
            ("SERVICE_PORT", "1883"),
            ("SERVICE_PORT_MQTT_WS", "8083"),
            ("PORT", "tcp://10.96.0.12:1883"),
            ("PORT_8083_TCP", "tcp://10.96.0.12:8083"),
            ("PORT_8083_TCP_PROTO", "tcp"),
            ("PORT_8083_TCP_PORT", "8083"),
            ("PORT_8083_TCP_ADDR", "10.96.0.12"),
            ("SERVICE_HOST", "fd00::12"),
        ] {
            assert!(is_service_link(name, value), "{name}={value}");
        }
    }

    #[test]
    fn other_names_and_values_are_not() {
        for (name, value) in [
            ("MAX_INFLGHT", "3"),
            ("SERVICE_HOST", "halyard.default.svc"),
            ("SERVICE_PORT", "mqtt"),
            ("PORT", "1883"),
            ("PORT_8083_TCP", "tcp://10.96.0.12:1883"),
            ("PORT_8083_TCP_PORT", "1883"),
            ("PORT_8083_HTTP_PROTO", "http"),
            ("PORT_8083_TCP_ADDRESS", "10.96.0.12"),
            ("SERVICE_PORT_mqtt", "1883"),
        ] {
            assert!(!is_service_link(name, value), "{name}={value}");
        }
    }
}
