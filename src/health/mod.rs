//! `switchyard health`: one GET of a role's admin `/healthz` (or `/readyz`),
//! so that a container's health check needs no HTTP client in the image.

pub mod cli;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Where to probe: a role's `--admin-listen` as given. An unspecified
/// address (`0.0.0.0`, `[::]`) means "every interface", which is reached on
/// loopback, so the same value serves the role and its health check.
pub fn probe_addr(admin: SocketAddr) -> SocketAddr {
    match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, admin.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, admin.port()).into(),
        _ => admin,
    }
}

/// The URL of the check.
pub fn url(admin: SocketAddr, ready: bool) -> String {
    let path = if ready { "/readyz" } else { "/healthz" };
    format!("http://{}{path}", probe_addr(admin))
}

/// GETs `url`: `Ok` with the status on a 2xx, else why not, in one line
/// (with the start of the body, which says why a role is not ready).
/// No proxy (a proxy set in the environment must not answer for the role)
/// and no redirect (the admin port never redirects; following one would
/// check something else).
pub async fn check(url: &str, timeout: Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = client.get(url).send().await.map_err(|e| {
        // reqwest's top-level message is generic ("error sending request"):
        // the innermost cause says what happened (connection refused, timeout).
        let mut cause: &dyn std::error::Error = &e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        if e.is_timeout() {
            format!("{url}: no answer within {timeout:?}")
        } else {
            format!("{url}: {cause}")
        }
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(status.to_string());
    }
    // Cap what is shown so a wrong port serving something large does not
    // flood the log; one line, as a health check's output is shown whole.
    let body = response.text().await.unwrap_or_default();
    let shown: String = body
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    Err(format!("{url}: {status}: {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_probed_on_loopback() {
        let p = |s: &str| url(s.parse().unwrap(), false);
        assert_eq!(p("0.0.0.0:9096"), "http://127.0.0.1:9096/healthz");
        assert_eq!(p("[::]:9090"), "http://[::1]:9090/healthz");
        assert_eq!(p("10.1.2.3:9091"), "http://10.1.2.3:9091/healthz");
        assert_eq!(
            url("127.0.0.1:9095".parse().unwrap(), true),
            "http://127.0.0.1:9095/readyz"
        );
    }
}
