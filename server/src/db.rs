//! The server's metadata: users, tokens, runners, jobs and attempts, in SQL through sqlx's `Any`
//! driver, so the embedded default (SQLite in WAL mode at `DATA/construir.db`) and PostgreSQL
//! later run the same queries. Every state change is committed before it is acknowledged.

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};
use std::path::Path;

/// A database handle.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    engine: Engine,
    /// PostgreSQL's URL (its LISTEN/NOTIFY connections are its own); None for SQLite.
    url: Option<DatabaseUrl>,
}

/// Which database a [`Db`] is: the SQL is the same, but what the two serialise differs (SQLite
/// runs one writer at a time; PostgreSQL runs writers side by side, so a write whose condition
/// counts other rows takes a row lock first) and each has its own migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Refused(String),
}

/// What a database failure means for the request that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The database does not answer, is restarting, or gave up a transaction for another
    /// (a deadlock, a serialisation failure): nothing was stored; try again later (503).
    Unavailable,
    /// A value it refuses to store (PostgreSQL's TEXT takes no NUL byte): the request's (400).
    BadValue,
    Internal,
}

/// Sorts a database failure by SQLSTATE: class 08 (connection), 57P01–57P03 (shut down,
/// starting), 40001 and 40P01 (serialisation, deadlock), 53300 (too many connections) are the
/// database's trouble for a while; 22021 (a NUL in TEXT) is the value's.
pub fn trouble(e: &DbError) -> Trouble {
    match e {
        DbError::Sql(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)) => {
            Trouble::Unavailable
        }
        DbError::Sql(sqlx::Error::Database(d)) => match d.code().as_deref() {
            Some(c) if c.starts_with("08") => Trouble::Unavailable,
            Some("57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300") => Trouble::Unavailable,
            Some("22021") => Trouble::BadValue,
            _ => Trouble::Internal,
        },
        _ => Trouble::Internal,
    }
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub user: String,
    pub role: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Who a request's token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: i64,
    pub user: String,
    pub role: String,
    pub token_id: i64,
}

/// A user name: 1 to 64 letters, digits, `-`, `_` or `.` (it names a user in paths and pages).
pub fn valid_user_name(name: &str) -> Result<(), DbError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(DbError::Refused(format!(
            "user name {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// A `postgres://` URL as given to `--database`: its password never shows in a log or an error.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "{:?} is not a postgres:// URL (leave --database out for the embedded SQLite)",
                DatabaseUrl(url.to_string())
            ));
        }
        Ok(DatabaseUrl(url.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // scheme://user:password@host… → scheme://user:***@host…, and every query value
        // (`?password=…`, `sslpassword=…`) as ***.
        let (s, query) = match self.0.split_once('?') {
            Some((base, q)) => (base.to_string(), Some(q)),
            None => (self.0.clone(), None),
        };
        let mut shown = match (s.find("://"), s.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let auth = &s[scheme + 3..at];
                match auth.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &s[..scheme + 3], &s[at..]),
                    None => s.clone(),
                }
            }
            _ => s.clone(),
        };
        if let Some(q) = query {
            let keys: Vec<String> = q
                .split('&')
                .map(|kv| format!("{}=***", kv.split('=').next().unwrap_or("")))
                .collect();
            shown = format!("{shown}?{}", keys.join("&"));
        }
        write!(f, "{shown}")
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Db {
    /// Opens (creating if needed) the embedded database in `data` and brings its schema up to date.
    pub async fn open_embedded(data: &Path) -> Result<Db, DbError> {
        install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", data.join("construir.db").display());
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL: readers never wait for the writer; FULL: a commit is on disk before it
                    // is acknowledged; a writer waits for another instead of failing.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Db {
            pool,
            engine: Engine::Sqlite,
            url: None,
        })
    }

    /// Opens the database `--database` names (a `postgres://` URL), or the embedded one in `data`
    /// when it names none, and brings its schema up to date.
    pub async fn open(database: Option<&DatabaseUrl>, data: &Path) -> Result<Db, DbError> {
        match database {
            None => Db::open_embedded(data).await,
            Some(url) => Db::open_postgres(url).await,
        }
    }

    /// Opens a PostgreSQL database (shared by every server of a farm) and migrates it; servers
    /// starting together migrate once (sqlx's migrator holds an advisory lock meanwhile).
    pub async fn open_postgres(url: &DatabaseUrl) -> Result<Db, DbError> {
        install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            // A database that does not answer fails the request in seconds, not never.
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url.expose())
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Db {
            pool,
            engine: Engine::Postgres,
            url: Some(url.clone()),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// PostgreSQL's URL; None for SQLite.
    pub fn url(&self) -> Option<&DatabaseUrl> {
        self.url.as_ref()
    }

    /// The user named `name`, made if new.
    pub async fn ensure_user(&self, name: &str) -> Result<i64, DbError> {
        valid_user_name(name)?;
        sqlx::query(
            "INSERT INTO users (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Stores a new token (its digest) for `user`; returns the token's id.
    pub async fn add_token(&self, user_id: i64, role: &str, digest: &str) -> Result<i64, DbError> {
        let row = sqlx::query(
            "INSERT INTO tokens (user_id, role, sha256, created_ms) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(user_id)
        .bind(role)
        .bind(digest)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, DbError> {
        let rows = sqlx::query(
            "SELECT t.id, u.name, t.role, t.created_ms, t.revoked_ms FROM tokens t \
             JOIN users u ON u.id = t.user_id ORDER BY t.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TokenInfo {
                    id: r.try_get(0)?,
                    user: r.try_get(1)?,
                    role: r.try_get(2)?,
                    created_ms: r.try_get(3)?,
                    revoked_ms: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Revokes a token; false if there is no such token or it was revoked already.
    pub async fn revoke_token(&self, id: i64) -> Result<bool, DbError> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whose token this is, if it is a live one.
    pub async fn identify(&self, digest: &str) -> Result<Option<Identity>, DbError> {
        let row = sqlx::query(
            "SELECT u.id, u.name, t.role, t.id FROM tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.sha256 = $1 AND t.revoked_ms IS NULL AND u.banned_ms IS NULL",
        )
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Identity {
                user_id: r.try_get(0)?,
                user: r.try_get(1)?,
                role: r.try_get(2)?,
                token_id: r.try_get(3)?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| DbError::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn users_tokens_and_revocation() {
        let d = tempfile::tempdir().unwrap();
        let db = crate::test_backends::open_db(d.path()).await;
        let alice = db.ensure_user("alice").await.unwrap();
        assert_eq!(db.ensure_user("alice").await.unwrap(), alice, "made once");
        assert!(db.ensure_user("../root").await.is_err());
        assert!(db.ensure_user("").await.is_err());
        let id = db
            .add_token(alice, "submitter", &"a".repeat(64))
            .await
            .unwrap();
        let who = db.identify(&"a".repeat(64)).await.unwrap().unwrap();
        assert_eq!(
            (who.user.as_str(), who.role.as_str()),
            ("alice", "submitter")
        );
        assert!(db.identify(&"b".repeat(64)).await.unwrap().is_none());
        assert!(
            db.add_token(alice, "emperor", &"c".repeat(64))
                .await
                .is_err()
        );
        assert!(db.revoke_token(id).await.unwrap());
        assert!(!db.revoke_token(id).await.unwrap(), "once");
        assert!(db.identify(&"a".repeat(64)).await.unwrap().is_none());
        let list = db.list_tokens().await.unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].revoked_ms.is_some());
        // Reopening keeps everything (and runs no migration twice).
        drop(db);
        let db = crate::test_backends::open_db(d.path()).await;
        assert_eq!(db.list_tokens().await.unwrap().len(), 1);
    }

    #[test]
    fn a_database_url_shows_no_password() {
        let url = DatabaseUrl::parse("postgres://farm:s3cret@db.example:5432/construir").unwrap();
        assert_eq!(
            format!("{url} {url:?}"),
            "postgres://farm:***@db.example:5432/construir postgres://farm:***@db.example:5432/construir"
        );
        assert_eq!(
            url.expose(),
            "postgres://farm:s3cret@db.example:5432/construir"
        );
        let query = DatabaseUrl::parse("postgres://db/c?user=farm&password=hunter2").unwrap();
        assert_eq!(query.to_string(), "postgres://db/c?user=***&password=***");
        let plain = DatabaseUrl::parse("postgresql://farm@db/construir").unwrap();
        assert_eq!(plain.to_string(), "postgresql://farm@db/construir");
        let err = DatabaseUrl::parse("mysql://root:hunter2@db/x").unwrap_err();
        assert!(
            err.contains("not a postgres:// URL") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
