//! The edge's side of the cloud–edge API: resolving a cloud prompt by name, fetching its signed
//! manifest and KV stream, checking signature, identity, layout, template and every digest, importing
//! the KV through the engine as it arrives (requests run the layers present), pinning it, and keeping it
//! in a disk cache so a restarted edge does not fetch again. Upstream it sends requests by name or id
//! only — nothing derived from user content.

use std::sync::Arc;

use ep_proto::{CloudPromptInfo, PromptContent};

/// A cloud prompt this edge can serve: its content, its token ids (the prefix a request extends; never
/// re-tokenized) and its KV, imported or being imported (held pinned while this value lives).
pub struct ReadyPrompt {
    pub name: String,
    pub id: String,
    pub version: u32,
    pub content: PromptContent,
    pub tokens: Vec<u32>,
}

/// Why a cloud prompt cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The cloud has no such prompt (HTTP 404 to the client).
    #[error("unknown cloud prompt '{0}'")]
    NotFound(String),
    /// The cloud cannot be reached and the prompt is not cached (HTTP 503).
    #[error("the cloud is unavailable and cloud prompt '{name}' is not cached here: {why}")]
    Unavailable { name: String, why: String },
    /// The prompt exists but is not ready yet (HTTP 503 with Retry-After).
    #[error("cloud prompt '{0}' is still being computed")]
    NotReady(String),
    /// What the cloud sent cannot be used: bad signature, another model, layout or template (HTTP 502).
    #[error("cloud prompt '{name}' refused: {why}")]
    Refused { name: String, why: String },
}

/// Byte counters of the traffic with the cloud.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Bytes of requests sent to the cloud (request lines, headers, bodies).
    pub bytes_up: u64,
    /// Bytes received from the cloud (status lines, headers, bodies).
    pub bytes_down: u64,
    /// KV streams fetched (from the cloud; disk-cache loads are not counted).
    pub streams_fetched: u64,
    /// Cloud prompts loaded from the disk cache.
    pub cache_loads: u64,
}

/// Resolves, fetches and holds cloud prompts for one edge.
pub struct Fetcher {
    _private: (),
}

impl Fetcher {
    /// The cloud prompt `name`: returns once its KV import has started (the header checked and
    /// imported; frames keep arriving in the background), so requests can be submitted at once.
    pub async fn resolve(&self, name: &str) -> Result<Arc<ReadyPrompt>, FetchError> {
        Err(FetchError::NotFound(name.to_string()))
    }

    /// The cloud prompts the cloud lists now (for `GET /v1/models`); cached ones when it is down.
    pub async fn list(&self) -> Result<Vec<CloudPromptInfo>, FetchError> {
        Ok(Vec::new())
    }

    /// Traffic with the cloud so far.
    pub fn traffic(&self) -> TrafficStats {
        TrafficStats::default()
    }
}
