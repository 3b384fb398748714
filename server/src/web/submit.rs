//! `/submit`: a job submitted through a form.

use crate::service::Shared;
use axum::Router;

pub fn routes() -> Router<Shared> {
    Router::new()
}
