//! The cloud's HTTP API (routes in `ep_proto`'s docs): handlers, bearer-token guard, request metrics,
//! `Range` and `ETag` handling, and the OpenAPI document.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use ep_proto::{
    CloudPromptInfo, CloudPromptList, ErrorBody, Health, Lease, PrefetchHints, RegisterCloudPrompt,
    SignedManifest,
};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;

use crate::{valid_id, ApiError, Cloud, RouteLabels};

/// `Cache-Control` of content-addressed bodies.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Bytes read from the store per chunk of a streamed body.
const CHUNK: u64 = 1 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router of a cloud.
pub(crate) fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/cloud-prompts", post(register).get(list))
        .route(
            "/v1/cloud-prompts/{name}",
            get(get_prompt).delete(delete_prompt),
        )
        .route("/v1/kv/{id}/manifest", get(manifest))
        .route("/v1/kv/{id}/stream", get(stream))
        .route("/v1/kv/{id}/frames/{layer}/{start}", get(frame))
        .route("/v1/kv/{id}/lease", post(lease))
        .route("/v1/prefetch", get(prefetch))
        .route("/v1/probe", get(probe))
        .fallback(|| async { ApiError::not_found("no such route", "unknown_route") })
        .layer(DefaultBodyLimit::max(cloud.cfg.max_body_bytes))
        .layer(axum::middleware::map_response(close_after_413))
        .layer(axum::middleware::from_fn_with_state(cloud.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(cloud.clone(), track))
        .with_state(cloud)
}

/// A body over the limit is answered without being read, so its connection cannot carry another
/// request: say so (`Connection: close`), or a client that pools connections sends its next request
/// into one the server is closing.
async fn close_after_413(mut r: Response) -> Response {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

/// Routes open without a token.
fn open_route(path: &str) -> bool {
    path == "/health" || path == "/openapi.json"
}

/// The bearer-token guard (constant-time: both sides hashed, the digests compared with `subtle`).
async fn auth(State(c): State<Arc<Cloud>>, req: Request, next: Next) -> Response {
    let Some(token) = c.cfg.token.as_deref() else {
        return next.run(req).await;
    };
    if open_route(req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        let (a, b) = (blake3::hash(g.as_bytes()), blake3::hash(token.as_bytes()));
        bool::from(a.as_bytes().ct_eq(b.as_bytes()))
    });
    if !ok {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer <token>)",
            None,
            "invalid_api_key",
        )
        .into_response();
    }
    next.run(req).await
}

/// Counts requests by route, method and status.
async fn track(State(c): State<Arc<Cloud>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let r = next.run(req).await;
    c.metrics
        .requests
        .get_or_create(&RouteLabels {
            route,
            method,
            status: r.status().as_u16(),
        })
        .inc();
    r
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "EdgePrompt cloud",
        description = "The cloud prompt registry and the signed, content-addressed KV API edges fetch from."
    ),
    paths(
        health,
        register,
        list,
        get_prompt,
        delete_prompt,
        manifest,
        stream,
        frame,
        lease,
        prefetch,
        probe,
        metrics
    ),
    components(schemas(
        RegisterCloudPrompt,
        CloudPromptInfo,
        ep_proto::KvVariant,
        CloudPromptList,
        SignedManifest,
        Lease,
        PrefetchHints,
        ErrorBody,
        Health
    ))
)]
struct ApiDoc;

/// The OpenAPI document of this API.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".into())
}

async fn openapi(State(c): State<Arc<Cloud>>) -> Response {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    describe_limits(&mut doc, &c);
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
        .into_response()
}

/// Writes what the derived description cannot know into this cloud's OpenAPI document: the codecs
/// it serves, the lease bounds, the name syntax ([`ep_proto::valid_name`]) and that a registration
/// has exactly one of `messages` and `text`, neither empty.
fn describe_limits(doc: &mut serde_json::Value, c: &Cloud) {
    use serde_json::json;
    let codecs: Vec<&str> = c
        .cfg
        .codecs
        .iter()
        .filter_map(|&k| ep_kv::codec::codec_name(k))
        .collect();
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for op in paths.values_mut().filter_map(|p| p.as_object_mut()) {
            for o in op.values_mut() {
                let Some(params) = o.get_mut("parameters").and_then(|p| p.as_array_mut()) else {
                    continue;
                };
                for p in params.iter_mut().filter(|p| p["name"] == "codec") {
                    p["schema"]["enum"] = json!(codecs);
                }
            }
        }
    }
    let Some(r) = doc.pointer_mut("/components/schemas/RegisterCloudPrompt") else {
        return;
    };
    let p = &mut r["properties"];
    p["name"]["pattern"] = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$".into();
    p["text"]["minLength"] = 1.into();
    p["messages"]["minItems"] = 1.into();
    p["lease_secs"]["minimum"] = 1.into();
    p["lease_secs"]["maximum"] = c.cfg.max_lease_secs.into();
    r["oneOf"] = json!([
        {"required": ["text"], "properties": {"text": {"type": "string"}},
         "not": {"required": ["messages"], "properties": {"messages": {"type": "array"}}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}},
         "not": {"required": ["text"], "properties": {"text": {"type": "string"}}}},
    ]);
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health(State(c): State<Arc<Cloud>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        role: "cloud".into(),
        identity: c.identity_hex.clone(),
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text")))]
async fn metrics(State(c): State<Arc<Cloud>>) -> Response {
    let mut s = String::new();
    if prometheus_client::encoding::text::encode(&mut s, &c.metrics.registry).is_err() {
        return ApiError::internal("cannot encode the metrics").into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s,
    )
        .into_response()
}

#[utoipa::path(
    post, path = "/v1/cloud-prompts", request_body = RegisterCloudPrompt,
    responses(
        (status = 202, description = "a new version, queued", body = CloudPromptInfo),
        (status = 200, description = "the content is the current version already", body = CloudPromptInfo),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody)
    )
)]
async fn register(
    State(c): State<Arc<Cloud>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, r.body_text(), None, code)
    })?;
    let bad = |e: serde_json::Error| {
        ApiError::bad(format!("invalid JSON body: {e}"), None, "invalid_json")
    };
    let mut v: serde_json::Value = serde_json::from_slice(&body).map_err(bad)?;
    integral_numbers(&mut v);
    let req: RegisterCloudPrompt = serde_json::from_value(v).map_err(bad)?;
    let (info, new) = c.register(req).await?;
    let status = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

/// Writes numbers with a zero fraction (`5.0`) as integers, as JSON Schema counts them.
fn integral_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                *v = (f as u64).into();
            } else if f.fract() == 0.0 && (-9.223_372_036_854_776e18..0.0).contains(&f) {
                *v = (f as i64).into();
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(o) => o.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

#[utoipa::path(get, path = "/v1/cloud-prompts", responses((status = 200, body = CloudPromptList)))]
async fn list(State(c): State<Arc<Cloud>>) -> ApiResult<Json<CloudPromptList>> {
    Ok(Json(CloudPromptList {
        data: c.list().await?,
    }))
}

#[utoipa::path(
    get, path = "/v1/cloud-prompts/{name}", params(("name" = String, Path)),
    responses((status = 200, body = CloudPromptInfo), (status = 404, body = ErrorBody))
)]
async fn get_prompt(
    State(c): State<Arc<Cloud>>,
    Path(name): Path<String>,
) -> ApiResult<Json<CloudPromptInfo>> {
    Ok(Json(c.get(&name).await?))
}

#[utoipa::path(
    delete, path = "/v1/cloud-prompts/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody))
)]
async fn delete_prompt(
    State(c): State<Arc<Cloud>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    c.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The query of the KV routes: which encoding (`codec`, default raw), and for the stream, the first
/// token whose frames it carries (`from`, a frame boundary; the header always comes first).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct KvQuery {
    /// `raw` (default), `int8` or `int4`.
    codec: Option<String>,
    /// Stream only: send the frames of tokens from here on (each layer's), after the header.
    from: Option<u32>,
}

impl KvQuery {
    fn codec(&self, c: &Cloud) -> ApiResult<u8> {
        let Some(name) = self.codec.as_deref() else {
            return Ok(ep_kv::identity::CODEC_RAW);
        };
        match ep_kv::codec::parse(name) {
            Some(codec) if c.cfg.codecs.contains(&codec) => Ok(codec),
            _ => Err(ApiError::bad(
                format!(
                    "unknown KV codec '{name}'; this cloud serves {}",
                    c.cfg
                        .codecs
                        .iter()
                        .filter_map(|&k| ep_kv::codec::codec_name(k))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some("codec"),
                "invalid_codec",
            )),
        }
    }
}

/// A route's query, or a 400 naming what is wrong with it (and `param`, when there is one).
fn query<T>(q: Result<Query<T>, QueryRejection>, param: Option<&str>) -> ApiResult<T> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::bad(
            format!("bad query: {}", e.body_text()),
            param,
            "invalid_query",
        )
    })
}

async fn stored(c: &Cloud, id: &str, codec: u8) -> ApiResult<Arc<crate::StoredManifest>> {
    let unknown = || ApiError::not_found(format!("no KV {id}"), "kv_not_found");
    if !valid_id(id) {
        return Err(unknown());
    }
    c.manifest_codec(id, codec).await?.ok_or_else(unknown)
}

/// The ETag of the KV of `id` in `codec` (from token `from`, for a stream).
fn kv_etag(id: &str, codec: u8, from: u32) -> String {
    let key = crate::kv_key(id, codec);
    if from == 0 {
        format!("\"{key}\"")
    } else {
        format!("\"{key}@{from}\"")
    }
}

/// The byte segments of the stored stream that make the stream from token `from`: the header, then
/// every layer's frames starting at `from` or later (contiguous runs merged). `None` when `from` is
/// not a frame boundary.
pub fn stream_segments(m: &ep_proto::Manifest, from: u32) -> Option<Vec<(u64, u64)>> {
    if from == 0 {
        return Some(vec![(0, m.stream_bytes)]);
    }
    if !m.frames.iter().any(|f| f.start == from) {
        return None;
    }
    let mut segs: Vec<(u64, u64)> = vec![(0, m.header_bytes)];
    for f in m.frames.iter().filter(|f| f.start >= from) {
        let (s, e) = (f.offset, f.offset + f.bytes);
        match segs.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => segs.push((s, e)),
        }
    }
    Some(segs)
}

/// Whether `If-None-Match` lists `etag` (or `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn cached_headers(b: axum::http::response::Builder, etag: &str) -> axum::http::response::Builder {
    b.header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, crate::http::IMMUTABLE)
}

fn not_modified_response(etag: &str) -> Response {
    cached_headers(Response::builder().status(StatusCode::NOT_MODIFIED), etag)
        .body(Body::empty())
        .expect("static response")
}

#[utoipa::path(
    get, path = "/v1/kv/{id}/manifest", params(("id" = String, Path), KvQuery),
    responses(
        (status = 200, body = SignedManifest), (status = 304),
        (status = 400, description = "a bad query (`codec`)", body = ErrorBody),
        (status = 404, body = ErrorBody)
    )
)]
async fn manifest(
    State(c): State<Arc<Cloud>>,
    Path(id): Path<String>,
    q: Result<Query<KvQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let q = query(q, None)?;
    let codec = q.codec(&c)?;
    let m = stored(&c, &id, codec).await?;
    let etag = kv_etag(&id, codec, 0);
    if not_modified(&headers, &etag) {
        return Ok(not_modified_response(&etag));
    }
    Ok(cached_headers(Response::builder(), &etag)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(m.json.clone()))
        .expect("valid response"))
}

/// A range that lies past the end of the body (HTTP 416).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `Range: bytes=…` header against a body of `len` bytes: `Ok(None)` to send the whole body (absent,
/// not bytes, several ranges or malformed), `Err(Unsatisfiable)` past the end, else `start..end`.
pub fn parse_range(value: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(Unsatisfiable);
        }
        return Ok(Some((len.saturating_sub(n), len)));
    }
    let Ok(start) = a.parse::<u64>() else {
        return Ok(None);
    };
    let end = if b.is_empty() {
        len
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.saturating_add(1).min(len),
            _ => return Ok(None),
        }
    };
    if start >= len {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// A body of bytes `start..end` of the stream made of `segs` (byte ranges of the stored stream of
/// `key`, in order), read from the store a chunk at a time.
/// `frame_offsets` (sorted) are where the stored stream's frames begin: a frame counts as served when
/// its first byte is sent, so a whole stream counts each frame once however it is split in ranges.
fn stream_body(
    c: Arc<Cloud>,
    key: String,
    segs: Vec<(u64, u64)>,
    frame_offsets: Arc<Vec<u64>>,
    start: u64,
    end: u64,
) -> Body {
    let s = futures_util::stream::try_unfold(start, move |pos| {
        let (c, key) = (c.clone(), key.clone());
        let (segs, frame_offsets) = (segs.clone(), frame_offsets.clone());
        async move {
            if pos >= end {
                return Ok::<_, std::io::Error>(None);
            }
            // The segment holding virtual offset `pos`, and where it starts in the stored stream.
            let mut base = 0u64;
            let mut at = None;
            for &(s, e) in &segs {
                if pos < base + (e - s) {
                    at = Some((s + (pos - base), base + (e - s)));
                    break;
                }
                base += e - s;
            }
            let Some((stored_pos, seg_end)) = at else {
                return Ok(None);
            };
            let n = CHUNK.min(end - pos).min(seg_end - pos);
            let b = c
                .store
                .get_stream_range(&key, stored_pos, stored_pos + n)
                .await
                .map_err(std::io::Error::other)?;
            if b.is_empty() {
                return Err(std::io::Error::other(
                    "the stored stream is shorter than its manifest",
                ));
            }
            c.metrics.kv_bytes.inc_by(b.len() as u64);
            let (a, z) = (stored_pos, stored_pos + b.len() as u64);
            let frames = frame_offsets.partition_point(|&o| o < z)
                - frame_offsets.partition_point(|&o| o < a);
            c.metrics.frames.inc_by(frames as u64);
            let next = pos + b.len() as u64;
            Ok(Some((b, next)))
        }
    });
    Body::from_stream(s)
}

#[utoipa::path(
    get, path = "/v1/kv/{id}/stream", params(("id" = String, Path), KvQuery),
    responses(
        (status = 200, description = "the whole EPKV stream", content_type = "application/octet-stream"),
        (status = 206, description = "the requested byte range", content_type = "application/octet-stream"),
        (status = 304),
        (status = 400, description = "a bad query (`codec`, `from`)", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 416)
    )
)]
async fn stream(
    State(c): State<Arc<Cloud>>,
    Path(id): Path<String>,
    q: Result<Query<KvQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let q = query(q, None)?;
    let codec = q.codec(&c)?;
    let m = stored(&c, &id, codec).await?;
    let from = q.from.unwrap_or(0);
    let segs = stream_segments(&m.signed.manifest, from).ok_or_else(|| {
        ApiError::bad(
            format!("'from' {from} is not the first token of a frame of {id}"),
            Some("from"),
            "invalid_from",
        )
    })?;
    let len: u64 = segs.iter().map(|(s, e)| e - s).sum();
    let key = crate::kv_key(&id, codec);
    let mut offsets: Vec<u64> = m.signed.manifest.frames.iter().map(|f| f.offset).collect();
    offsets.sort_unstable();
    let offsets = Arc::new(offsets);
    let etag = kv_etag(&id, codec, from);
    if not_modified(&headers, &etag) {
        return Ok(not_modified_response(&etag));
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let b = cached_headers(Response::builder(), &etag)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes");
    let r = match parse_range(range, len) {
        Err(Unsatisfiable) => b
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty()),
        Ok(None) => b.header(header::CONTENT_LENGTH, len).body(stream_body(
            c.clone(),
            key,
            segs,
            offsets,
            0,
            len,
        )),
        Ok(Some((s, e))) => b
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {s}-{}/{len}", e - 1))
            .header(header::CONTENT_LENGTH, e - s)
            .body(stream_body(c.clone(), key, segs, offsets, s, e)),
    };
    r.map_err(ApiError::internal)
}

#[utoipa::path(
    get, path = "/v1/kv/{id}/frames/{layer}/{start}",
    params(("id" = String, Path), ("layer" = u32, Path), ("start" = u32, Path), KvQuery),
    responses(
        (status = 200, description = "one EPKF frame", content_type = "application/octet-stream"),
        (status = 304),
        (status = 400, description = "a bad query (`codec`)", body = ErrorBody),
        (status = 404, body = ErrorBody)
    )
)]
async fn frame(
    State(c): State<Arc<Cloud>>,
    Path((id, layer, start)): Path<(String, String, String)>,
    q: Result<Query<KvQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let q = query(q, None)?;
    let codec = q.codec(&c)?;
    let m = stored(&c, &id, codec).await?;
    let none = || {
        ApiError::not_found(
            format!("no frame {layer}/{start} in {id}"),
            "frame_not_found",
        )
    };
    let (layer, start): (u32, u32) = match (layer.parse(), start.parse()) {
        (Ok(l), Ok(s)) => (l, s),
        _ => return Err(none()),
    };
    let f = m
        .signed
        .manifest
        .frames
        .iter()
        .find(|f| f.layer == layer && f.start == start)
        .ok_or_else(none)?;
    let etag = format!("\"{}\"", f.digest);
    if not_modified(&headers, &etag) {
        return Ok(not_modified_response(&etag));
    }
    let b = c
        .store
        .get_stream_range(&crate::kv_key(&id, codec), f.offset, f.offset + f.bytes)
        .await?;
    if b.len() as u64 != f.bytes {
        return Err(ApiError::internal(format!(
            "the stored stream of {id} is shorter than its manifest"
        )));
    }
    c.metrics.kv_bytes.inc_by(b.len() as u64);
    c.metrics.frames.inc();
    cached_headers(Response::builder(), &etag)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, b.len())
        .body(Body::from(b))
        .map_err(ApiError::internal)
}

#[utoipa::path(
    post, path = "/v1/kv/{id}/lease", params(("id" = String, Path)),
    responses((status = 200, body = Lease), (status = 404, body = ErrorBody))
)]
async fn lease(State(c): State<Arc<Cloud>>, Path(id): Path<String>) -> ApiResult<Json<Lease>> {
    Ok(Json(c.renew(&id).await?))
}

#[utoipa::path(get, path = "/v1/prefetch", responses((status = 200, body = PrefetchHints)))]
async fn prefetch(State(c): State<Arc<Cloud>>) -> ApiResult<Json<PrefetchHints>> {
    Ok(Json(c.prefetch().await?))
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Unsatisfiable};

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=2-"), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some("bytes=2-4"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=2-40"), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=4-2"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=1-2,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=1-2"), 10), Ok(None));
    }
}

/// The query of `GET /v1/probe`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ProbeQuery {
    /// Bytes to send, 1 to 16 MiB.
    #[param(minimum = 1, maximum = 16777216)]
    bytes: u64,
}

/// Largest probe body.
pub const PROBE_MAX_BYTES: u64 = 16 << 20;

/// Incompressible bytes for link probes (a fixed pseudo-random block, repeated).
fn probe_block() -> Bytes {
    static BLOCK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BLOCK
        .get_or_init(|| {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut v = Vec::with_capacity(CHUNK as usize);
            while v.len() < CHUNK as usize {
                // xorshift64*: cheap bytes no link compresses.
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            Bytes::from(v)
        })
        .clone()
}

#[utoipa::path(
    get, path = "/v1/probe", params(ProbeQuery),
    responses(
        (status = 200, description = "`bytes` incompressible bytes, for edges measuring the link", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody)
    )
)]
async fn probe(q: Result<Query<ProbeQuery>, QueryRejection>) -> ApiResult<Response> {
    let q = query(q, Some("bytes"))?;
    if q.bytes == 0 || q.bytes > PROBE_MAX_BYTES {
        return Err(ApiError::bad(
            format!("'bytes' must be between 1 and {PROBE_MAX_BYTES}"),
            Some("bytes"),
            "invalid_bytes",
        ));
    }
    let total = q.bytes;
    let s = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(CHUNK);
        Some((
            Ok::<_, std::io::Error>(probe_block().slice(..n as usize)),
            sent + n,
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, total)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(s))
        .map_err(ApiError::internal)
}
