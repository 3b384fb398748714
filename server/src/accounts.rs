//! Accounts as the storage knows them beyond names and tokens: passwords (argon2id, for people
//! signing in to the website; API tokens stay SHA-256, see [`crate::tokens`]), admins, bans,
//! and web sessions (a random cookie token, kept only as its SHA-256, each with a CSRF token).

use crate::db::{Db, DbError, now_ms};
use crate::tokens;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sqlx::Row;

/// The shortest and longest passwords taken (the longest only bounds the work one request
/// asks of argon2).
pub const MIN_PASSWORD: usize = 8;
pub const MAX_PASSWORD: usize = 256;

/// How long a web session lasts.
pub const SESSION_TTL_MS: i64 = 14 * 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("a password has {MIN_PASSWORD} to {MAX_PASSWORD} bytes")]
    Length,
    #[error("hashing the password: {0}")]
    Hash(String),
}

/// argon2 runs at a time (each one is CPU and ~19 MiB of memory on a blocking thread): a burst
/// of sign-ins waits its turn instead of taking every core and gigabytes.
pub static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// `password` checked for length and hashed with argon2id and a random salt (a PHC string).
/// CPU-heavy on purpose: call it off the async threads.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&password.len()) {
        return Err(PasswordError::Length);
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` is the one `phc` was made from (false for a PHC string that does not
/// parse). CPU-heavy, as [`hash_password`].
pub fn password_matches(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash no password matches, checked against when a user has none (or does not exist), so
/// that a sign-in takes as long whether or not the name is someone's.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password(&tokens::generate().unwrap_or_else(|_| "a decoy password".into()))
            .expect("argon2 hashes a random password")
    })
}

/// A user as sign-in sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub banned: bool,
}

/// A live web session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: i64,
    pub user_id: i64,
    pub user: String,
    /// `submitter` or `admin`.
    pub role: String,
    /// The token every form of this session carries (synchronizer pattern).
    pub csrf: String,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

impl Db {
    /// The account named `name`, if there is one.
    pub async fn account(&self, name: &str) -> Result<Option<Account>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, password_hash, admin, banned_ms FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(Account {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                password_hash: r.try_get(2)?,
                admin: r.try_get::<i64, _>(3)? != 0,
                banned: r.try_get::<Option<i64>, _>(4)?.is_some(),
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| DbError::from(e))
    }

    /// Makes a new user `name` with a password hash; None if the name is taken.
    pub async fn sign_up(&self, name: &str, phc: &str) -> Result<Option<i64>, DbError> {
        crate::db::valid_user_name(name)?;
        let row = sqlx::query(
            "INSERT INTO users (name, created_ms, password_hash) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(now_ms())
        .bind(phc)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.try_get::<i64, _>(0)).transpose()?)
    }

    /// Sets (or replaces) a user's password hash, and whether they are an admin; every session
    /// of theirs ends (a password changed after a theft, or an admin no longer one, takes
    /// effect at once).
    pub async fn set_password(&self, user_id: i64, phc: &str, admin: bool) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE users SET password_hash = $1, admin = $2 WHERE id = $3")
            .bind(phc)
            .bind(i64::from(admin))
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sessions SET revoked_ms = $1 WHERE user_id = $2 AND revoked_ms IS NULL",
        )
        .bind(now_ms())
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens a session for `user_id` acting as `role` (opened with token `token_id`, if it
    /// was): the cookie's token (shown once, kept as its SHA-256) and the session's CSRF token.
    pub async fn open_session(
        &self,
        user_id: i64,
        role: &str,
        token_id: Option<i64>,
    ) -> Result<(String, String), DbError> {
        let cookie = tokens::generate().map_err(|e| DbError::Refused(e.to_string()))?;
        let csrf = tokens::random_hex(32).map_err(|e| DbError::Refused(e.to_string()))?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (sha256, user_id, role, token_id, csrf, created_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(tokens::digest(&cookie))
        .bind(user_id)
        .bind(role)
        .bind(token_id)
        .bind(&csrf)
        .bind(now)
        .bind(now + SESSION_TTL_MS)
        .execute(self.pool())
        .await?;
        Ok((cookie, csrf))
    }

    /// The live session whose cookie token has this digest: not expired, not signed out, its
    /// user not banned, the token it was opened with (if any) not revoked.
    pub async fn session(&self, digest: &str) -> Result<Option<Session>, DbError> {
        let row = sqlx::query(
            "SELECT s.id, s.user_id, u.name, s.role, s.csrf FROM sessions s \
             JOIN users u ON u.id = s.user_id LEFT JOIN tokens t ON t.id = s.token_id \
             WHERE s.sha256 = $1 AND s.revoked_ms IS NULL AND s.expires_ms > $2 \
             AND u.banned_ms IS NULL AND (s.token_id IS NULL OR t.revoked_ms IS NULL)",
        )
        .bind(digest)
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(Session {
                id: r.try_get(0)?,
                user_id: r.try_get(1)?,
                user: r.try_get(2)?,
                role: r.try_get(3)?,
                csrf: r.try_get(4)?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| DbError::from(e))
    }

    /// Ends a session (signing out).
    pub async fn close_session(&self, id: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE sessions SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Bans a user: their tokens and sessions stop working at once. False if there is no such
    /// user (or they were banned already). Their runners are revoked by the caller.
    pub async fn ban_user(&self, user_id: i64) -> Result<bool, DbError> {
        let done =
            sqlx::query("UPDATE users SET banned_ms = $1 WHERE id = $2 AND banned_ms IS NULL")
                .bind(now_ms())
                .bind(user_id)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A user's tokens: (id, role, created_ms, revoked_ms), newest first.
    pub async fn tokens_of(
        &self,
        user_id: i64,
    ) -> Result<Vec<(i64, String, i64, Option<i64>)>, DbError> {
        let rows = sqlx::query(
            "SELECT id, role, created_ms, revoked_ms FROM tokens WHERE user_id = $1 \
             ORDER BY id DESC",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Revokes token `id` if it is `user_id`'s; false if it is not theirs or already revoked.
    pub async fn revoke_token_of(&self, user_id: i64, id: i64) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_ms = $1 WHERE id = $2 AND user_id = $3 \
             AND revoked_ms IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .bind(user_id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_salt_and_match_only_themselves() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "a salt of its own");
        assert!(password_matches("correct horse", &a));
        assert!(!password_matches("correct horsE", &a));
        assert!(!password_matches("correct horse", "not a phc string"));
        assert!(!password_matches("anything", decoy_hash()));
        assert!(matches!(hash_password("short"), Err(PasswordError::Length)));
        assert!(matches!(
            hash_password(&"x".repeat(MAX_PASSWORD + 1)),
            Err(PasswordError::Length)
        ));
    }

    #[tokio::test]
    async fn sessions_end_with_sign_out_a_ban_or_their_token() {
        let d = tempfile::tempdir().unwrap();
        let db = crate::test_backends::open_db(d.path()).await;
        let alice = db.sign_up("alice", "$argon2id$x").await.unwrap().unwrap();
        assert_eq!(db.sign_up("alice", "$argon2id$y").await.unwrap(), None);
        assert!(db.sign_up("../x", "h").await.is_err());
        let acct = db.account("alice").await.unwrap().unwrap();
        assert_eq!(
            (
                acct.id,
                acct.admin,
                acct.banned,
                acct.password_hash.as_deref()
            ),
            (alice, false, false, Some("$argon2id$x"))
        );
        let (cookie, csrf) = db.open_session(alice, "submitter", None).await.unwrap();
        let s = db.session(&tokens::digest(&cookie)).await.unwrap().unwrap();
        assert_eq!((s.user.as_str(), s.csrf.as_str()), ("alice", csrf.as_str()));
        assert!(
            db.session(&tokens::digest("cst_other"))
                .await
                .unwrap()
                .is_none()
        );
        db.close_session(s.id).await.unwrap();
        assert!(
            db.session(&tokens::digest(&cookie))
                .await
                .unwrap()
                .is_none()
        );
        // A session opened with a token dies with it.
        let t = tokens::generate().unwrap();
        let tid = db
            .add_token(alice, "submitter", &tokens::digest(&t))
            .await
            .unwrap();
        let (cookie, _) = db
            .open_session(alice, "submitter", Some(tid))
            .await
            .unwrap();
        assert!(
            db.session(&tokens::digest(&cookie))
                .await
                .unwrap()
                .is_some()
        );
        assert!(db.revoke_token_of(alice, tid).await.unwrap());
        assert!(
            db.session(&tokens::digest(&cookie))
                .await
                .unwrap()
                .is_none()
        );
        // A ban ends every session and token.
        let t = tokens::generate().unwrap();
        db.add_token(alice, "submitter", &tokens::digest(&t))
            .await
            .unwrap();
        let (cookie, _) = db.open_session(alice, "submitter", None).await.unwrap();
        assert!(db.ban_user(alice).await.unwrap());
        assert!(!db.ban_user(alice).await.unwrap(), "once");
        assert!(
            db.session(&tokens::digest(&cookie))
                .await
                .unwrap()
                .is_none()
        );
        assert!(db.identify(&tokens::digest(&t)).await.unwrap().is_none());
    }
}
