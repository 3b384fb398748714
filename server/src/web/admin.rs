//! `/admin`: an operator's page (delete a job and its blobs, ban a user or a runner).

use crate::service::Shared;
use axum::Router;

pub fn routes() -> Router<Shared> {
    Router::new()
}
