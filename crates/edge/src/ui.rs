//! The operator page (`GET /`): one HTML page, a script and a style sheet, embedded in the binary
//! (no CDN, no build step). The page itself needs no key; everything it shows comes from the
//! authenticated API (`/v1/audit`, `/v1/models`, `/v1/edge-prompts`, `/v1/chat/completions`), so it
//! shows only the caller's tenant. `GET /ui/config.json` tells it the model id and whether keys are
//! required, so it asks for one before it calls the API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::server::App;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// Only the page's own files and the edge's own API; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// What the page needs to know before it has a key.
#[derive(serde::Serialize)]
struct PageConfig {
    model_id: String,
    auth_required: bool,
    cloud: bool,
}

async fn config(State(app): State<Arc<App>>) -> Json<PageConfig> {
    Json(PageConfig {
        model_id: app.cfg.model_id.clone(),
        auth_required: app.cfg.api_keys.is_some(),
        cloud: app.fetcher.is_some(),
    })
}

/// The page's routes (no authentication: they carry no tenant's data).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/ui/config.json", get(config))
}
