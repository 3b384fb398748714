//! A cap on the long polls one token holds open (a runner's claims, a client's `logs --follow`):
//! each open poll holds a [`PollGuard`] counted under its token's digest; past the cap the
//! request is refused at once with 429 `too-many-requests`, so one token cannot hold a
//! thousand requests (and their connections and tasks) open on its own.
//!
//! [`Polls`] lives in the router as an [`axum::Extension`]; a handler takes a slot by asking for
//! the [`LongPoll`] extractor after its `Caller` (so the token is known good first) and holds it
//! while it waits.

use crate::http::Refusal;
use crate::service::Shared;
use crate::tokens;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use construir_api::codes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The default cap of open long polls per token.
pub const DEFAULT_MAX_PER_TOKEN: usize = 64;

/// Open long polls by token digest.
#[derive(Debug)]
pub struct Polls {
    max_per_token: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl Polls {
    /// A registry allowing `max_per_token` open polls per token (at least one).
    pub fn new(max_per_token: usize) -> Arc<Self> {
        Arc::new(Polls {
            max_per_token: max_per_token.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn max_per_token(&self) -> usize {
        self.max_per_token
    }

    /// Takes a slot for the token whose digest is `key`, or refuses (429) when it holds its cap.
    pub fn enter(self: &Arc<Self>, key: &str) -> Result<PollGuard, Refusal> {
        let mut open = self.open.lock().expect("polls lock");
        let n = open.entry(key.to_string()).or_insert(0);
        if *n >= self.max_per_token {
            return Err(Refusal::new(
                codes::TOO_MANY_REQUESTS,
                format!(
                    "this token holds {} long polls open already, the most this server allows; \
                     wait for one to end",
                    self.max_per_token
                ),
            ));
        }
        *n += 1;
        Ok(PollGuard {
            polls: self.clone(),
            key: key.to_string(),
        })
    }

    /// The polls open under `key`.
    pub fn open(&self, key: &str) -> usize {
        self.open
            .lock()
            .expect("polls lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// How many tokens hold a poll open (entries are dropped with their last poll).
    pub fn tokens(&self) -> usize {
        self.open.lock().expect("polls lock").len()
    }
}

/// One open long poll; the slot is given back when dropped.
#[derive(Debug)]
pub struct PollGuard {
    polls: Arc<Polls>,
    key: String,
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        let mut open = self.polls.open.lock().expect("polls lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// An extractor holding a long-poll slot of the request's bearer token for as long as the
/// handler runs. Put it after `Caller`, so only a known token's polls are counted.
#[derive(Debug)]
pub struct LongPoll(pub PollGuard);

impl FromRequestParts<Shared> for LongPoll {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _app: &Shared) -> Result<Self, Self::Rejection> {
        let polls = parts
            .extensions
            .get::<Arc<Polls>>()
            .cloned()
            .ok_or_else(|| {
                tracing::error!("the router has no poll registry");
                Refusal::new(codes::INTERNAL, "the server is misconfigured")
            })?;
        // The handler's Caller checks the token itself; a malformed one is refused there.
        let token = tokens::bearer(&parts.headers).ok_or_else(|| {
            Refusal::new(
                codes::UNAUTHORIZED,
                "no Authorization header (Authorization: Bearer TOKEN)",
            )
        })?;
        Ok(LongPoll(polls.enter(&tokens::digest(token))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_at_most_its_cap_and_slots_come_back_when_dropped() {
        let polls = Polls::new(2);
        let a1 = polls.enter("a").unwrap();
        let _a2 = polls.enter("a").unwrap();
        let refused = polls.enter("a").unwrap_err();
        assert_eq!(refused.0.error, codes::TOO_MANY_REQUESTS);
        assert_eq!(refused.0.http_status(), 429);
        assert!(refused.0.message.contains('2'), "{}", refused.0.message);
        // Another token is not held back by this one.
        let b = polls.enter("b").unwrap();
        assert_eq!((polls.open("a"), polls.open("b")), (2, 1));
        drop(a1);
        assert_eq!(polls.open("a"), 1);
        let _a3 = polls.enter("a").expect("a slot came back");
        drop(b);
        assert_eq!(polls.open("b"), 0);
        assert_eq!(
            polls.tokens(),
            1,
            "a token with no poll open leaves no entry"
        );
        assert_eq!(Polls::new(0).max_per_token(), 1);
    }

    #[test]
    fn slots_are_counted_right_across_threads() {
        let polls = Polls::new(1000);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let _g = polls.enter("t").unwrap();
                    }
                });
            }
        });
        assert_eq!(polls.open("t"), 0);
        assert_eq!(polls.tokens(), 0);
    }

    #[tokio::test]
    async fn the_extractor_counts_the_bearer_token_and_refuses_past_the_cap() {
        let (_d, app) = crate::http::tests::test_app().await;
        let polls = Polls::new(1);
        let token = tokens::generate().unwrap();
        let parts = || {
            let (mut parts, ()) = axum::http::Request::get("/")
                .header("Authorization", format!("Bearer {token}"))
                .body(())
                .unwrap()
                .into_parts();
            parts.extensions.insert(polls.clone());
            parts
        };
        let held = LongPoll::from_request_parts(&mut parts(), &app)
            .await
            .unwrap();
        assert_eq!(polls.open(&tokens::digest(&token)), 1);
        let e = LongPoll::from_request_parts(&mut parts(), &app)
            .await
            .unwrap_err();
        assert_eq!(e.0.error, codes::TOO_MANY_REQUESTS);
        drop(held);
        LongPoll::from_request_parts(&mut parts(), &app)
            .await
            .expect("free again");
    }
}
