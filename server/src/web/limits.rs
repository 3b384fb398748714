//! How often one address may try to sign in or make an account: a count per address (and one
//! for everybody) over a fixed window, in memory (a restart forgets it, as a guess costs an
//! argon2 hash anyway).

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use std::net::SocketAddr;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// A fixed-window limit: at most `per_key` tries from one address and `overall` from all in
/// each window of `window_ms`.
pub struct Limiter {
    per_key: u32,
    overall: u32,
    window_ms: u64,
    state: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    started_ms: u64,
    total: u32,
    by_key: HashMap<IpAddr, u32>,
}

impl Limiter {
    pub fn new(per_key: u32, overall: u32, window_ms: u64) -> Self {
        Limiter {
            per_key,
            overall,
            window_ms,
            state: Mutex::new(Window::default()),
        }
    }

    /// Counts a try from `key` at `now_ms`; false (not counted) when it is past a limit. An
    /// address counts as its IPv4 address (an IPv4-mapped one too) or its IPv6 /64: one
    /// subscriber's share.
    pub fn allow(&self, key: Option<IpAddr>, now_ms: u64) -> bool {
        let key = key.map(subscriber);
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms >= w.started_ms.saturating_add(self.window_ms) {
            *w = Window {
                started_ms: now_ms,
                ..Window::default()
            };
        }
        if w.total >= self.overall {
            return false;
        }
        if let Some(k) = key {
            let n = w.by_key.entry(k).or_default();
            if *n >= self.per_key {
                return false;
            }
            *n += 1;
        }
        w.total += 1;
        true
    }
}

/// What an address counts as: IPv4 as itself (an IPv4-mapped IPv6 one too), IPv6 by its /64.
pub fn subscriber(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The address a request came from, when the server knows it (the connection's peer; behind
/// a reverse proxy on this host, the proxy's).
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| a.ip()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_and_everybody_are_limited_per_window() {
        let l = Limiter::new(2, 3, 1000);
        let (a, b, c) = (
            Some(IpAddr::from([10, 0, 0, 1])),
            Some(IpAddr::from([10, 0, 0, 2])),
            Some(IpAddr::from([10, 0, 0, 3])),
        );
        assert!(l.allow(a, 0) && l.allow(a, 1));
        assert!(!l.allow(a, 2), "a's third");
        assert!(l.allow(b, 3));
        assert!(!l.allow(c, 4), "everybody's fourth");
        // A new window forgets.
        assert!(l.allow(a, 1000) && l.allow(c, 1001));
        // One /64 is one address; an IPv4-mapped address is its IPv4 one.
        let l = Limiter::new(1, 100, 1000);
        let v6 = |last: u16| {
            Some(IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 1, 2, 0, 0, 0, last,
            )))
        };
        assert!(l.allow(v6(1), 0) && !l.allow(v6(2), 0));
        let mapped = Some(IpAddr::V6(
            std::net::Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped(),
        ));
        assert!(l.allow(Some(IpAddr::from([10, 0, 0, 9])), 0) && !l.allow(mapped, 0));
    }
}
