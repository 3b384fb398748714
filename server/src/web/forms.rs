//! Accounts on the website: `/signin` (a name and password, or an API token), `/signup` (when
//! the server allows it, rate-limited), `/signout`, and `/tokens` (a user's API tokens: made,
//! shown once, revoked).

use super::limits::{Limiter, Peer};
use super::session::{CsrfForm, SESSION_COOKIE, Visitor};
use super::{Chrome, WebError, render, utc};
use crate::accounts::{self, MAX_PASSWORD, MIN_PASSWORD};
use crate::service::Shared;
use crate::tokens;
use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::SameSite;
use std::sync::LazyLock;

/// Sign-in tries: 20 a minute from one address (an IPv6 /64); no cap for everybody (that would
/// let a few addresses lock everyone out): argon2's turns bound the work
/// ([`accounts::HASHING`]).
static SIGN_INS: LazyLock<Limiter> = LazyLock::new(|| Limiter::new(20, u32::MAX, 60_000));
/// Accounts made: 5 an hour from one address, 100 from all.
static SIGN_UPS: LazyLock<Limiter> = LazyLock::new(|| Limiter::new(5, 100, 3_600_000));

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/signin", get(signin_page).post(signin))
        .route("/signup", get(signup_page).post(signup))
        .route("/signout", post(signout))
        .route("/tokens", get(tokens_page).post(make_token))
        .route("/tokens/{id}/revoke", post(revoke_token))
}

#[derive(Template)]
#[template(path = "signin.html")]
struct SignInPage {
    chrome: Chrome,
    name: String,
    problem: String,
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignUpPage {
    chrome: Chrome,
    name: String,
    problem: String,
    min: usize,
    max: usize,
}

fn page_with(visitor: &Visitor, status: StatusCode, page: Response) -> Response {
    let mut r = (visitor.jar(), page).into_response();
    *r.status_mut() = status;
    r
}

async fn signin_page(visitor: Visitor) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Sign in");
    let page = SignInPage {
        chrome: chrome.clone(),
        name: String::new(),
        problem: String::new(),
    };
    Ok(page_with(&visitor, StatusCode::OK, render(&page, &chrome)?))
}

#[derive(serde::Deserialize)]
struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    token: String,
}

async fn signin(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Peer(peer): Peer,
    Form(form): Form<SignInForm>,
) -> Result<Response, WebError> {
    visitor.check_form(&headers, &form.csrf)?;
    let chrome = visitor.chrome("Sign in");
    let again = |problem: &str, status: StatusCode| -> Result<Response, WebError> {
        let page = SignInPage {
            chrome: chrome.clone(),
            name: form.name.chars().take(64).collect(),
            problem: problem.to_string(),
        };
        Ok(page_with(&visitor, status, render(&page, &chrome)?))
    };
    if !SIGN_INS.allow(peer, crate::db::now_ms() as u64) {
        return again(
            "too many sign-in tries from your address: wait a minute",
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    let fail = |e: crate::db::DbError| WebError::from_refusal(e.into(), &chrome);
    let opened = if !form.token.trim().is_empty() {
        match app
            .db
            .identify(&tokens::digest(form.token.trim()))
            .await
            .map_err(fail)?
        {
            Some(who) if who.role == "runner" => {
                return again(
                    "that is a runner's token: sign in with a submitter's or an admin's",
                    StatusCode::UNAUTHORIZED,
                );
            }
            Some(who) => Some((who.user_id, who.role, Some(who.token_id))),
            None => None,
        }
    } else {
        let account = app.db.account(form.name.trim()).await.map_err(fail)?;
        let phc = account
            .as_ref()
            .and_then(|a| a.password_hash.clone())
            .unwrap_or_else(|| accounts::decoy_hash().to_string());
        let password = form.password.clone();
        // The same work whether or not the name is someone's.
        let _turn = accounts::HASHING.acquire().await.map_err(|_| {
            WebError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping",
                &chrome,
            )
        })?;
        let matches =
            tokio::task::spawn_blocking(move || accounts::password_matches(&password, &phc))
                .await
                .unwrap_or(false);
        match account {
            Some(a) if matches && !a.banned && a.password_hash.is_some() => {
                let role = if a.admin { "admin" } else { "submitter" };
                Some((a.id, role.to_string(), None))
            }
            _ => None,
        }
    };
    let Some((user_id, role, token_id)) = opened else {
        return again(
            "that name and password (or token) do not match an account",
            StatusCode::UNAUTHORIZED,
        );
    };
    let (cookie, _csrf) = app
        .db
        .open_session(user_id, &role, token_id)
        .await
        .map_err(fail)?;
    tracing::info!("user {user_id} signed in on the website as {role}");
    let jar = visitor.jar().add(visitor.session_cookie(cookie));
    Ok((jar, Redirect::to(&visitor.link("/jobs"))).into_response())
}

async fn signup_page(visitor: Visitor) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Sign up");
    if !chrome.open_signup {
        return Err(closed(&chrome));
    }
    let page = SignUpPage {
        chrome: chrome.clone(),
        name: String::new(),
        problem: String::new(),
        min: MIN_PASSWORD,
        max: MAX_PASSWORD,
    };
    Ok(page_with(&visitor, StatusCode::OK, render(&page, &chrome)?))
}

fn closed(chrome: &Chrome) -> WebError {
    WebError::new(
        StatusCode::NOT_FOUND,
        "this server does not take sign-ups: ask its operator for an account",
        chrome,
    )
}

#[derive(serde::Deserialize)]
struct SignUpForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    again: String,
}

async fn signup(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Peer(peer): Peer,
    Form(form): Form<SignUpForm>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Sign up");
    if !chrome.open_signup {
        return Err(closed(&chrome));
    }
    visitor.check_form(&headers, &form.csrf)?;
    let name = form.name.trim().to_string();
    let again = |problem: String, status: StatusCode| -> Result<Response, WebError> {
        let page = SignUpPage {
            chrome: chrome.clone(),
            name: name.chars().take(64).collect(),
            problem,
            min: MIN_PASSWORD,
            max: MAX_PASSWORD,
        };
        Ok(page_with(&visitor, status, render(&page, &chrome)?))
    };
    if let Err(e) = crate::db::valid_user_name(&name) {
        return again(e.to_string(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    if form.password != form.again {
        return again(
            "the two passwords differ".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    if !SIGN_UPS.allow(peer, crate::db::now_ms() as u64) {
        return again(
            "too many accounts made from your address: try again in an hour".into(),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    let password = form.password.clone();
    let _turn = accounts::HASHING.acquire().await.map_err(|_| {
        WebError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping",
            &chrome,
        )
    })?;
    let hashed = tokio::task::spawn_blocking(move || accounts::hash_password(&password))
        .await
        .map_err(|e| WebError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), &chrome))?;
    let phc = match hashed {
        Ok(h) => h,
        Err(e) => return again(e.to_string(), StatusCode::UNPROCESSABLE_ENTITY),
    };
    let fail = |e: crate::db::DbError| WebError::from_refusal(e.into(), &chrome);
    let Some(user_id) = app.db.sign_up(&name, &phc).await.map_err(fail)? else {
        return again(format!("the name {name} is taken"), StatusCode::CONFLICT);
    };
    let (cookie, _) = app
        .db
        .open_session(user_id, "submitter", None)
        .await
        .map_err(fail)?;
    tracing::info!("user {name} ({user_id}) signed up on the website");
    let jar = visitor.jar().add(visitor.session_cookie(cookie));
    Ok((jar, Redirect::to(&visitor.link("/jobs"))).into_response())
}

async fn signout(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    visitor.check_form(&headers, &form.csrf)?;
    let chrome = visitor.chrome("Sign out");
    if let Some(s) = &visitor.session {
        app.db
            .close_session(s.id)
            .await
            .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    }
    let gone = visitor.cookie(SESSION_COOKIE, String::new(), SameSite::Lax, Some(0));
    Ok((
        visitor.jar().add(gone),
        Redirect::to(&visitor.link("/jobs")),
    )
        .into_response())
}

/// A token as `/tokens` lists it.
pub struct TokenRow {
    pub id: i64,
    pub role: String,
    pub created: String,
    pub revoked: String,
}

#[derive(Template)]
#[template(path = "tokens.html")]
struct TokensPage {
    chrome: Chrome,
    tokens: Vec<TokenRow>,
    /// A token just made: shown this once.
    made: Option<(String, String)>,
    roles: Vec<&'static str>,
}

async fn tokens_list(
    app: &Shared,
    user_id: i64,
    chrome: &Chrome,
) -> Result<Vec<TokenRow>, WebError> {
    let list = app
        .db
        .tokens_of(user_id)
        .await
        .map_err(|e| WebError::from_refusal(e.into(), chrome))?;
    Ok(list
        .into_iter()
        .map(|(id, role, created, revoked)| TokenRow {
            id,
            role,
            created: utc(created as u64),
            revoked: revoked.map(|t| utc(t as u64)).unwrap_or_default(),
        })
        .collect())
}

fn roles_for(visitor: &Visitor) -> Vec<&'static str> {
    if visitor.chrome("").admin {
        vec!["submitter", "runner", "admin"]
    } else {
        vec!["submitter", "runner"]
    }
}

async fn tokens_page(State(app): State<Shared>, visitor: Visitor) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Tokens");
    let session = visitor.signed_in()?;
    let page = TokensPage {
        tokens: tokens_list(&app, session.user_id, &chrome).await?,
        made: None,
        roles: roles_for(&visitor),
        chrome: chrome.clone(),
    };
    render(&page, &chrome)
}

#[derive(serde::Deserialize)]
struct MakeToken {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    role: String,
}

async fn make_token(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Form(form): Form<MakeToken>,
) -> Result<Response, WebError> {
    visitor.check_form(&headers, &form.csrf)?;
    let chrome = visitor.chrome("Tokens");
    let session = visitor.signed_in()?;
    let roles = roles_for(&visitor);
    let Some(role) = roles.iter().find(|r| **r == form.role) else {
        return Err(WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("a token's role is one of {}", roles.join(", ")),
            &chrome,
        ));
    };
    let token = tokens::generate()
        .map_err(|e| WebError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), &chrome))?;
    app.db
        .add_token(session.user_id, role, &tokens::digest(&token))
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    tracing::info!("user {} made a {role} token on the website", session.user);
    let page = TokensPage {
        tokens: tokens_list(&app, session.user_id, &chrome).await?,
        made: Some((role.to_string(), token)),
        roles,
        chrome: chrome.clone(),
    };
    let mut r = render(&page, &chrome)?;
    // A page holding a secret is not kept by the browser's cache.
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

async fn revoke_token(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    visitor.check_form(&headers, &form.csrf)?;
    let chrome = visitor.chrome("Tokens");
    let session = visitor.signed_in()?;
    let done = app
        .db
        .revoke_token_of(session.user_id, id)
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    if !done {
        return Err(WebError::new(
            StatusCode::NOT_FOUND,
            format!("you have no live token {id}"),
            &chrome,
        ));
    }
    tracing::info!("user {} revoked token {id} on the website", session.user);
    Ok(Redirect::to(&visitor.link("/tokens")).into_response())
}
