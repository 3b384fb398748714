//! `/runners` and `/images`: the farm's runners and published images.

use crate::service::Shared;
use axum::Router;

pub fn routes() -> Router<Shared> {
    Router::new()
}
