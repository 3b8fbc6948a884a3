//! The privacy and KV audit the operator page shows (`GET /v1/audit`): per tenant, the last requests
//! with what each sent to the cloud on its behalf (request lines and bytes, never bodies: the edge
//! sends none), how much of its own text appears in that traffic, its cached and computed prompt
//! tokens and its time to first token; beside them the edge-wide state that holds no tenant's data —
//! the cloud prompts held, KV memory, the link estimate and the last KV decisions.
//!
//! Rows hold no prompt or completion text and no token ids. They live in memory only, bounded per
//! tenant ([`ROWS_PER_TENANT`]) and in tenants ([`MAX_TENANTS`], the least recently active dropped).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use utoipa::ToSchema;

use crate::fetch::{Decision, HeldPrompt, UpstreamRequest};

/// Rows kept per tenant (the newest).
pub const ROWS_PER_TENANT: usize = 100;
/// Tenants whose rows are kept at once.
pub const MAX_TENANTS: usize = 1024;

/// One completion request as the audit shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AuditRow {
    /// The response id (`chatcmpl-…`, `cmpl-…`), or `rejected-…` for a request refused before it ran.
    pub id: String,
    /// Unix time in milliseconds when the request arrived.
    pub at_ms: u64,
    /// `chat` or `completion`.
    pub endpoint: String,
    /// The cloud prompt it named (the part of the model id after `:`), if any.
    pub cloud_prompt: Option<String>,
    /// The tenant's edge prompt it used, if any (the name; its content never leaves the edge).
    pub edge_prompt: Option<String>,
    /// How the cloud prompt's KV was obtained: `cache`, `fetch-f16`, `recompute`, `split`, …
    pub kv: Option<String>,
    /// HTTP status of the answer (200 also for a stream that ended in an error event).
    pub status: u16,
    /// `stop`, `length`, … when it finished; the error code when it failed.
    pub outcome: String,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was already in the engine (cloud KV, shared or earlier prefixes).
    pub cached_tokens: usize,
    /// Of the cached tokens, those imported from the cloud's KV.
    pub imported_tokens: usize,
    /// Prompt tokens prefilled on this edge for this request.
    pub computed_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    /// Bytes of the client's request body, and of the answer sent back to it.
    pub client_bytes_in: usize,
    pub client_bytes_out: usize,
    /// The requests sent to the cloud while this one was prepared (names and ids only).
    pub upstream: Vec<UpstreamRequest>,
    /// Their bytes, up (request lines and headers) and down (answers read for this request).
    pub upstream_bytes_up: u64,
    pub upstream_bytes_down: u64,
    /// Bytes of this request's own text (messages, prompt, edge prompt) found in what went up: see
    /// [`text_bytes_in`].
    pub text_bytes_up: u64,
}

/// The KV memory of the engine.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct KvMemory {
    pub budget_bytes: usize,
    pub used_bytes: usize,
    pub cached_blocks: usize,
    pub running: usize,
    pub waiting: usize,
}

/// The link to the cloud as this edge measured it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Link {
    pub rtt_ms: f64,
    pub mbit_per_s: f64,
    pub rtt_samples: u32,
    pub rate_samples: u32,
}

/// All traffic with the cloud since the edge started.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Upstream {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests: u64,
    pub kv_bytes: u64,
    /// The last requests sent, for whatever cause (names, ids, probes, leases), newest last.
    pub recent: Vec<UpstreamRequest>,
}

/// A strategy and how many prompts it was chosen for.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DecisionCount {
    pub strategy: String,
    pub count: u64,
}

/// The body of `GET /v1/audit`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Audit {
    /// The caller's tenant as the logs name it (a short hash).
    pub tenant: String,
    /// The caller's requests, newest first.
    pub requests: Vec<AuditRow>,
    /// Whether this edge has a cloud.
    pub cloud: bool,
    pub cloud_prompts: Vec<HeldPrompt>,
    pub kv_memory: KvMemory,
    pub link: Option<Link>,
    /// Whether the adaptive policy's start-up measurements are done.
    pub planner_ready: bool,
    /// The last decisions on how to get a prompt's KV, newest last.
    pub decisions: Vec<Decision>,
    pub decision_counts: Vec<DecisionCount>,
    pub upstream: Option<Upstream>,
}

#[derive(Default)]
struct TenantRows {
    rows: VecDeque<AuditRow>,
    touched: u64,
}

/// The rows of every tenant, bounded.
#[derive(Default)]
pub struct AuditLog {
    inner: Mutex<(HashMap<String, TenantRows>, u64)>,
}

impl AuditLog {
    /// Adds a row for `tenant` (its oldest row dropped beyond [`ROWS_PER_TENANT`]; the least
    /// recently active tenant's rows dropped beyond [`MAX_TENANTS`]).
    pub fn push(&self, tenant: &str, row: AuditRow) {
        let mut g = self.inner.lock().expect("audit");
        let (map, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        if !map.contains_key(tenant) && map.len() >= MAX_TENANTS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, t)| t.touched)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let t = map.entry(tenant.to_string()).or_default();
        t.touched = now;
        t.rows.push_back(row);
        while t.rows.len() > ROWS_PER_TENANT {
            t.rows.pop_front();
        }
    }

    /// The rows of `tenant`, newest first.
    pub fn rows(&self, tenant: &str) -> Vec<AuditRow> {
        let g = self.inner.lock().expect("audit");
        g.0.get(tenant)
            .map(|t| t.rows.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the rows of `tenant`.
    pub fn forget(&self, tenant: &str) {
        self.inner.lock().expect("audit").0.remove(tenant);
    }
}

/// Runs of this many bytes are compared between a request's text and what went up.
pub const WINDOW: usize = 16;
/// Texts shorter than this are not searched for (too short to tell from a name).
pub const MIN_TEXT: usize = 6;

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// Bytes of `texts` that appear in the request lines of `upstream` (as sent and percent-decoded),
/// plus the bytes of request bodies sent: each text's bytes covered by a run of [`WINDOW`] bytes
/// (the whole text when it is shorter, from [`MIN_TEXT`] bytes) that also occurs in a line.
pub fn text_bytes_in(upstream: &[UpstreamRequest], texts: &[&str]) -> u64 {
    if upstream.is_empty() {
        return 0;
    }
    let bodies: u64 = upstream.iter().map(|u| u.body_bytes_up).sum();
    let lines: Vec<Vec<u8>> = upstream
        .iter()
        .flat_map(|u| [u.line.as_bytes().to_vec(), percent_decode(&u.line)])
        .collect();
    let mut windows: HashSet<&[u8]> = HashSet::new();
    for l in &lines {
        for w in l.windows(WINDOW) {
            windows.insert(w);
        }
    }
    let mut found = 0u64;
    for t in texts.iter().map(|t| t.as_bytes()) {
        if t.len() < MIN_TEXT {
            continue;
        }
        if t.len() < WINDOW {
            if lines.iter().any(|l| l.windows(t.len()).any(|w| w == t)) {
                found += t.len() as u64;
            }
            continue;
        }
        // Bytes covered by any matching window.
        let mut covered_to = 0usize;
        for (i, w) in t.windows(WINDOW).enumerate() {
            if windows.contains(w) {
                let from = i.max(covered_to);
                found += (i + WINDOW - from) as u64;
                covered_to = i + WINDOW;
            }
        }
    }
    found + bodies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(line: &str) -> UpstreamRequest {
        UpstreamRequest::for_test(line)
    }

    #[test]
    fn names_are_not_text_and_leaks_are_found() {
        let lines = [
            up("GET /v1/cloud-prompts/law"),
            up("GET /v1/kv/0123abcd/manifest"),
        ];
        let canary = "my account is CANARY-7f3e-991 please help";
        assert_eq!(text_bytes_in(&lines, &[canary, "law"]), 0);
        // The whole text in a path, as sent and percent-encoded.
        let leaked = [up(&format!("GET /v1/cloud-prompts/{canary}"))];
        assert_eq!(text_bytes_in(&leaked, &[canary]), canary.len() as u64);
        let enc = canary.replace(' ', "%20");
        let leaked = [up(&format!("GET /x?q={enc}"))];
        assert_eq!(text_bytes_in(&leaked, &[canary]), canary.len() as u64);
        // Part of it: the covered bytes only.
        let leaked = [up("GET /x?q=CANARY-7f3e-991%20please")];
        assert_eq!(
            text_bytes_in(&leaked, &[canary]),
            "CANARY-7f3e-991 please".len() as u64
        );
        // A short text, whole.
        let leaked = [up("GET /x?q=secret42")];
        assert_eq!(text_bytes_in(&leaked, &["secret42"]), 8);
        assert_eq!(text_bytes_in(&leaked, &["secret43"]), 0);
    }

    #[test]
    fn the_log_is_bounded_and_per_tenant() {
        let log = AuditLog::default();
        let row = |id: &str| AuditRow {
            id: id.into(),
            at_ms: 0,
            endpoint: "chat".into(),
            cloud_prompt: None,
            edge_prompt: None,
            kv: None,
            status: 200,
            outcome: "stop".into(),
            prompt_tokens: 1,
            cached_tokens: 0,
            imported_tokens: 0,
            computed_tokens: 1,
            completion_tokens: 1,
            ttft_ms: None,
            total_ms: 0.0,
            client_bytes_in: 0,
            client_bytes_out: 0,
            upstream: Vec::new(),
            upstream_bytes_up: 0,
            upstream_bytes_down: 0,
            text_bytes_up: 0,
        };
        for i in 0..ROWS_PER_TENANT + 5 {
            log.push("a", row(&format!("a{i}")));
        }
        log.push("b", row("b0"));
        let a = log.rows("a");
        assert_eq!(a.len(), ROWS_PER_TENANT);
        assert_eq!(a[0].id, format!("a{}", ROWS_PER_TENANT + 4));
        assert_eq!(log.rows("b").len(), 1);
        assert!(log.rows("c").is_empty());
        for i in 0..MAX_TENANTS {
            log.push(&format!("t{i}"), row("x"));
        }
        // "a" was the least recently active: gone; "b" went with it, the newest stay.
        assert!(log.rows("a").is_empty());
        assert!(log.rows("b").is_empty());
        assert_eq!(log.rows(&format!("t{}", MAX_TENANTS - 1)).len(), 1);
        log.forget(&format!("t{}", MAX_TENANTS - 1));
        assert!(log.rows(&format!("t{}", MAX_TENANTS - 1)).is_empty());
    }
}
