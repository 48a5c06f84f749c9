//! The WebFetch tool: HTTP(S) with ureq (rustls, Mozilla's roots from webpki-roots).

use super::MAX_FETCH_BYTES;
use std::net::ToSocketAddrs;
use std::sync::mpsc;
use std::time::Duration;

/// The host and port of an http(s) URL.
fn authority(url: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("expected an http(s) URL, found {url:?}"))?;
    let default_port = if scheme == "https" { 443 } else { 80 };
    let auth = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let auth = auth.rsplit_once('@').map_or(auth, |(_, a)| a);
    if let Some(v6) = auth.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("malformed IPv6 host in {url:?}"))?;
        let port = tail.strip_prefix(':').map_or(Ok(default_port), str::parse);
        return Ok((
            h.to_owned(),
            port.map_err(|_| format!("bad port in {url:?}"))?,
        ));
    }
    match auth.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_owned(),
            p.parse().map_err(|_| format!("bad port in {url:?}"))?,
        )),
        None => Ok((auth.to_owned(), default_port)),
    }
}

/// Resolves the URL's host within `timeout` (getaddrinfo has no timeout of its own, so it
/// runs on a helper thread that is abandoned when late).
pub(super) fn resolve(url: &str, timeout: Duration) -> Result<(), String> {
    let (host, port) = authority(url)?;
    if host.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    let (tx, rx) = mpsc::channel();
    let name = host.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            (name.as_str(), port)
                .to_socket_addrs()
                .map(|mut a| a.next().is_some()),
        );
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(format!("{host} has no address")),
        Ok(Err(e)) => Err(format!(
            "offline or unknown host: cannot resolve {host}: {e}"
        )),
        Err(_) => Err(format!(
            "offline: resolving {host} took longer than {} s",
            timeout.as_secs()
        )),
    }
}

/// GET `url`; the body as (lossy) UTF-8 text.
pub(super) fn fetch(url: &str, timeout: Duration) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
        .http_status_as_error(false)
        .user_agent(concat!("tracefleet-follower/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_FETCH_BYTES)
        .read_to_vec()
        .map_err(|e| {
            format!("GET {url}: reading the body (at most {MAX_FETCH_BYTES} bytes): {e}")
        })?;
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn authority_of_urls() {
        assert_eq!(
            authority("https://example.org/x").unwrap(),
            ("example.org".into(), 443)
        );
        assert_eq!(
            authority("http://127.0.0.1:8080?q").unwrap(),
            ("127.0.0.1".into(), 8080)
        );
        assert_eq!(authority("http://u:p@h:81/").unwrap(), ("h".into(), 81));
        assert_eq!(authority("http://[::1]:9/").unwrap(), ("::1".into(), 9));
        assert!(authority("http://h:x/").is_err());
    }
}
