//! Which storage the server's tests run on. By default the embedded set (SQLite and the local
//! blob directory, in each test's own data directory); with `CONSTRUIR_TEST_BACKENDS=postgres-s3`
//! (tools/test's second pass) PostgreSQL and S3, for real: each test gets a database of its own,
//! made through `CONSTRUIR_TEST_POSTGRES` (a URL of a role that may create databases), and a
//! bucket of its own in the s3s-fs server whose root directory is `CONSTRUIR_TEST_S3_ROOT` (a
//! bucket there is a directory; the endpoint and keys are the `AWS_*` variables the server
//! reads). A server that cannot be reached fails the test; it never falls back.

use crate::blobs::{Blobs, StoreUrl};
use crate::db::{DatabaseUrl, Db};
use std::path::Path;

/// The storage sets the tests know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    Embedded,
    PostgresS3,
}

pub fn chosen() -> Backends {
    match std::env::var("CONSTRUIR_TEST_BACKENDS").as_deref() {
        Ok("postgres-s3") => Backends::PostgresS3,
        Ok("embedded") | Err(_) => Backends::Embedded,
        Ok(other) => panic!("CONSTRUIR_TEST_BACKENDS={other:?}: expected embedded or postgres-s3"),
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("CONSTRUIR_TEST_BACKENDS=postgres-s3 needs {name} (tools/test sets it)")
    })
}

/// A new, empty database on the test PostgreSQL: its URL.
pub async fn new_database() -> DatabaseUrl {
    use sqlx::Connection;
    let admin = var("CONSTRUIR_TEST_POSTGRES");
    let name = format!("t_{}", crate::tokens::random_hex(8).unwrap());
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("the test PostgreSQL ({admin}) does not answer: {e}"));
    // The name is ours: "t_" and hex digits.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    DatabaseUrl::parse(&format!("{base}/{name}")).unwrap()
}

/// A new, empty bucket on the test S3 server: its URL.
pub fn new_bucket() -> StoreUrl {
    let root = var("CONSTRUIR_TEST_S3_ROOT");
    let name = format!("t-{}", crate::tokens::random_hex(8).unwrap());
    std::fs::create_dir(Path::new(&root).join(&name)).unwrap();
    StoreUrl::parse(&format!("s3://{name}")).unwrap()
}

/// The database and blob store of a test whose data directory is `data`: new ones the first
/// time, the same ones again after (a test that restarts its server), as a server started on
/// the same settings would find them. The database's and the bucket's names are kept in
/// `data/test-backends`.
pub async fn open(data: &Path) -> (Db, Blobs) {
    match chosen() {
        Backends::Embedded => (
            Db::open_embedded(data).await.unwrap(),
            Blobs::open_local(data).unwrap(),
        ),
        Backends::PostgresS3 => {
            let kept = data.join("test-backends");
            let (url, bucket) = match std::fs::read_to_string(&kept) {
                Ok(text) => {
                    let (url, bucket) = text.split_once('\n').unwrap();
                    (
                        DatabaseUrl::parse(url).unwrap(),
                        StoreUrl::parse(bucket.trim()).unwrap(),
                    )
                }
                Err(_) => {
                    let (url, bucket) = (new_database().await, new_bucket());
                    let text = format!("{}\n{}\n", url.expose(), bucket.as_str());
                    std::fs::write(&kept, text).unwrap();
                    (url, bucket)
                }
            };
            let db = Db::open_postgres(&url)
                .await
                .unwrap_or_else(|e| panic!("open {url}: {e}"));
            let blobs = Blobs::open_s3(&bucket, data).unwrap();
            (db, blobs)
        }
    }
}

/// The database of a test whose data directory is `data` (see [`open`]).
pub async fn open_db(data: &Path) -> Db {
    open(data).await.0
}
