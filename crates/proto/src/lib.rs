//! The cloud–edge API of EdgePrompt: the serde types both sides speak over HTTP (the cloud prompt
//! registry, the signed KV manifest, errors in OpenAI's shape) and the manifest's signature. Nothing
//! here knows the engine; the KV bytes themselves are `ep_kv::wire` streams.
//!
//! **Routes** (cloud; every one but `/health` needs `Authorization: Bearer <token>` when the cloud has
//! a token):
//! - `POST /v1/cloud-prompts` ([`RegisterCloudPrompt`] → [`CloudPromptInfo`]), `GET /v1/cloud-prompts`
//!   ([`CloudPromptList`]), `GET /v1/cloud-prompts/{name}` ([`CloudPromptInfo`]), `DELETE
//!   /v1/cloud-prompts/{name}`.
//! - `GET /v1/kv/{id}/manifest` ([`SignedManifest`]); `GET /v1/kv/{id}/stream` (the whole `EPKV`
//!   stream, layer-major, `Range` supported); `GET /v1/kv/{id}/frames/{layer}/{start}` (one `EPKF`
//!   frame as listed in the manifest); `POST /v1/kv/{id}/lease` ([`Lease`]); `GET /v1/prefetch`
//!   ([`PrefetchHints`]). Content-addressed bodies carry `ETag` and `Cache-Control: immutable`.
//! - Open without a token: `GET /health` ([`Health`]) and `GET /openapi.json`; `GET /metrics`
//!   (Prometheus text) needs the token like the rest.
//!
//! **Status codes.** Registration answers 202 with the new version (`queued`), or 200 when the content
//! is already the name's current version (nothing recomputed). Errors are [`ErrorBody`] with `code`:
//! 400 `invalid_json` (malformed, or an unknown field), `invalid_content` (both or neither of
//! `messages` / `text`, or empty), `invalid_name` (names are 1 to 64 of `[A-Za-z0-9._-]`, not starting
//! with `.`), `invalid_lease`, `render_failed` (e.g. messages for a model without a chat template),
//! `prompt_too_long`; 413 `body_too_large`; 401 `invalid_api_key` (with `WWW-Authenticate: Bearer`);
//! 404 `prompt_not_found`, `kv_not_found`, `frame_not_found`, `unknown_route`. `DELETE` answers 204.
//! The stream's and manifest's `ETag` is the quoted id, a frame's its quoted payload digest;
//! `If-None-Match` → 304. `Range: bytes=a-b`, `a-` or `-n` → 206 with `Content-Range`; past the end →
//! 416 with `Content-Range: bytes */len`; several ranges → the whole body (200).
//!
//! **Leases.** A superseded version is servable until `lease_until` (its registration's `lease_secs`
//! after it was superseded or last renewed); `POST /v1/kv/{id}/lease` renews it (for a current version
//! it only reports `now + lease_secs`). Expired versions are collected with their KV, unless another
//! version names the same id.
//!
//! **Signature.** The cloud signs [`Manifest::signing_bytes`] — the domain tag
//! [`MANIFEST_SIGNING_DOMAIN`] followed by the manifest's JSON as `serde_json` writes this struct (fields
//! in declaration order, no maps, so the bytes are a function of the values) — with Ed25519. An edge
//! checks the signature against a pinned public key before it uses anything the manifest names: KV is
//! a prompt, and injected KV would be an undetectable prompt injection.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Prefix of the bytes a manifest signature covers.
pub const MANIFEST_SIGNING_DOMAIN: &[u8] = b"edgeprompt/kv-manifest/v1\n";
/// The manifest format tag.
pub const MANIFEST_FORMAT: &str = "edgeprompt-kv-manifest/1";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a cloud prompt is: chat messages (typically one long system message), rendered with the
/// model's chat template as the prefix an edge conversation extends, or plain text (the prefix of
/// completions; special-token text in it is parsed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptContent {
    Messages(Vec<Message>),
    Text(String),
}

/// `POST /v1/cloud-prompts`: exactly one of `messages` and `text`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterCloudPrompt {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// How long a superseded version stays servable after edges last renewed it (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u64>,
}

impl RegisterCloudPrompt {
    /// The content, or what is wrong with the request.
    pub fn content(&self) -> Result<PromptContent, String> {
        match (&self.messages, &self.text) {
            (Some(_), Some(_)) => Err("give either 'messages' or 'text', not both".into()),
            (None, None) => Err("one of 'messages' or 'text' is required".into()),
            (Some(m), None) if m.is_empty() => Err("'messages' is empty".into()),
            (Some(m), None) => Ok(PromptContent::Messages(m.clone())),
            (None, Some(t)) if t.is_empty() => Err("'text' is empty".into()),
            (None, Some(t)) => Ok(PromptContent::Text(t.clone())),
        }
    }
}

/// Where a cloud prompt's KV stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptStatus {
    /// Registered; its KV is waiting to be computed.
    Queued,
    /// Its KV is being computed (`progress` says how far).
    Computing,
    /// Its KV is stored and servable.
    Ready,
    /// Computing it failed (`error` says why).
    Failed,
}

/// A cloud prompt version as the registry reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudPromptInfo {
    pub name: String,
    /// Content hash of (content identity, token ids): the address of its KV.
    pub id: String,
    pub version: u32,
    pub status: PromptStatus,
    /// Fraction of the KV computed, 0 to 1.
    pub progress: f32,
    pub tokens: usize,
    /// Unix seconds.
    pub created_at: u64,
    /// For a superseded version: until when it stays servable (Unix seconds), renewed by edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The encodings of its KV the cloud serves (`?codec=` of the KV routes), with their stream sizes;
    /// empty until the KV is computed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv: Vec<KvVariant>,
}

/// One encoding of a cloud prompt's KV: its codec (`raw`, `int8`, `int4`) and stream bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KvVariant {
    pub codec: String,
    pub bytes: u64,
}

/// `GET /v1/cloud-prompts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudPromptList {
    pub data: Vec<CloudPromptInfo>,
}

/// The KV layout of a manifest (as `ep_kv::wire::WireLayout`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Layout {
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub block_tokens: u32,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
}

/// One frame of the KV stream: layer `layer`, tokens `start..end`, `bytes` encoded bytes at `offset` in
/// the stream, payload digest `digest` (hex BLAKE3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FrameRef {
    pub layer: u32,
    pub start: u32,
    pub end: u32,
    pub codec: u8,
    pub offset: u64,
    pub bytes: u64,
    pub digest: String,
}

/// Everything an edge needs to fetch, check and use a cloud prompt's KV.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
/// A manifest describes content only (it is addressed by `id` and immutable): the registry's names and
/// versions point at ids.
pub struct Manifest {
    pub format: String,
    pub id: String,
    /// The model's content identity (`epci1-…`) and its digest (hex).
    pub identity: String,
    pub identity_digest: String,
    pub content: PromptContent,
    /// Hex BLAKE3 of the chat template source the messages were rendered with (empty for text).
    pub template_digest: String,
    /// The prefix's token ids: an edge uses them as they are and tokenizes only what follows.
    pub tokens: Vec<u32>,
    pub layout: Layout,
    /// Hex chained block hashes of the prefix's full blocks.
    pub block_hashes: Vec<String>,
    /// Bytes of the encoded stream header, and its hex BLAKE3.
    pub header_bytes: u64,
    pub header_digest: String,
    pub frames: Vec<FrameRef>,
    /// Total bytes of the stream.
    pub stream_bytes: u64,
    pub created_at: u64,
}

impl Manifest {
    /// The bytes a signature covers (module docs).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = MANIFEST_SIGNING_DOMAIN.to_vec();
        out.extend(serde_json::to_vec(self).expect("a manifest serialises"));
        out
    }
}

/// `GET /v1/kv/{id}/manifest`: the manifest, its Ed25519 signature and the signing key (hex).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub signature: String,
    pub key: String,
}

/// Why a signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the manifest is signed by key {found}, not by the pinned key {expected}")]
    OtherKey { expected: String, found: String },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the manifest's signature does not verify")]
    Bad,
}

/// Signs a manifest.
pub fn sign(key: &SigningKey, m: Manifest) -> SignedManifest {
    let sig = key.sign(&m.signing_bytes());
    SignedManifest {
        manifest: m,
        signature: hex(&sig.to_bytes()),
        key: hex(key.verifying_key().as_bytes()),
    }
}

/// Checks a signed manifest against the pinned public key (hex).
pub fn verify(pinned: &str, s: &SignedManifest) -> Result<(), SignatureError> {
    if !s.key.eq_ignore_ascii_case(pinned) {
        return Err(SignatureError::OtherKey {
            expected: pinned.to_string(),
            found: s.key.clone(),
        });
    }
    let key = verifying_key(pinned)?;
    let sig: [u8; 64] = unhex(&s.signature)
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::Malformed("signature"))?;
    key.verify(&s.manifest.signing_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::Bad)
}

/// A public key from hex.
pub fn verifying_key(hex_key: &str) -> Result<VerifyingKey, SignatureError> {
    let b: [u8; 32] = unhex(hex_key)
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::Malformed("public key"))?;
    VerifyingKey::from_bytes(&b).map_err(|_| SignatureError::Malformed("public key"))
}

/// The id of a cloud prompt: hex BLAKE3 of the domain tag, the content identity digest and the token
/// ids (little-endian u32, length-prefixed).
pub fn prompt_id(identity_digest: &[u8; 32], tokens: &[u32]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"edgeprompt/cloud-prompt/v1");
    h.update(identity_digest);
    h.update(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    hex(h.finalize().as_bytes())
}

/// Checks a cloud prompt name: 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a content id ([`prompt_id`]): 64 lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `POST /v1/kv/{id}/lease`: the version stays servable until `lease_until` (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub id: String,
    pub lease_until: u64,
}

/// `GET /v1/prefetch`: the ids of ready cloud prompts edges may warm before their first request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrefetchHints {
    pub ids: Vec<PrefetchHint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrefetchHint {
    pub name: String,
    pub id: String,
    pub tokens: usize,
    pub stream_bytes: u64,
}

/// An error body in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(
        message: impl Into<String>,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

/// `GET /health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub role: String,
    pub identity: String,
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of a hex string (`None` when it is not hex).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            id: "ab".into(),
            identity: "epci1-00".into(),
            identity_digest: "00".into(),
            content: PromptContent::Text("hello".into()),
            template_digest: String::new(),
            tokens: vec![1, 2, 3],
            layout: Layout {
                n_layer: 2,
                n_head_kv: 1,
                head_dim: 8,
                block_tokens: 16,
                dtype: "f16".into(),
            },
            block_hashes: vec![],
            header_bytes: 10,
            header_digest: "00".into(),
            frames: vec![],
            stream_bytes: 10,
            created_at: 0,
        }
    }

    #[test]
    fn signatures_verify_only_unchanged_manifests_under_the_pinned_key() {
        let k = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let s = sign(&k, manifest());
        let pinned = hex(k.verifying_key().as_bytes());
        assert_eq!(verify(&pinned, &s), Ok(()));
        let mut t = s.clone();
        t.manifest.tokens[1] = 9;
        assert_eq!(verify(&pinned, &t), Err(SignatureError::Bad));
        let mut t = s.clone();
        t.signature = hex(&[0u8; 64]);
        assert_eq!(verify(&pinned, &t), Err(SignatureError::Bad));
        // Signed by another key: refused whether or not the served key is swapped too.
        let o = sign(&other, manifest());
        assert!(matches!(
            verify(&pinned, &o),
            Err(SignatureError::OtherKey { .. })
        ));
        let mut t = o.clone();
        t.key = pinned.clone();
        assert_eq!(verify(&pinned, &t), Err(SignatureError::Bad));
        assert!(matches!(
            verify("zz", &s),
            Err(SignatureError::OtherKey { .. })
        ));
    }

    #[test]
    fn register_requests_need_exactly_one_content() {
        let mut r = RegisterCloudPrompt {
            name: "a".into(),
            ..Default::default()
        };
        assert!(r.content().is_err());
        r.text = Some("x".into());
        assert_eq!(r.content(), Ok(PromptContent::Text("x".into())));
        r.messages = Some(vec![]);
        assert!(r.content().is_err());
        let j: Result<RegisterCloudPrompt, _> =
            serde_json::from_str(r#"{"name":"a","text":"t","bogus":1}"#);
        assert!(j.is_err(), "unknown fields are refused");
    }

    #[test]
    fn prompt_ids_depend_on_identity_and_every_token() {
        let a = prompt_id(&[1; 32], &[1, 2, 3]);
        assert_eq!(a.len(), 64);
        assert!(valid_id(&a));
        assert!(!valid_id(&a[1..]) && !valid_id(&a.to_uppercase()));
        assert_ne!(a, prompt_id(&[2; 32], &[1, 2, 3]));
        assert_ne!(a, prompt_id(&[1; 32], &[1, 2, 4]));
        assert_ne!(a, prompt_id(&[1; 32], &[1, 2]));
        assert_eq!(a, prompt_id(&[1; 32], &[1, 2, 3]));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
