//! The HTTP layer: routes, authentication, request validation, the bounded queue, SSE streaming,
//! metrics and the audit log.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ep_engine::{Engine, Event, Finished, Request, TokenLogprobs, MAX_TOP_LOGPROBS};
use ep_model::chat::{ChatMessage, ChatTemplate};
use ep_model::generate::GenerateParams;
use ep_model::sampling::SamplingParams;
use ep_model::tokenizer::Tokenizer;
use futures_util::stream::{self, Stream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::OpenApi;

use crate::audit::{self, AuditLog, AuditRow};
use crate::error::ApiError;
use crate::fetch::{
    record_upstream, unix_ms, upstream_so_far, Fetcher, ReadyPrompt, UpstreamRequest,
};
use crate::metrics::Metrics;
use crate::openai::*;
use crate::prompt::{check_role, special_texts, Built, CompletionPrompt, Renderer};
use crate::tenant::{salt, tenant_for, tenant_hash, EdgePrompt, EdgePromptContent, Tenants};
use crate::EdgeConfig;

/// Everything a handler needs.
pub struct App {
    pub cfg: EdgeConfig,
    pub engine: Arc<Engine>,
    pub tok: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub fetcher: Option<Arc<Fetcher>>,
    pub tenants: Tenants,
    pub metrics: Metrics,
    pub audit: AuditLog,
    specials: Vec<String>,
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    started: u64,
}

type Shared = Arc<App>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl App {
    pub fn new(
        cfg: EdgeConfig,
        engine: Arc<Engine>,
        tok: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        fetcher: Option<Arc<Fetcher>>,
    ) -> Self {
        let specials = special_texts(&tok);
        Self {
            cfg,
            engine,
            tok,
            template,
            fetcher,
            tenants: Tenants::default(),
            metrics: Metrics::new(),
            audit: AuditLog::default(),
            specials,
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }
    }

    fn renderer(&self) -> Renderer<'_> {
        Renderer {
            tok: &self.tok,
            template: self.template.as_ref(),
            specials: &self.specials,
        }
    }

    /// Requests the edge holds at once: the engine's batch plus the queue.
    fn capacity(&self) -> usize {
        self.engine.config().max_seqs + self.cfg.max_queue
    }

    fn request_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started)
    }
}

/// A place in the bounded queue, given back when dropped.
struct Slot {
    app: Shared,
}

impl Slot {
    fn take(app: &Shared) -> Result<Self, ApiError> {
        let cap = app.capacity();
        let got = app
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            });
        if got.is_err() {
            app.metrics.rejected_queue_full.inc();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the server is busy ({cap} requests in flight); retry later"),
            )
            .code("queue_full")
            .retry(1));
        }
        app.metrics.in_flight.inc();
        Ok(Self { app: app.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.in_flight.dec();
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "EdgePrompt edge",
        description = "OpenAI-compatible inference on the edge: cloud prompts as KV, private data kept here"
    ),
    paths(
        chat_completions,
        completions,
        list_models,
        create_edge_prompt,
        list_edge_prompts,
        delete_edge_prompt,
        purge_cache,
        get_audit,
        health
    ),
    components(schemas(ep_proto::ErrorBody, ep_proto::Health))
)]
pub struct ApiDoc;

/// The router over shared state.
pub fn router(app: Shared) -> Router {
    let body_limit = app.cfg.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route(
            "/v1/edge-prompts",
            post(create_edge_prompt).get(list_edge_prompts),
        )
        .route("/v1/edge-prompts/{name}", delete(delete_edge_prompt))
        .route("/v1/tenants/self/cache", delete(purge_cache))
        .route("/v1/audit", get(get_audit))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .merge(api)
        .merge(crate::ui::router())
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), header_limit))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::map_response(close_after_413))
        .with_state(app)
}

/// A body over the limit is answered without being read, so its connection cannot carry another
/// request: say so (`Connection: close`), or a client that pools connections sends its next request
/// into one the server is closing.
async fn close_after_413(mut r: axum::response::Response) -> axum::response::Response {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route",
    )
}

/// The tenant of an authenticated request.
#[derive(Clone, Debug)]
struct Tenant(String);

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn auth(State(app): State<Shared>, mut req: HttpRequest, next: Next) -> Response {
    match tenant_for(app.cfg.api_keys.as_ref(), bearer(req.headers())) {
        Some(t) => {
            req.extensions_mut().insert(Tenant(t));
            next.run(req).await
        }
        None => ApiError::unauthorized(
            "a valid API key is required: send it as 'Authorization: Bearer <key>'",
        )
        .into_response(),
    }
}

async fn header_limit(State(app): State<Shared>, req: HttpRequest, next: Next) -> Response {
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > app.cfg.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request headers have {bytes} bytes, more than the {} allowed",
                app.cfg.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Parses a JSON body; the error names the field at fault.
fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<(T, usize), ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let n = body.len();
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
            .code("invalid_json")
    })?;
    integral_numbers(&mut value);
    let v = match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(v) => v,
        Err(e) => {
            // Fields flattened into the request (the shared sampling fields) lose their path: look
            // for the culprit among them first.
            let flat = serde_path_to_error::deserialize::<_, SamplingFields>(&value).err();
            let e = match flat {
                Some(f) if e.path().to_string() == "." => f,
                _ => e,
            };
            let path = e.path().to_string();
            let inner = e.into_inner();
            return Err(if path == "." {
                ApiError::bad_request(format!("the request body is not a valid request: {inner}"))
            } else {
                ApiError::invalid(&path, format!("invalid '{path}': {inner}"))
            });
        }
    };
    Ok((v, n))
}

/// Writes numbers with a zero fraction (`5.0`) as integers, as JSON Schema counts them: an integer
/// field takes them as its value (a float field takes integers anyway).
fn integral_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exactly representable both ways: |f| < 2^63 (2^64 for unsigned).
            if f.fract() == 0.0
                && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f)
            {
                *v = (f as i64).into();
            } else if f.fract() == 0.0 && (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                *v = (f as u64).into();
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(o) => o.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// The base model and the cloud prompt a model id names.
fn split_model<'a>(app: &App, model: &'a str) -> Result<Option<&'a str>, ApiError> {
    let (base, cloud) = match model.split_once(':') {
        Some((b, c)) => (b, Some(c)),
        None => (model, None),
    };
    if base != app.cfg.model_id {
        return Err(ApiError::not_found(
            "model_not_found",
            format!(
                "the model '{model}' does not exist (this edge serves '{}' and '{}:<cloud-prompt>')",
                app.cfg.model_id, app.cfg.model_id
            ),
        )
        .param("model"));
    }
    match cloud {
        Some("") => Err(ApiError::invalid("model", "the cloud prompt name is empty")),
        c => Ok(c),
    }
}

async fn resolve_cloud(
    app: &App,
    name: Option<&str>,
) -> Result<Option<Arc<ReadyPrompt>>, ApiError> {
    let Some(name) = name else { return Ok(None) };
    let Some(f) = &app.fetcher else {
        return Err(ApiError::not_found(
            "model_not_found",
            format!("unknown cloud prompt '{name}': this edge has no cloud"),
        )
        .param("model"));
    };
    Ok(Some(f.resolve(name).await?))
}

fn edge_prompt(
    app: &App,
    tenant: &str,
    name: Option<&str>,
) -> Result<Option<EdgePrompt>, ApiError> {
    let Some(name) = name else { return Ok(None) };
    app.tenants.get(tenant, name).map(Some).ok_or_else(|| {
        ApiError::not_found(
            "edge_prompt_not_found",
            format!("unknown edge prompt '{name}'"),
        )
        .param("edge_prompt")
    })
}

/// `v` checked against its range as sent (f64, so that no value the range admits rounds out of it,
/// nor one outside rounds in), then made the sampler's f32. Open lower bounds are all 0: a positive
/// value below f32's smallest normal number becomes that number (not 0, nor a subnormal whose
/// reciprocal overflows).
fn range(v: f64, lo: f64, hi: f64, lo_open: bool, param: &str) -> Result<f32, ApiError> {
    debug_assert!(!lo_open || lo == 0.0);
    let ok = v.is_finite() && v <= hi && (if lo_open { v > lo } else { v >= lo });
    if ok {
        let x = v as f32;
        Ok(if lo_open { x.max(f32::MIN_POSITIVE) } else { x })
    } else {
        let l = if lo_open { "(" } else { "[" };
        Err(
            ApiError::invalid(param, format!("'{param}' = {v} is outside {l}{lo}, {hi}]"))
                .code("invalid_value"),
        )
    }
}

static SEEDS: AtomicU64 = AtomicU64::new(0);

/// Generation parameters from the shared fields (everything but the prompt and max tokens checked).
fn params(
    app: &App,
    f: &SamplingFields,
    max_tokens: Option<u64>,
    logprobs: Option<usize>,
) -> Result<GenerateParams, ApiError> {
    if let Some(n) = f.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            format!("only n = 1 is supported, not {n}"),
        ));
    }
    if f.logit_bias
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    let temperature = range(f.temperature.unwrap_or(1.0), 0.0, 2.0, false, "temperature")?;
    let top_p = range(f.top_p.unwrap_or(1.0), 0.0, 1.0, true, "top_p")?;
    let min_p = range(f.min_p.unwrap_or(0.0), 0.0, 1.0, false, "min_p")?;
    let repeat_penalty = range(
        f.repetition_penalty.unwrap_or(1.0),
        0.0,
        2.0,
        true,
        "repetition_penalty",
    )?;
    let presence_penalty = range(
        f.presence_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
        false,
        "presence_penalty",
    )?;
    let frequency_penalty = range(
        f.frequency_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
        false,
        "frequency_penalty",
    )?;
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("'top_k' = {k}: use -1 (off) or a positive count"),
            ))
        }
    };
    let stop = f.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stop.len() > app.cfg.max_stop {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {} stop sequences are allowed, not {}",
                app.cfg.max_stop,
                stop.len()
            ),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > app.cfg.max_stop_bytes)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "each stop sequence must have 1 to {} bytes (one has {})",
                app.cfg.max_stop_bytes,
                s.len()
            ),
        ));
    }
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if let Some(limit) = app.cfg.max_tokens_limit.filter(|&l| n > l) {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens = {n} is more than this server allows ({limit})"),
                )
                .code("invalid_value"));
            }
            n
        }
        None => usize::MAX,
    };
    let seed = match f.seed {
        Some(s) => s as u64,
        None => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ SEEDS.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        }
    };
    Ok(GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: 64,
            presence_penalty,
            frequency_penalty,
            seed,
        },
        stop,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        ..GenerateParams::default()
    })
}

/// What the audit row of a request says beyond its counts.
struct Meta {
    cloud_prompt: Option<String>,
    edge_prompt: Option<String>,
    /// The requests sent to the cloud while this one was prepared.
    upstream: Vec<UpstreamRequest>,
    /// Bytes of the request's own text found in them ([`audit::text_bytes_in`]).
    text_bytes_up: u64,
    body_bytes: usize,
    arrived_ms: u64,
    arrived: Instant,
}

impl Meta {
    fn new() -> Self {
        Self {
            cloud_prompt: None,
            edge_prompt: None,
            upstream: Vec::new(),
            text_bytes_up: 0,
            body_bytes: 0,
            arrived_ms: unix_ms(),
            arrived: Instant::now(),
        }
    }

    /// Notes the cloud prompt and edge prompt named, and searches the request's texts in what went
    /// up so far.
    fn note(&mut self, cloud: Option<&str>, edge: Option<&EdgePrompt>, texts: &[&str]) {
        self.cloud_prompt = cloud.map(str::to_string);
        self.edge_prompt = edge.map(|e| e.name.clone());
        let mut all: Vec<&str> = texts.to_vec();
        if let Some(e) = edge {
            match &e.content {
                EdgePromptContent::Text(t) => all.push(t),
                EdgePromptContent::Messages(m) => all.extend(m.iter().map(|m| m.content.as_str())),
            }
        }
        self.text_bytes_up = audit::text_bytes_in(&upstream_so_far(), &all);
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        id: String,
        kind: Kind,
        kv: Option<String>,
        status: u16,
        outcome: String,
        f: Option<&Finished>,
        completion_tokens: usize,
        client_bytes_out: usize,
    ) -> AuditRow {
        let (prompt, cached, imported, generated) = f.map_or((0, 0, 0, completion_tokens), |f| {
            (
                f.prompt_tokens,
                f.cached_tokens,
                f.imported_tokens,
                f.generated,
            )
        });
        AuditRow {
            id,
            at_ms: self.arrived_ms,
            endpoint: match kind {
                Kind::Chat => "chat",
                Kind::Completion => "completion",
            }
            .into(),
            cloud_prompt: self.cloud_prompt.clone(),
            edge_prompt: self.edge_prompt.clone(),
            kv,
            status,
            outcome,
            prompt_tokens: prompt,
            cached_tokens: cached,
            imported_tokens: imported,
            computed_tokens: prompt.saturating_sub(cached),
            completion_tokens: generated,
            ttft_ms: f
                .filter(|f| f.generated > 0)
                .map(|f| f.first_token.as_secs_f64() * 1e3),
            total_ms: f.map_or_else(
                || self.arrived.elapsed().as_secs_f64() * 1e3,
                |f| f.total.as_secs_f64() * 1e3,
            ),
            client_bytes_in: self.body_bytes,
            client_bytes_out,
            upstream_bytes_up: self.upstream.iter().map(|u| u.bytes_up).sum(),
            upstream_bytes_down: self.upstream.iter().map(|u| u.bytes_down).sum(),
            upstream: self.upstream.clone(),
            text_bytes_up: self.text_bytes_up,
        }
    }
}

/// A request ready for the engine.
struct Prepared {
    tenant: String,
    built: Built,
    params: GenerateParams,
    salt: Vec<u8>,
    /// Held until the request ends: the cloud prompt's KV stays pinned.
    _cloud: Option<Arc<ReadyPrompt>>,
    stream: bool,
    include_usage: bool,
    model: String,
}

/// Checks the prompt against the context and fixes max tokens.
fn fit_context(
    app: &App,
    p: &mut Prepared,
    explicit_max: bool,
    prompt_param: &str,
) -> Result<(), ApiError> {
    let ctx = app.engine.config().max_seq_len;
    let n = p.built.tokens.len();
    if n == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    if n >= ctx {
        return Err(ApiError::invalid(
            prompt_param,
            format!("the prompt has {n} tokens; the context holds {ctx} (with room for one generated token)"),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - n;
    if p.params.max_tokens == usize::MAX {
        p.params.max_tokens = room.min(app.cfg.max_tokens_limit.unwrap_or(usize::MAX));
    } else if explicit_max && p.params.max_tokens > room {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens = {} is more than the context leaves: the prompt has {n} tokens of {ctx}",
                p.params.max_tokens
            ),
        )
        .code("context_length_exceeded"));
    }
    Ok(())
}

fn chat_messages(app: &App, msgs: &[RequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' is empty"));
    }
    if msgs.len() > app.cfg.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "at most {} messages are allowed, not {}",
                app.cfg.max_messages,
                msgs.len()
            ),
        ));
    }
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            check_role(role, &format!("messages[{i}].role"))?;
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "content parts of type '{}' are not supported (only text)",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn note_salt(app: &App, tenant: &str, cache_salt: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let s = salt(tenant, cache_salt);
    if !app.tenants.note_salt(tenant, &s) {
        return Err(ApiError::invalid(
            "cache_salt",
            "too many distinct cache_salt values for this tenant: purge its cache first",
        ));
    }
    Ok(s)
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A completion (or an SSE stream of chunks with `stream`)", content(
            (ChatCompletion = "application/json"),
            (String = "text/event-stream")
        )),
        (status = 400, body = ep_proto::ErrorBody),
        (status = 401, body = ep_proto::ErrorBody),
        (status = 404, body = ep_proto::ErrorBody),
        (status = 413, body = ep_proto::ErrorBody),
        (status = 429, description = "the queue is full (`Retry-After`)", body = ep_proto::ErrorBody),
        (status = 503, description = "the cloud is unreachable and nothing is cached (`Retry-After`)", body = ep_proto::ErrorBody),
    )
)]
async fn chat_completions(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut meta = Meta::new();
    let prep = async {
        let (req, body_bytes): (ChatCompletionRequest, usize) =
            parse(body, app.cfg.max_body_bytes)?;
        meta.body_bytes = body_bytes;
        if req
            .tools
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid("tools", "tools are not supported"));
        }
        if let Some(rf) = req.response_format.as_ref().filter(|v| !v.is_null()) {
            if rf.get("type").and_then(|t| t.as_str()) != Some("text") {
                return Err(ApiError::invalid(
                    "response_format",
                    "only response_format {\"type\": \"text\"} is supported",
                ));
            }
        }
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (false, Some(n)) if n > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs = true",
                ))
            }
            (false, _) => None,
            (true, n) => {
                let n = n.unwrap_or(0);
                if n > MAX_TOP_LOGPROBS as u64 {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
                    ));
                }
                Some(n as usize)
            }
        };
        let msgs = chat_messages(&app, &req.messages)?;
        let cloud_name = split_model(&app, &req.model)?;
        let max = req.max_completion_tokens.or(req.sampling.max_tokens);
        let params = params(&app, &req.sampling, max, logprobs)?;
        let edge = edge_prompt(&app, &tenant, req.sampling.edge_prompt.as_deref())?;
        let cloud = resolve_cloud(&app, cloud_name).await;
        let texts: Vec<&str> = msgs.iter().map(|m| m.content.as_str()).collect();
        meta.note(cloud_name, edge.as_ref(), &texts);
        let cloud = cloud?;
        let built = app
            .renderer()
            .build_chat_prompt(cloud.as_deref(), edge.as_ref(), &msgs)?;
        let salt = note_salt(&app, &tenant, req.sampling.cache_salt.as_deref())?;
        let mut p = Prepared {
            tenant: tenant.clone(),
            built,
            params,
            salt,
            _cloud: cloud,
            stream: req.sampling.stream(),
            include_usage: req.sampling.include_usage(),
            model: req.model.clone(),
        };
        fit_context(&app, &mut p, max.is_some(), "messages")?;
        Ok(p)
    };
    let (r, upstream) = record_upstream(prep).await;
    meta.upstream = upstream;
    respond(app, r, Kind::Chat, tenant, meta).await
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion (or an SSE stream of chunks with `stream`)", content(
            (Completion = "application/json"),
            (String = "text/event-stream")
        )),
        (status = 400, body = ep_proto::ErrorBody),
        (status = 401, body = ep_proto::ErrorBody),
        (status = 404, body = ep_proto::ErrorBody),
        (status = 413, body = ep_proto::ErrorBody),
        (status = 429, description = "the queue is full (`Retry-After`)", body = ep_proto::ErrorBody),
        (status = 503, description = "the cloud is unreachable and nothing is cached (`Retry-After`)", body = ep_proto::ErrorBody),
    )
)]
async fn completions(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut meta = Meta::new();
    let prep = async {
        let (req, body_bytes): (CompletionRequest, usize) = parse(body, app.cfg.max_body_bytes)?;
        meta.body_bytes = body_bytes;
        if req.echo.unwrap_or(false) {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if let Some(b) = req.best_of.filter(|&b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                format!("only best_of = 1 is supported, not {b}"),
            ));
        }
        if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(n) if n > MAX_TOP_LOGPROBS as u64 => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be at most {MAX_TOP_LOGPROBS}"),
                ))
            }
            Some(n) => Some(n as usize),
        };
        let prompt = match req.prompt {
            PromptInput::Text(t) => CompletionPrompt::Text(t),
            PromptInput::Texts(mut v) if v.len() == 1 => CompletionPrompt::Text(v.remove(0)),
            PromptInput::Tokens(t) => CompletionPrompt::Tokens(t),
            PromptInput::TokenLists(mut v) if v.len() == 1 => CompletionPrompt::Tokens(v.remove(0)),
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "exactly one prompt per request is supported",
                ))
            }
        };
        match &prompt {
            CompletionPrompt::Text(t) if t.is_empty() => {
                return Err(ApiError::invalid("prompt", "the prompt is empty"))
            }
            CompletionPrompt::Tokens(t) if t.is_empty() => {
                return Err(ApiError::invalid("prompt", "the prompt is empty"))
            }
            _ => {}
        }
        let cloud_name = split_model(&app, &req.model)?;
        let params = params(
            &app,
            &req.sampling,
            // OpenAI's default of 16, within this server's limit (only an explicit value is refused).
            Some(req.sampling.max_tokens.unwrap_or_else(|| {
                let limit = app.cfg.max_tokens_limit.unwrap_or(16);
                16.min(u64::try_from(limit).unwrap_or(u64::MAX))
            })),
            logprobs,
        )?;
        let edge = edge_prompt(&app, &tenant, req.sampling.edge_prompt.as_deref())?;
        let cloud = resolve_cloud(&app, cloud_name).await;
        let texts: Vec<&str> = match &prompt {
            CompletionPrompt::Text(t) => vec![t.as_str()],
            CompletionPrompt::Tokens(_) => Vec::new(),
        };
        meta.note(cloud_name, edge.as_ref(), &texts);
        let cloud = cloud?;
        let built =
            app.renderer()
                .build_completion_prompt(cloud.as_deref(), edge.as_ref(), prompt)?;
        let salt = note_salt(&app, &tenant, req.sampling.cache_salt.as_deref())?;
        let mut p = Prepared {
            tenant: tenant.clone(),
            built,
            params,
            salt,
            _cloud: cloud,
            stream: req.sampling.stream(),
            include_usage: req.sampling.include_usage(),
            model: req.model.clone(),
        };
        fit_context(&app, &mut p, req.sampling.max_tokens.is_some(), "prompt")?;
        Ok(p)
    };
    let (r, upstream) = record_upstream(prep).await;
    meta.upstream = upstream;
    respond(app, r, Kind::Completion, tenant, meta).await
}

/// Runs a prepared request, or answers its error (counted, and in the tenant's audit).
async fn respond(
    app: Shared,
    r: Result<Prepared, ApiError>,
    kind: Kind,
    tenant: String,
    meta: Meta,
) -> Response {
    match r {
        Ok(p) => run(app, p, kind, meta).await,
        Err(e) => {
            app.metrics.errors.inc();
            let row = meta.row(
                app.request_id("rejected"),
                kind,
                None,
                e.status.as_u16(),
                e.code_str(),
                None,
                0,
                0,
            );
            app.audit.push(&tenant, row);
            e.into_response()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// What a request produced so far, and its bookkeeping.
struct Tracker {
    app: Shared,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    tenant: String,
    text: String,
    logprobs: Vec<(u32, Box<TokenLogprobs>)>,
    completion_tokens: usize,
    last_token: Option<Duration>,
    ignore_eos: bool,
    sent_bytes: usize,
    started: Instant,
    meta: Meta,
    /// How the cloud prompt's KV was obtained.
    kv: Option<String>,
    /// Whether the audit row was written (else it is written as cancelled when this is dropped).
    audited: std::cell::Cell<bool>,
    _slot: Slot,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.audited.get() {
            // The client went away (a closed connection cancels the request).
            let row = self.meta.row(
                self.id.clone(),
                self.kind,
                self.kv.clone(),
                200,
                "cancelled".into(),
                None,
                self.completion_tokens,
                self.sent_bytes,
            );
            self.app.audit.push(&self.tenant, row);
        }
    }
}

impl Tracker {
    /// Takes a token event: its final text, and its log-probabilities if asked for.
    fn token(&mut self, token: u32, text: &str, elapsed: Duration, lp: Option<Box<TokenLogprobs>>) {
        self.completion_tokens += 1;
        match self.last_token {
            None => self.app.metrics.ttft.observe(elapsed.as_secs_f64()),
            Some(prev) => self
                .app
                .metrics
                .itl
                .observe(elapsed.saturating_sub(prev).as_secs_f64()),
        }
        self.last_token = Some(elapsed);
        self.text.push_str(text);
        let eog = self.app.tok.is_eog(token) && !self.ignore_eos;
        if let (Some(lp), false) = (lp, eog) {
            self.logprobs.push((token, lp));
        }
    }

    fn usage(&self, f: &Finished) -> Usage {
        Usage {
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.generated,
            total_tokens: f.prompt_tokens + f.generated,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: f.cached_tokens,
            },
        }
    }

    /// Bookkeeping of a finished request (metrics and the audit line).
    fn done(&self, f: &Finished) {
        let m = &self.app.metrics;
        m.e2e.observe(f.total.as_secs_f64());
        m.prefix_queries.inc_by(f.prompt_tokens as u64);
        m.prefix_hits.inc_by(f.cached_tokens as u64);
        m.prompt_tokens.inc_by(f.prompt_tokens as u64);
        m.generation_tokens.inc_by(f.generated as u64);
        m.success.inc();
        tracing::info!(
            target: "audit",
            tenant = %tenant_hash(&self.tenant),
            request = %self.id,
            prompt_tokens = f.prompt_tokens,
            cached_tokens = f.cached_tokens,
            imported_tokens = f.imported_tokens,
            computed_tokens = f.prompt_tokens - f.cached_tokens,
            completion_tokens = f.generated,
            bytes_up = self.meta.body_bytes,
            bytes_down = self.sent_bytes,
            ttft_ms = f.first_token.as_millis() as u64,
            total_ms = f.total.as_millis() as u64,
            finish = f.reason.as_str(),
            "request finished"
        );
        let row = self.meta.row(
            self.id.clone(),
            self.kind,
            self.kv.clone(),
            200,
            f.reason.as_str().to_string(),
            Some(f),
            f.generated,
            self.sent_bytes,
        );
        self.app.audit.push(&self.tenant, row);
        self.audited.set(true);
    }

    fn failed(&self, e: &ApiError) {
        self.app.metrics.errors.inc();
        tracing::info!(
            target: "audit",
            tenant = %tenant_hash(&self.tenant),
            request = %self.id,
            status = e.status.as_u16(),
            completion_tokens = self.completion_tokens,
            bytes_up = self.meta.body_bytes,
            bytes_down = self.sent_bytes,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "request failed"
        );
        let row = self.meta.row(
            self.id.clone(),
            self.kind,
            self.kv.clone(),
            e.status.as_u16(),
            e.code_str(),
            None,
            self.completion_tokens,
            self.sent_bytes,
        );
        self.app.audit.push(&self.tenant, row);
        self.audited.set(true);
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let b = self.app.tok.token_bytes(id).to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    fn chat_logprobs(&self, items: &[(u32, Box<TokenLogprobs>)]) -> ChatLogprobs {
        ChatLogprobs {
            content: items
                .iter()
                .map(|(t, lp)| {
                    let (token, bytes) = self.token_text(*t);
                    TokenLogprob {
                        token,
                        logprob: lp.logprob,
                        bytes,
                        top_logprobs: lp
                            .top
                            .iter()
                            .map(|&(id, l)| {
                                let (token, bytes) = self.token_text(id);
                                TopLogprob {
                                    token,
                                    logprob: l,
                                    bytes,
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    fn completion_logprobs(
        &self,
        items: &[(u32, Box<TokenLogprobs>)],
        offset: usize,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let mut at = offset;
        for (t, lp) in items {
            let (token, bytes) = self.token_text(*t);
            out.text_offset.push(at);
            at += bytes.len();
            out.tokens.push(token);
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs.push(
                lp.top
                    .iter()
                    .map(|&(id, l)| (self.token_text(id).0, l))
                    .collect::<BTreeMap<_, _>>(),
            );
        }
        out
    }
}

async fn run(app: Shared, p: Prepared, kind: Kind, meta: Meta) -> Response {
    let slot = match Slot::take(&app) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let mut req = Request::new(p.built.tokens, p.params);
    req.public_prefix = p.built.public_prefix;
    req.salt = Some(p.salt);
    // KV that came through a lossy codec lives under that codec's root.
    req.kv_codec = p
        ._cloud
        .as_ref()
        .map_or(ep_kv::identity::CODEC_RAW, |c| c.codec);
    let ignore_eos = req.params.ignore_eos;
    let stream = match app.engine.submit(req) {
        Ok(s) => s,
        Err(e) => {
            app.metrics.errors.inc();
            return ApiError::from(e).into_response();
        }
    };
    let t = Tracker {
        kind,
        id: app.request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
        model: p.model,
        tenant: p.tenant,
        text: String::new(),
        logprobs: Vec::new(),
        completion_tokens: 0,
        last_token: None,
        ignore_eos,
        sent_bytes: 0,
        started: Instant::now(),
        kv: p._cloud.as_ref().map(|c| c.strategy.clone()),
        meta,
        audited: std::cell::Cell::new(false),
        _slot: slot,
        app: app.clone(),
    };
    let cloud = p._cloud;
    if p.stream {
        stream_response(t, stream, p.include_usage, cloud).into_response()
    } else {
        whole_response(t, stream, cloud).await
    }
}

async fn whole_response(
    mut t: Tracker,
    mut stream: ep_engine::RequestStream,
    _cloud: Option<Arc<ReadyPrompt>>,
) -> Response {
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token {
                token,
                text,
                elapsed,
                logprobs,
            } => t.token(token, &text, elapsed, logprobs),
            Event::Kv(_) => {}
            Event::Error(f) => {
                let e = ApiError::from(&f);
                t.failed(&e);
                return e.into_response();
            }
            Event::Done(f) => {
                t.text.push_str(&f.text_tail);
                let usage = t.usage(&f);
                let reason = f.reason.as_str().to_string();
                let body = match t.kind {
                    Kind::Chat => serde_json::to_vec(&ChatCompletion {
                        id: t.id.clone(),
                        object: "chat.completion".into(),
                        created: t.created,
                        model: t.model.clone(),
                        choices: vec![ChatChoice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant".into(),
                                content: std::mem::take(&mut t.text),
                            },
                            logprobs: (!t.logprobs.is_empty())
                                .then(|| t.chat_logprobs(&t.logprobs)),
                            finish_reason: reason,
                        }],
                        usage,
                    }),
                    Kind::Completion => serde_json::to_vec(&Completion {
                        id: t.id.clone(),
                        object: "text_completion".into(),
                        created: t.created,
                        model: t.model.clone(),
                        choices: vec![CompletionChoice {
                            index: 0,
                            logprobs: (!t.logprobs.is_empty())
                                .then(|| t.completion_logprobs(&t.logprobs, 0)),
                            text: std::mem::take(&mut t.text),
                            finish_reason: Some(reason),
                        }],
                        usage: Some(Some(usage)),
                    }),
                }
                .expect("responses serialise");
                t.sent_bytes = body.len();
                t.done(&f);
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
        }
    }
    let e = ApiError::unavailable("the engine stopped", 5);
    t.failed(&e);
    e.into_response()
}

/// State of an SSE response: events to send, then the next engine event.
struct Streaming {
    t: Tracker,
    stream: Option<ep_engine::RequestStream>,
    out: VecDeque<String>,
    include_usage: bool,
    first: bool,
    /// Bytes of generated text already sent (completions' logprob offsets).
    text_sent: usize,
    _cloud: Option<Arc<ReadyPrompt>>,
}

impl Streaming {
    fn push<T: Serialize>(&mut self, v: &T) {
        let s = serde_json::to_string(v).expect("chunks serialise");
        self.t.sent_bytes += s.len() + 8;
        self.out.push_back(s);
    }

    fn usage_field(&self, u: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(u)
    }

    fn chunk(&mut self, text: String, lp: Vec<(u32, Box<TokenLogprobs>)>, finish: Option<String>) {
        let t = &self.t;
        match t.kind {
            Kind::Chat => {
                let c = ChatCompletionChunk {
                    id: t.id.clone(),
                    object: "chat.completion.chunk".into(),
                    created: t.created,
                    model: t.model.clone(),
                    choices: vec![ChatChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: None,
                            content: (!text.is_empty()).then_some(text),
                        },
                        logprobs: (!lp.is_empty()).then(|| t.chat_logprobs(&lp)),
                        finish_reason: finish,
                    }],
                    usage: self.usage_field(None),
                };
                self.push(&c);
            }
            Kind::Completion => {
                let offset = self.text_sent;
                self.text_sent += text.len();
                let c = Completion {
                    id: t.id.clone(),
                    object: "text_completion".into(),
                    created: t.created,
                    model: t.model.clone(),
                    choices: vec![CompletionChoice {
                        index: 0,
                        logprobs: (!lp.is_empty()).then(|| t.completion_logprobs(&lp, offset)),
                        text,
                        finish_reason: finish,
                    }],
                    usage: self.usage_field(None),
                };
                self.push(&c);
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> bool {
        if self.first && self.t.kind == Kind::Chat {
            self.first = false;
            let t = &self.t;
            let c = ChatCompletionChunk {
                id: t.id.clone(),
                object: "chat.completion.chunk".into(),
                created: t.created,
                model: t.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                usage: self.usage_field(None),
            };
            self.push(&c);
        }
        match ev {
            Event::Token {
                token,
                text,
                elapsed,
                logprobs,
            } => {
                let before = self.t.logprobs.len();
                self.t.token(token, &text, elapsed, logprobs);
                let lp: Vec<_> = self.t.logprobs.drain(before..).collect();
                if !text.is_empty() || !lp.is_empty() {
                    self.chunk(text, lp, None);
                }
                true
            }
            Event::Kv(_) => true,
            Event::Done(f) => {
                self.t.text.push_str(&f.text_tail);
                self.chunk(
                    f.text_tail.clone(),
                    Vec::new(),
                    Some(f.reason.as_str().into()),
                );
                if self.include_usage {
                    let usage = self.t.usage(&f);
                    let t = &self.t;
                    match t.kind {
                        Kind::Chat => {
                            let c = ChatCompletionChunk {
                                id: t.id.clone(),
                                object: "chat.completion.chunk".into(),
                                created: t.created,
                                model: t.model.clone(),
                                choices: vec![],
                                usage: Some(Some(usage)),
                            };
                            self.push(&c);
                        }
                        Kind::Completion => {
                            let c = Completion {
                                id: t.id.clone(),
                                object: "text_completion".into(),
                                created: t.created,
                                model: t.model.clone(),
                                choices: vec![],
                                usage: Some(Some(usage)),
                            };
                            self.push(&c);
                        }
                    }
                }
                self.t.done(&f);
                self.out.push_back("[DONE]".into());
                false
            }
            Event::Error(f) => {
                let e = ApiError::from(&f);
                self.t.failed(&e);
                let body = e.body.clone();
                self.push(&body);
                self.out.push_back("[DONE]".into());
                false
            }
        }
    }
}

fn stream_response(
    t: Tracker,
    stream: ep_engine::RequestStream,
    include_usage: bool,
    cloud: Option<Arc<ReadyPrompt>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let st = Streaming {
        t,
        stream: Some(stream),
        out: VecDeque::new(),
        include_usage,
        first: true,
        text_sent: 0,
        _cloud: cloud,
    };
    // Dropping this stream (the client went away) drops the engine's stream, which cancels it.
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.out.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            let ev = match st.stream.as_mut() {
                None => return None,
                Some(s) => s.next().await,
            };
            match ev {
                Some(ev) => {
                    if !st.on_event(ev) {
                        st.stream = None;
                    }
                }
                None => {
                    let e = ApiError::unavailable("the engine stopped", 5);
                    st.t.failed(&e);
                    let body = e.body.clone();
                    st.push(&body);
                    st.out.push_back("[DONE]".into());
                    st.stream = None;
                }
            }
        }
    });
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[utoipa::path(
    get,
    path = "/v1/models",
    responses((status = 200, body = ModelList), (status = 401, body = ep_proto::ErrorBody))
)]
async fn list_models(State(app): State<Shared>) -> Result<Json<ModelList>, ApiError> {
    let card = |id: String, created: u64, owned_by: &str| ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by: owned_by.into(),
    };
    let mut data = vec![card(app.cfg.model_id.clone(), app.started, "edgeprompt")];
    if let Some(f) = &app.fetcher {
        // The cloud's list now (cached ones when it is down); an unreachable cloud lists none.
        match f.list().await {
            Ok(list) => data.extend(list.into_iter().map(|p| {
                card(
                    format!("{}:{}", app.cfg.model_id, p.name),
                    p.created_at,
                    "cloud",
                )
            })),
            Err(e) => tracing::warn!("cannot list cloud prompts: {e}"),
        }
    }
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/edge-prompts",
    request_body = CreateEdgePrompt,
    responses((status = 200, body = EdgePromptInfo), (status = 400, body = ep_proto::ErrorBody))
)]
async fn create_edge_prompt(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EdgePromptInfo>, ApiError> {
    let (req, _): (CreateEdgePrompt, usize) = parse(body, app.cfg.max_body_bytes)?;
    let name = req.name.trim();
    if name.is_empty()
        || name.chars().count() > 128
        || name.contains(['/', ':'])
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "name",
            "an edge prompt name has 1 to 128 characters, without '/', ':' or control characters",
        ));
    }
    let content = match (req.text, req.messages) {
        (Some(t), None) if !t.is_empty() => EdgePromptContent::Text(t),
        (None, Some(m)) if !m.is_empty() => {
            for (i, msg) in m.iter().enumerate() {
                check_role(&msg.role, &format!("messages[{i}].role"))?;
            }
            EdgePromptContent::Messages(m)
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either 'text' or 'messages', not both",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "one of 'text' or 'messages' is required and must not be empty",
            ))
        }
    };
    let p = EdgePrompt {
        name: name.to_string(),
        content,
        created: unix_now(),
    };
    if p.bytes() > app.cfg.max_edge_prompt_bytes {
        return Err(ApiError::invalid(
            "text",
            format!(
                "the edge prompt has {} bytes, more than the {} allowed",
                p.bytes(),
                app.cfg.max_edge_prompt_bytes
            ),
        ));
    }
    let info = p.info();
    if !app.tenants.put(&tenant, p, app.cfg.max_edge_prompts) {
        return Err(ApiError::invalid(
            "name",
            format!(
                "this tenant already has {} edge prompts",
                app.cfg.max_edge_prompts
            ),
        ));
    }
    Ok(Json(info))
}

#[utoipa::path(get, path = "/v1/edge-prompts", responses((status = 200, body = EdgePromptList)))]
async fn list_edge_prompts(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
) -> Json<EdgePromptList> {
    Json(EdgePromptList {
        object: "list".into(),
        data: app.tenants.list(&tenant),
    })
}

async fn purge_tenant(app: &App, tenant: &str) -> Result<usize, ApiError> {
    let mut n = 0;
    for s in app.tenants.take_salts(tenant) {
        n += app.engine.purge_salt(s).await?;
    }
    Ok(n)
}

#[utoipa::path(
    delete,
    path = "/v1/edge-prompts/{name}",
    params(("name" = String, Path, description = "The edge prompt")),
    responses((status = 200, body = Purged), (status = 404, body = ep_proto::ErrorBody))
)]
async fn delete_edge_prompt(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
    Path(name): Path<String>,
) -> Result<Json<Purged>, ApiError> {
    if !app.tenants.remove(&tenant, &name) {
        return Err(ApiError::not_found(
            "edge_prompt_not_found",
            format!("unknown edge prompt '{name}'"),
        ));
    }
    let purged_blocks = purge_tenant(&app, &tenant).await?;
    Ok(Json(Purged {
        deleted: Some(name),
        purged_blocks,
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/self/cache",
    responses((status = 200, body = Purged))
)]
async fn purge_cache(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
) -> Result<Json<Purged>, ApiError> {
    let purged_blocks = purge_tenant(&app, &tenant).await?;
    app.audit.forget(&tenant);
    Ok(Json(Purged {
        deleted: None,
        purged_blocks,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    responses(
        (status = 200, description = "The caller's requests with what each sent to the cloud, and the edge's KV state", body = audit::Audit),
        (status = 401, body = ep_proto::ErrorBody),
    )
)]
async fn get_audit(
    State(app): State<Shared>,
    axum::Extension(Tenant(tenant)): axum::Extension<Tenant>,
) -> Json<audit::Audit> {
    let st = app.engine.stats();
    let f = app.fetcher.as_ref();
    let (decisions, counts) = f.map(|f| f.decisions()).unwrap_or_default();
    Json(audit::Audit {
        tenant: tenant_hash(&tenant),
        requests: app.audit.rows(&tenant),
        cloud: f.is_some(),
        cloud_prompts: f.map(|f| f.held()).unwrap_or_default(),
        kv_memory: audit::KvMemory {
            budget_bytes: st.kv_budget_bytes,
            used_bytes: st.kv_used_bytes,
            cached_blocks: st.cached_blocks,
            running: st.running,
            waiting: st.waiting,
        },
        link: f.and_then(|f| f.link()).map(|l| audit::Link {
            rtt_ms: l.rtt_s * 1e3,
            mbit_per_s: l.bytes_per_s * 8e-6,
            rtt_samples: l.rtt_samples,
            rate_samples: l.rate_samples,
        }),
        planner_ready: f.is_some_and(|f| f.planner_ready()),
        decisions,
        decision_counts: counts
            .into_iter()
            .map(|(strategy, count)| audit::DecisionCount { strategy, count })
            .collect(),
        upstream: f.map(|f| {
            let t = f.traffic();
            audit::Upstream {
                bytes_up: t.bytes_up,
                bytes_down: t.bytes_down,
                requests: t.requests,
                kv_bytes: t.kv_bytes,
                recent: f.upstream_recent(),
            }
        }),
    })
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = ep_proto::Health)))]
async fn health(State(app): State<Shared>) -> Json<ep_proto::Health> {
    Json(ep_proto::Health {
        status: "ok".into(),
        role: "edge".into(),
        identity: app.engine.identity().to_hex(),
    })
}

async fn metrics(State(app): State<Shared>) -> Response {
    let traffic = app.fetcher.as_ref().map(|f| f.traffic());
    if let Some(f) = &app.fetcher {
        app.metrics
            .set_kv_view(f.link(), &f.decisions().1, f.planner_ready());
    }
    let body = app.metrics.render(&app.engine.stats(), traffic);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn openapi(State(app): State<Shared>) -> Response {
    let limit = app
        .cfg
        .max_tokens_limit
        .unwrap_or(app.engine.config().max_seq_len.saturating_sub(1));
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    bound_max_tokens(&mut doc, limit);
    describe_limits(&mut doc, &app);
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
        .into_response()
}

/// Writes this server's bounds of `max_tokens` / `max_completion_tokens` into every schema that
/// has them (the generated description knows only their type).
fn bound_max_tokens(v: &mut serde_json::Value, limit: usize) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Object(props)) = o.get_mut("properties") {
                for name in ["max_tokens", "max_completion_tokens"] {
                    if let Some(serde_json::Value::Object(p)) = props.get_mut(name) {
                        p.insert("minimum".into(), 1.into());
                        p.insert("maximum".into(), limit.into());
                    }
                }
            }
            o.values_mut().for_each(|c| bound_max_tokens(c, limit));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| bound_max_tokens(c, limit)),
        _ => {}
    }
}

/// Writes what the derived description cannot know into the edge's OpenAPI document: this server's
/// limits (messages, stop sequences, the vocabulary of token prompts), the constraints across fields
/// the handlers check (`echo`, `top_logprobs` needs `logprobs`, exactly one of an edge prompt's
/// `text` and `messages`, a non-empty cloud prompt name) and the model ids as examples.
fn describe_limits(doc: &mut serde_json::Value, app: &App) {
    use serde_json::json;
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(|v| v.as_object_mut())
    else {
        return;
    };
    let cfg = &app.cfg;
    let model = json!({
        "type": "string",
        "description": "The model id, or `\"<model>:<cloud-prompt-name>\"` to continue a cloud prompt.",
        "pattern": "^[^:]*(:.+)?$",
        "examples": [cfg.model_id],
    });
    if let Some(c) = schemas.get_mut("SamplingFields") {
        own_properties(c)["logit_bias"]["maxProperties"] = 0.into();
    }
    if let Some(c) = schemas.get_mut("ChatCompletionRequest") {
        let p = own_properties(c);
        p["model"] = model.clone();
        p["messages"]["maxItems"] = cfg.max_messages.into();
        c["if"] = json!({"properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                         "required": ["top_logprobs"]});
        c["then"] = json!({"properties": {"logprobs": {"const": true}}, "required": ["logprobs"]});
    }
    if let Some(c) = schemas.get_mut("CompletionRequest") {
        let p = own_properties(c);
        p["model"] = model;
        p["echo"] = json!({"type": ["boolean", "null"], "enum": [false, null],
                                         "description": "Only false is supported."});
    }
    let stop = json!({"type": "string", "minLength": 1, "maxLength": cfg.max_stop_bytes});
    schemas.insert(
        "Stop".into(),
        json!({
            "description": format!("`stop`: one string or a list of at most {}, each of 1 to {} bytes.",
                                   cfg.max_stop, cfg.max_stop_bytes),
            "oneOf": [stop, {"type": "array", "items": stop, "maxItems": cfg.max_stop}],
        }),
    );
    let ids = json!({"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": 0, "maximum": app.tok.vocab_size() - 1}});
    let text = json!({"type": "string", "minLength": 1});
    schemas.insert(
        "PromptInput".into(),
        json!({
            "description": "One prompt: text, a list of one text, token ids, or a list of one list of token ids.",
            "oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
                      ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}],
        }),
    );
    if let Some(c) = schemas.get_mut("CreateEdgePrompt") {
        c["oneOf"] = json!([
            {"required": ["text"], "properties": {"text": {"type": "string"}},
             "not": {"required": ["messages"], "properties": {"messages": {"type": "array"}}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}},
             "not": {"required": ["text"], "properties": {"text": {"type": "string"}}}},
        ]);
    }
}

/// The properties a schema declares itself (beside the `allOf` a flattened struct makes).
fn own_properties(schema: &mut serde_json::Value) -> &mut serde_json::Value {
    let flat = schema
        .get("allOf")
        .and_then(|a| a.as_array())
        .and_then(|a| a.iter().position(|s| s.get("properties").is_some()));
    match flat {
        Some(i) => &mut schema["allOf"][i]["properties"],
        None => &mut schema["properties"],
    }
}
