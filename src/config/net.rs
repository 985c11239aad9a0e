//! Parsers for the network values of a policy file: CIDR blocks, listener
//! addresses, backend endpoint URLs, CORS origins and host names.
//!
//! They are plain functions from text to a value or an error message, kept
//! apart from the compiler so each rule is tested on its own. Host names are
//! checked for shape only (letters, digits, `-`, `.`); nothing is resolved at
//! compile time, since DNS may legitimately differ between the machine that
//! runs `floodwall check` and the one that serves traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::model::{Cidr, Endpoint, Scheme};

/// Parses `10.0.0.0/8`, `::1/128`, or a plain address (a /32 or /128).
/// Host bits below the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let bad = || {
        format!(
            "expected an IP address or a CIDR block such as 10.0.0.0/8 or fd00::/8, got `{text}`"
        )
    };
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p > max {
                return Err(format!(
                    "prefix /{p} is too long for {addr} (at most /{max})"
                ));
            }
            p
        }
    };
    Ok(Cidr {
        addr: mask(addr, prefix),
        prefix,
    })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(prefix);
            let m = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let bits = u32::from(prefix);
            let m = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

/// Checks a listener address: `0.0.0.0:8080`, `[::]:8080` or
/// `localhost:8080`. Port 0 is allowed (the OS picks a free port).
pub fn check_listen(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = |why: &str| {
        format!("expected `host:port` such as 0.0.0.0:8080 or [::]:8080, got `{text}` ({why})")
    };
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    if port.parse::<u16>().is_err() {
        return Err(bad("the port must be 0..=65535"));
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(bad("not a valid IPv6 address"));
    }
    check_hostname(host).map_err(|why| bad(&why))
}

/// Checks the shape of a DNS name or IP literal (no port, no scheme).
pub fn check_hostname(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".to_string());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.len() > 253 {
        return Err("the host name is longer than 253 characters".to_string());
    }
    for label in host.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("`{host}` is not a valid host name"));
        }
    }
    Ok(())
}

/// Parses a backend endpoint: `http://` or `https://`, a host, an optional
/// port (default 80/443) and no path beyond `/`.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let expected = "expected a URL such as https://api.openai.com or http://127.0.0.1:8000";
    let (scheme, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        return Err(format!(
            "{expected}, got `{text}` (the scheme must be http:// or https://)"
        ));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !path.is_empty() && path != "/" {
        return Err(format!(
            "`{text}` has a path, query or fragment (`{path}`); an endpoint is scheme://host[:port] only \
             (use a route's `rewrite` to change paths)"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{text}` contains user info (`user@`); put credentials in headers, not endpoints"
        ));
    }
    let default_port = match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let (host, port) =
        split_host_port(authority).map_err(|why| format!("{expected}, got `{text}` ({why})"))?;
    let port = port.unwrap_or(default_port);
    check_hostname(&host).map_err(|why| format!("{expected}, got `{text}` ({why})"))?;
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Endpoint {
        scheme,
        host,
        port,
        address,
        url: text.to_string(),
    })
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`; the host comes back
/// lower-case and without brackets.
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let parse_port = |p: &str| p.parse::<u16>().map_err(|_| format!("bad port `{p}`"));
    if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("unclosed `[`")?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| format!("`{v6}` is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':').ok_or("junk after `]`")?)?),
        };
        return Ok((v6.to_ascii_lowercase(), port));
    }
    match authority.split_once(':') {
        Some((host, port)) => Ok((host.to_ascii_lowercase(), Some(parse_port(port)?))),
        None => Ok((authority.to_ascii_lowercase(), None)),
    }
}

/// Checks a CORS origin: `*`, or `scheme://host[:port]` with no path and
/// no trailing slash (browsers send origins without one, so a trailing
/// slash would never match). Returns the origin lower-cased.
pub fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_string());
    }
    let expected = "expected `*` or an origin such as https://app.example.com";
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!("{expected}, got `{text}`"));
    };
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(format!("{expected}, got `{text}`"));
    }
    if rest.ends_with('/') {
        return Err(format!(
            "`{text}` ends with `/`; browsers send origins without a trailing slash, write `{}`",
            text.trim_end_matches('/')
        ));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!("{expected}, got `{text}` (an origin has no path)"));
    }
    let (host, _) =
        split_host_port(rest).map_err(|why| format!("{expected}, got `{text}` ({why})"))?;
    check_hostname(&host).map_err(|why| format!("{expected}, got `{text}` ({why})"))?;
    Ok(text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_and_plain_addresses() {
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert_eq!(c.prefix, 8);
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one = parse_cidr("192.168.1.7").unwrap();
        assert_eq!(one.prefix, 32);
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        let v6 = parse_cidr("::1").unwrap();
        assert_eq!(v6.prefix, 128);
        assert!(v6.contains("::1".parse().unwrap()));
        let net6 = parse_cidr("fd00::/8").unwrap();
        assert!(net6.contains("fd12::5".parse().unwrap()));
        // Host bits are cleared.
        assert_eq!(
            parse_cidr("10.1.2.3/8").unwrap().addr,
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        // IPv4-mapped IPv6 peers match IPv4 blocks.
        assert!(parse_cidr("127.0.0.0/8")
            .unwrap()
            .contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(parse_cidr("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn cidr_errors() {
        assert!(parse_cidr("10.0.0.0/33")
            .unwrap_err()
            .contains("at most /32"));
        assert!(parse_cidr("::/129").unwrap_err().contains("at most /128"));
        assert!(parse_cidr("10.0.0/8").is_err());
        assert!(parse_cidr("localhost").is_err());
        assert!(parse_cidr("10.0.0.0/x").is_err());
    }

    #[test]
    fn listen_addresses() {
        for ok in ["0.0.0.0:8080", "[::]:8080", "127.0.0.1:0", "localhost:9090"] {
            assert!(check_listen(ok).is_ok(), "{ok}");
        }
        for bad in [
            "8080",
            ":8080",
            "0.0.0.0:99999",
            "0.0.0.0",
            "::1:80",
            "bad host:80",
        ] {
            assert!(check_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        let e = parse_endpoint("https://api.openai.com").unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port, e.address.as_str()),
            (Scheme::Https, "api.openai.com", 443, "api.openai.com:443")
        );
        let e = parse_endpoint("http://127.0.0.1:8000/").unwrap();
        assert_eq!(
            (e.scheme, e.port, e.address.as_str()),
            (Scheme::Http, 8000, "127.0.0.1:8000")
        );
        let e = parse_endpoint("http://[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.address.as_str()), ("::1", "[::1]:9000"));
        assert_eq!(parse_endpoint("http://[::1]").unwrap().port, 80);
        assert!(parse_endpoint("https://api.openai.com/v1")
            .unwrap_err()
            .contains("has a path"));
        assert!(parse_endpoint("ftp://x").unwrap_err().contains("http://"));
        assert!(parse_endpoint("api.openai.com").is_err());
        assert!(parse_endpoint("http://").is_err());
        assert!(parse_endpoint("http://a:b@host")
            .unwrap_err()
            .contains("user info"));
        assert!(parse_endpoint("http://host:70000").is_err());
    }

    #[test]
    fn origins() {
        assert_eq!(parse_origin("*").unwrap(), "*");
        assert_eq!(
            parse_origin("https://App.Example.com").unwrap(),
            "https://app.example.com"
        );
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_origin("https://app.example.com/")
            .unwrap_err()
            .contains("trailing slash"));
        assert!(parse_origin("app.example.com").is_err());
        assert!(parse_origin("https://app.example.com/x").is_err());
    }
}
