//! The edge: the OpenAI-compatible server users talk to. Cloud prompts arrive as signed,
//! content-addressed KV from the cloud ([`fetch`], kept on disk by [`cache`]); everything the user
//! sends — messages, edge prompts — is tokenized, prefilled and decoded here and never leaves the edge.
//!
//! **Routes** ([`server`]): `POST /v1/chat/completions`, `POST /v1/completions` (both streaming with
//! SSE or not), `GET /v1/models`, `POST|GET /v1/edge-prompts`, `DELETE /v1/edge-prompts/{name}`,
//! `DELETE /v1/tenants/self/cache`, `GET /v1/audit` (the caller's requests with what each sent to
//! the cloud, and the edge's KV state: [`audit`]) (these need the tenant's bearer token when keys
//! are configured); `GET /health`,
//! `GET /metrics`, `GET /openapi.json`, and the operator page `GET /` with its files under `/ui/`
//! ([`ui`]) (no authentication).

pub mod audit;
pub mod cache;
pub mod conn;
pub mod error;
pub mod fetch;
pub mod metrics;
pub mod openai;
pub mod plan;
pub mod prompt;
pub mod server;
pub mod tenant;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use ep_engine::Engine;
use ep_model::chat::ChatTemplate;
use ep_model::tokenizer::Tokenizer;

pub use crate::error::ApiError;
pub use crate::fetch::Fetcher;
pub use crate::server::App;
pub use crate::tenant::ApiKeys;

/// The edge server's settings.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The model id clients name (`"<model_id>"`, or `"<model_id>:<cloud-prompt>"`).
    pub model_id: String,
    /// Accepted API keys and their tenants; `None`: the bearer token is the tenant.
    pub api_keys: Option<ApiKeys>,
    /// Requests held beyond the engine's batch (`max_seqs`) before answering 429.
    pub max_queue: usize,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Largest total of request header names and values (431 beyond).
    pub max_header_bytes: usize,
    /// Most messages in a chat request.
    pub max_messages: usize,
    /// Most stop sequences, and the longest one in bytes.
    pub max_stop: usize,
    pub max_stop_bytes: usize,
    /// Largest edge prompt (bytes of content) and most edge prompts per tenant.
    pub max_edge_prompt_bytes: usize,
    pub max_edge_prompts: usize,
    /// Largest `max_tokens` a request may ask for (400 beyond; also the OpenAPI maximum); `None`:
    /// whatever the context leaves.
    pub max_tokens_limit: Option<usize>,
    /// How long a response write may wait for a client that reads nothing before the connection
    /// is closed and its request cancelled ([`conn`]).
    pub write_stall: std::time::Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            model_id: "edgeprompt".into(),
            api_keys: None,
            max_queue: 64,
            max_body_bytes: 4 << 20,
            max_header_bytes: 16 << 10,
            max_messages: 1024,
            max_stop: 8,
            max_stop_bytes: 256,
            max_edge_prompt_bytes: 256 << 10,
            max_edge_prompts: 64,
            max_tokens_limit: None,
            write_stall: std::time::Duration::from_secs(30),
        }
    }
}

/// Binds `cfg.listen` and serves until `shutdown` resolves; then stops taking connections and
/// finishes the requests that are running (graceful shutdown).
pub async fn serve(
    cfg: EdgeConfig,
    engine: Arc<Engine>,
    tok: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    fetcher: Option<Arc<Fetcher>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    serve_on(listener, cfg, engine, tok, template, fetcher, shutdown).await
}

/// [`serve`] on a listener already bound (tests bind port 0 and read the address first).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    cfg: EdgeConfig,
    engine: Arc<Engine>,
    tok: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    fetcher: Option<Arc<Fetcher>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Arc::new(App::new(cfg, engine, tok, template, fetcher));
    tracing::info!(addr = %listener.local_addr()?, "edge listening");
    let listener =
        conn::StallListener::new(listener, app.cfg.write_stall, app.metrics.stalled.clone());
    axum::serve(listener, server::router(app))
        .with_graceful_shutdown(shutdown)
        .await
}
