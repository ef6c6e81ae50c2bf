//! Connecting to a peer named `host:port`, where the host may be a DNS name.
//!
//! On Kubernetes the peers are the StatefulSet's pod names through a headless Service: pods
//! start in parallel and a pod's record appears only once the pod exists, and a pod that is
//! rescheduled comes back under the same name with a new IP. So nothing is resolved once at
//! start: every connection attempt asks the system resolver again, and a name that does not
//! resolve yet is reported as unreachable, which the callers retry with their backoff.

use std::io;

use tokio::net::{lookup_host, TcpStream};

/// Resolves `addr` now and connects to the first of its addresses that accepts.
pub(crate) async fn connect(addr: &str) -> io::Result<TcpStream> {
    let resolved: Vec<_> = lookup_host(addr)
        .await
        .map_err(|error| unresolved(addr, &error.to_string()))?
        .collect();
    let mut last_error = unresolved(addr, "no addresses");
    for candidate in resolved {
        match TcpStream::connect(candidate).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// Whether `addr` has the `host:port` shape a peer needs (`[v6]:port` for IPv6 literals).
pub(crate) fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
    {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains(':'),
    };
    host_ok && port.parse::<u16>().is_ok_and(|port| port != 0)
}

/// A name that does not resolve (yet): unreachable, so callers back off and retry.
fn unresolved(addr: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("cannot resolve peer {addr} (yet): {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_host_and_port() {
        for good in [
            "127.0.0.1:7000",
            "[::1]:7000",
            "halyard-0.halyard-peers:7000",
            "localhost:1",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "halyard-0",
            ":7000",
            "host:",
            "host:0",
            "host:70000",
            "::1:7000",
            "[]:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_an_unknown_one_is_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stream = connect(&format!("localhost:{port}")).await;
        // localhost may resolve to ::1 first; the loop must still reach 127.0.0.1.
        assert!(stream.is_ok(), "{stream:?}");
        let error = connect("no-such-peer.invalid:7000")
            .await
            .expect_err("an .invalid name never resolves");
        assert_eq!(error.kind(), io::ErrorKind::NotConnected, "{error}");
        assert!(
            error.to_string().contains("no-such-peer.invalid"),
            "{error}"
        );
    }
}
