//! Who is looking at a page: the session behind the `construir_session` cookie (HttpOnly,
//! SameSite=Lax, Secure behind https; only its token's SHA-256 is stored), and the CSRF rules
//! every form obeys.
//!
//! A signed-in form carries its session's CSRF token (the synchronizer pattern: the token lives
//! in the session's row). A form shown to someone not signed in (sign-in, sign-up) carries the
//! value of a `construir_csrf` cookie (HttpOnly, SameSite=Strict) set with the page: a post must
//! bring both, equal (double submit). Every post must also come from this site: an `Origin`
//! header, when the browser sends one, must be the server's own.

use super::{Chrome, WebError};
use crate::access::Viewer;
use crate::accounts::{SESSION_TTL_MS, Session};
use crate::service::Shared;
use crate::tokens;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use construir_api::types::UserId;
use sha2::{Digest, Sha256};

pub const SESSION_COOKIE: &str = "construir_session";
pub const CSRF_COOKIE: &str = "construir_csrf";

/// A form that carries nothing but its CSRF token (cancel, revoke, sign out).
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// The visitor of a page.
pub struct Visitor {
    pub session: Option<Session>,
    /// The `construir_csrf` cookie's value, if the browser sent one.
    pub anonymous_csrf: Option<String>,
    /// The CSRF token made for this visit when there was none (its cookie goes with the
    /// answer: [`Visitor::jar`]).
    fresh_csrf: Option<String>,
    base: String,
    secure: bool,
    open_signup: bool,
    /// The server's own origin (`http://127.0.0.1:8080`), for the Origin check.
    origin: String,
    /// The origin the request says it was sent to (`http://` + its Host header).
    host_origin: Option<String>,
}

impl FromRequestParts<Shared> for Visitor {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let session = match jar.get(SESSION_COOKIE) {
            Some(c) => app
                .db
                .session(&tokens::digest(c.value()))
                .await
                .map_err(|e| WebError::from_refusal(e.into(), &Chrome::default()))?,
            None => None,
        };
        let anonymous_csrf = jar
            .get(CSRF_COOKIE)
            .map(|c| c.value().to_string())
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
        let fresh_csrf = match (&session, &anonymous_csrf) {
            (None, None) => Some(tokens::random_hex(32).map_err(|e| {
                WebError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                    &Chrome::default(),
                )
            })?),
            _ => None,
        };
        let settings = &app.settings;
        let origin = settings
            .public_url
            .split_once("://")
            .map(|(scheme, rest)| {
                let host = rest.split('/').next().unwrap_or(rest);
                format!("{scheme}://{host}")
            })
            .unwrap_or_default();
        let host_origin = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| {
                let scheme = if settings.secure_cookies() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{h}")
            });
        Ok(Visitor {
            session,
            anonymous_csrf,
            fresh_csrf,
            base: settings.base_path().to_string(),
            secure: settings.secure_cookies(),
            open_signup: settings.open_signup,
            origin,
            host_origin,
        })
    }
}

impl Visitor {
    /// Who this is, for [`crate::access`].
    pub fn viewer(&self) -> Viewer {
        match &self.session {
            Some(s) => Viewer {
                user: Some(UserId(s.user_id as u64)),
                admin: s.is_admin(),
            },
            None => Viewer::ANONYMOUS,
        }
    }

    /// The token this visit's forms carry.
    pub fn csrf(&self) -> String {
        match &self.session {
            Some(s) => s.csrf.clone(),
            None => self
                .anonymous_csrf
                .clone()
                .or_else(|| self.fresh_csrf.clone())
                .unwrap_or_default(),
        }
    }

    pub fn chrome(&self, title: impl Into<String>) -> Chrome {
        Chrome {
            title: title.into(),
            base: self.base.clone(),
            user: self.session.as_ref().map(|s| s.user.clone()),
            admin: self.session.as_ref().is_some_and(Session::is_admin),
            csrf: self.csrf(),
            open_signup: self.open_signup,
        }
    }

    /// A link inside the site (`/jobs/3` under its base path).
    pub fn link(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The cookies that go with the answer: the CSRF cookie made for this visit, if one was.
    pub fn jar(&self) -> CookieJar {
        let jar = CookieJar::new();
        match &self.fresh_csrf {
            Some(v) => jar.add(self.cookie(CSRF_COOKIE, v.clone(), SameSite::Strict, None)),
            None => jar,
        }
    }

    /// A cookie of this site: HttpOnly, on its whole path, Secure behind https.
    pub fn cookie(
        &self,
        name: &'static str,
        value: String,
        same_site: SameSite,
        max_age_ms: Option<i64>,
    ) -> Cookie<'static> {
        let mut c = Cookie::new(name, value);
        c.set_http_only(true);
        c.set_same_site(same_site);
        c.set_secure(self.secure);
        c.set_path(if self.base.is_empty() {
            "/".to_string()
        } else {
            self.base.clone()
        });
        if let Some(ms) = max_age_ms {
            c.set_max_age(cookie_duration(ms));
        }
        c
    }

    /// The session cookie for a session just opened.
    pub fn session_cookie(&self, token: String) -> Cookie<'static> {
        self.cookie(SESSION_COOKIE, token, SameSite::Lax, Some(SESSION_TTL_MS))
    }

    /// Refuses a form post that is not this site's: a foreign `Origin`, or a CSRF token that is
    /// not this visit's (see the module's rules).
    pub fn check_form(&self, headers: &HeaderMap, token: &str) -> Result<(), WebError> {
        self.check_origin(headers)?;
        self.check_token(token)
    }

    /// Refuses a post whose `Origin` (when the browser sends one) is another site's.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), WebError> {
        let chrome = self.chrome("Refused");
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let ours = origin == self.origin || Some(origin) == self.host_origin.as_deref();
            if !ours {
                return Err(WebError::new(
                    StatusCode::FORBIDDEN,
                    "this form was sent from another site",
                    &chrome,
                ));
            }
        }
        Ok(())
    }

    /// Refuses a form whose CSRF token is not this visit's.
    pub fn check_token(&self, token: &str) -> Result<(), WebError> {
        let chrome = self.chrome("Refused");
        let expected = match (&self.session, &self.anonymous_csrf) {
            (Some(s), _) => Some(s.csrf.as_str()),
            (None, Some(c)) => Some(c.as_str()),
            (None, None) => None,
        };
        match expected {
            Some(e) if same(e, token) => Ok(()),
            _ => Err(WebError::new(
                StatusCode::FORBIDDEN,
                "this form's security token is missing or out of date: load the page again and \
                 send it from there",
                &chrome,
            )),
        }
    }

    /// The signed-in session, or a 401 page saying to sign in.
    pub fn signed_in(&self) -> Result<&Session, WebError> {
        self.session.as_ref().ok_or_else(|| {
            WebError::new(
                StatusCode::UNAUTHORIZED,
                "sign in to do this",
                &self.chrome("Sign in"),
            )
        })
    }
}

/// Whether two tokens are equal, compared as digests (no timing tells how much of a guess was
/// right).
fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

fn cookie_duration(ms: i64) -> cookie::time::Duration {
    cookie::time::Duration::seconds(ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_never_empty() {
        assert!(same("ab12", "ab12"));
        assert!(!same("ab12", "ab13"));
        assert!(!same("ab12", "ab1"));
        assert!(!same("", ""));
    }
}
