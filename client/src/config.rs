//! Which server, with which token: flags first (`--server`, `--token-file`), then the
//! environment (`CONSTRUIR_SERVER`, `CONSTRUIR_TOKEN`: the token itself). And the rule that keeps
//! the token off the network in the clear: `http://` only to this machine's loopback, unless the
//! user says `--insecure`.

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

/// The variable naming the server when `--server` is not given.
pub const SERVER_VAR: &str = "CONSTRUIR_SERVER";
/// The variable holding the token (the token itself) when `--token-file` is not given.
pub const TOKEN_VAR: &str = "CONSTRUIR_TOKEN";

/// Bad usage: a missing or malformed setting, a flag the request cannot take (exit 114).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A server's base URL, checked: `https://HOST[:PORT][/PREFIX]`, or `http://` to loopback (or
/// anywhere with `--insecure`). API paths are appended to [`ServerUrl::base`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Scheme, authority and prefix, without a trailing `/`.
    pub base: String,
    /// Whether the scheme is `https`.
    pub tls: bool,
}

/// Whether `host` (as written in a URL: brackets around IPv6) is this machine's loopback:
/// 127.0.0.0/8, ::1 (also IPv4-mapped), or the name `localhost`. Anything else, other spellings of
/// loopback addresses included (`127.1`, `2130706433`), is not: refusing those is the safe side.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|a| {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        });
    }
    host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// Checks a server URL and applies the `http://` rule.
pub fn parse_server(text: &str, insecure: bool) -> Result<ServerUrl, UsageError> {
    let bad = |why: &str| UsageError(format!("server {text:?} {why}"));
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("is not a URL (spaces or non-ASCII characters)"));
    }
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| bad("has no scheme (use https://HOST)"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => return Err(bad("is neither https:// nor http://")),
    };
    if rest.contains(['?', '#']) {
        return Err(bad("has a query or a fragment; give the server's base URL"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(bad(&format!(
            "holds credentials; give the token with --token-file or {TOKEN_VAR}"
        )));
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| bad("has an unclosed [IPv6]"))?;
        let (h, p) = authority.split_at(end + 1);
        if h[1..h.len() - 1].parse::<Ipv6Addr>().is_err() {
            return Err(bad("has a bad IPv6 address"));
        }
        (h, p)
    } else {
        authority.split_at(authority.find(':').unwrap_or(authority.len()))
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if let Some(port) = port.strip_prefix(':') {
        if !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(bad("has a bad port"));
        }
    } else if !port.is_empty() {
        return Err(bad("has garbage after the host"));
    }
    if !tls && !insecure && !is_loopback_host(host) {
        return Err(UsageError(format!(
            "server {text:?}: http:// would send the token in the clear; use https://, or http:// \
             only to this machine (127.0.0.1, [::1], localhost), or say --insecure"
        )));
    }
    Ok(ServerUrl {
        base: format!(
            "{}://{authority}{}",
            if tls { "https" } else { "http" },
            path
        )
        .trim_end_matches('/')
        .to_string(),
        tls,
    })
}

/// Checks a token: visible ASCII only (it goes in a header), at most 4 KiB.
pub fn check_token(token: &str, from: &str) -> Result<(), UsageError> {
    if token.is_empty() {
        return Err(UsageError(format!("the token from {from} is empty")));
    }
    if token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UsageError(format!(
            "the token from {from} is not a token (visible ASCII, at most 4 KiB)"
        )));
    }
    Ok(())
}

/// The settings a command connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerUrl,
    pub token: String,
}

/// The server and token: each from its flag if given, else from its variable (`env`, so tests
/// need not touch the process's environment); an empty variable counts as unset.
pub fn resolve(
    server_flag: Option<&str>,
    token_file: Option<&Path>,
    insecure: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, UsageError> {
    let var = |name| env(name).filter(|v: &String| !v.is_empty());
    let server = match server_flag {
        Some(s) => s.to_string(),
        None => var(SERVER_VAR).ok_or_else(|| {
            UsageError(format!("no server: give --server URL or set {SERVER_VAR}"))
        })?,
    };
    let server = parse_server(&server, insecure)?;
    let token = match token_file {
        Some(path) => {
            let from = path.display().to_string();
            let text = read_small(path)
                .map_err(|e| UsageError(format!("cannot read the token file {from}: {e}")))?;
            let token = text.trim().to_string();
            check_token(&token, &from)?;
            token
        }
        None => {
            let token = var(TOKEN_VAR).ok_or_else(|| {
                UsageError(format!(
                    "no token: give --token-file FILE or set {TOKEN_VAR} (the token itself)"
                ))
            })?;
            let token = token.trim().to_string();
            check_token(&token, TOKEN_VAR)?;
            token
        }
    };
    Ok(Config { server, token })
}

/// A file of at most 64 KiB, as text: a token file that is something else (a device, a huge
/// file) is refused rather than read whole.
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(64 << 10)
        .read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_goes_only_to_loopback_unless_insecure() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.3.4.5",
            "http://localhost:1/",
            "http://LOCALHOST",
            "http://[::1]:8080/prefix/",
            "http://[::ffff:127.0.0.1]",
            "https://build.example.org",
            "https://203.0.113.7:8443/construir",
            "HTTPS://build.example.org",
        ] {
            parse_server(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for refused in [
            "http://build.example.org",
            "http://10.0.0.1:8080",
            "http://[2001:db8::1]",
            "http://127.1",
            "http://2130706433",
            "http://localhost.example.org",
            "http://0.0.0.0",
        ] {
            let e = parse_server(refused, false).unwrap_err();
            assert!(e.0.contains("--insecure"), "{refused}: {e}");
            parse_server(refused, true).unwrap_or_else(|e| panic!("{refused}: {e}"));
        }
    }

    #[test]
    fn server_urls_are_checked_and_normalised() {
        let url = parse_server("https://b.example.org/api-root/", false).unwrap();
        assert_eq!(url.base, "https://b.example.org/api-root");
        assert!(url.tls);
        assert_eq!(
            parse_server("http://127.0.0.1:8080", false).unwrap().base,
            "http://127.0.0.1:8080"
        );
        for bad in [
            "",
            "build.example.org",
            "ftp://b.example.org",
            "https://",
            "https://:80",
            "https://user:pw@b.example.org",
            "https://b.example.org:0",
            "https://b.example.org:99999",
            "https://b.example.org:8a",
            "https://b.example.org/?x=1",
            "https://b.example.org/#x",
            "https://[::1",
            "https://[zz]",
            "https://b.example.org x",
            "https://bü.example.org",
        ] {
            assert!(parse_server(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_win_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let env = |name: &str| match name {
            SERVER_VAR => Some("https://env.example.org".to_string()),
            TOKEN_VAR => Some("from-env".to_string()),
            _ => None,
        };
        let c = resolve(None, None, false, &env).unwrap();
        assert_eq!(
            (c.server.base.as_str(), c.token.as_str()),
            ("https://env.example.org", "from-env")
        );
        let c = resolve(Some("https://flag.example.org"), Some(&file), false, &env).unwrap();
        assert_eq!(
            (c.server.base.as_str(), c.token.as_str()),
            ("https://flag.example.org", "from-file")
        );
        // Nothing given: both are asked for by name; an empty variable is no setting.
        let none = |_: &str| Some(String::new());
        let e = resolve(None, None, false, &none).unwrap_err();
        assert!(e.0.contains("--server") && e.0.contains(SERVER_VAR), "{e}");
        let e = resolve(Some("http://[::1]:9"), None, false, &none).unwrap_err();
        assert!(
            e.0.contains("--token-file") && e.0.contains(TOKEN_VAR),
            "{e}"
        );
        // A bad token, a missing file.
        std::fs::write(&file, "two words").unwrap();
        assert!(resolve(Some("http://[::1]:9"), Some(&file), false, &none).is_err());
        let missing = dir.path().join("missing");
        let e = resolve(Some("http://[::1]:9"), Some(&missing), false, &env).unwrap_err();
        assert!(e.0.contains("cannot read the token file"), "{e}");
        // The rule applies to a server from the environment too.
        let plain = |name: &str| (name == SERVER_VAR).then(|| "http://b.example.org".to_string());
        assert!(
            resolve(None, Some(&file), false, &plain)
                .unwrap_err()
                .0
                .contains("http://")
        );
    }
}
