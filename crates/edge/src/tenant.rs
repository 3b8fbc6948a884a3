//! Tenants: who a request is (from its bearer token), the KV salt of its private tokens, and its edge
//! prompts — held in memory only, never written to disk, never sent upstream.
//!
//! Without a key list, the bearer token itself is the tenant (no token: the anonymous tenant `""`).
//! With one (`--api-keys FILE`: one key per line, or `key tenant` pairs; `#` comments), only listed
//! keys are accepted, compared in constant time. The salt of a request is
//! `BLAKE3(derive_key("edgeprompt/tenant-salt/v1"), len(tenant) ‖ tenant ‖ cache_salt)`, so private KV
//! is never reused across tenants nor across a tenant's `cache_salt` values.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use subtle::ConstantTimeEq;

use crate::openai::{EdgeMessage, EdgePromptInfo};

/// Distinct `cache_salt` values remembered per tenant (so its KV can be purged); beyond this a
/// request with a new one is refused until the tenant purges its cache.
pub const MAX_SALTS_PER_TENANT: usize = 1024;

/// The configured API keys: key → tenant.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    keys: Vec<(Vec<u8>, String)>,
}

impl ApiKeys {
    /// Parses a key file: `key` or `key tenant` per line; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let key = it.next().expect("non-empty line");
            let tenant = it.next().unwrap_or(key);
            if it.next().is_some() {
                return Err(format!(
                    "line {}: expected `key` or `key tenant`, found more fields",
                    i + 1
                ));
            }
            keys.push((key.as_bytes().to_vec(), tenant.to_string()));
        }
        if keys.is_empty() {
            return Err("the API key file lists no keys".into());
        }
        Ok(Self { keys })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant of `key`: every listed key is compared, in constant time, whatever matches.
    pub fn tenant_of(&self, key: &str) -> Option<&str> {
        let mut found = None;
        for (k, t) in &self.keys {
            if bool::from(k.as_slice().ct_eq(key.as_bytes())) && found.is_none() {
                found = Some(t.as_str());
            }
        }
        found
    }
}

/// The tenant of a request given its bearer token (`None` when keys are configured and the token is
/// missing or unknown).
pub fn tenant_for(keys: Option<&ApiKeys>, bearer: Option<&str>) -> Option<String> {
    match keys {
        None => Some(bearer.unwrap_or("").to_string()),
        Some(k) => k.tenant_of(bearer?).map(str::to_string),
    }
}

/// The KV salt of a tenant's private tokens, refined by the request's `cache_salt`.
pub fn salt(tenant: &str, cache_salt: Option<&str>) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("edgeprompt/tenant-salt/v1");
    h.update(&(tenant.len() as u64).to_le_bytes());
    h.update(tenant.as_bytes());
    if let Some(c) = cache_salt {
        h.update(&[1]);
        h.update(c.as_bytes());
    } else {
        h.update(&[0]);
    }
    h.finalize().as_bytes().to_vec()
}

/// What the audit log says instead of the tenant: a short hash.
pub fn tenant_hash(tenant: &str) -> String {
    let h = blake3::Hasher::new_derive_key("edgeprompt/tenant-audit/v1")
        .update(tenant.as_bytes())
        .finalize();
    ep_proto::hex(&h.as_bytes()[..8])
}

/// An edge prompt's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EdgePromptContent {
    Text(String),
    Messages(Vec<EdgeMessage>),
}

/// A tenant's private prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgePrompt {
    pub name: String,
    pub content: EdgePromptContent,
    pub created: u64,
}

impl EdgePrompt {
    pub fn bytes(&self) -> usize {
        match &self.content {
            EdgePromptContent::Text(t) => t.len(),
            EdgePromptContent::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
        }
    }
    pub fn info(&self) -> EdgePromptInfo {
        EdgePromptInfo {
            name: self.name.clone(),
            kind: match self.content {
                EdgePromptContent::Text(_) => "text",
                EdgePromptContent::Messages(_) => "messages",
            }
            .into(),
            bytes: self.bytes(),
            created: self.created,
        }
    }
}

#[derive(Default)]
struct TenantState {
    prompts: HashMap<String, EdgePrompt>,
    /// Every salt this tenant's requests used (what a purge drops).
    salts: HashSet<Vec<u8>>,
}

/// Every tenant's edge prompts and salts, in memory.
#[derive(Default)]
pub struct Tenants {
    inner: Mutex<HashMap<String, TenantState>>,
}

impl Tenants {
    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut TenantState) -> T) -> T {
        let mut m = self.inner.lock().expect("tenants lock");
        f(m.entry(tenant.to_string()).or_default())
    }

    /// Adds or replaces an edge prompt; false when the tenant already has `max` others.
    pub fn put(&self, tenant: &str, p: EdgePrompt, max: usize) -> bool {
        self.with(tenant, |t| {
            if !t.prompts.contains_key(&p.name) && t.prompts.len() >= max {
                return false;
            }
            t.prompts.insert(p.name.clone(), p);
            true
        })
    }
    pub fn get(&self, tenant: &str, name: &str) -> Option<EdgePrompt> {
        self.with(tenant, |t| t.prompts.get(name).cloned())
    }
    pub fn list(&self, tenant: &str) -> Vec<EdgePromptInfo> {
        let mut v: Vec<EdgePromptInfo> = self.with(tenant, |t| {
            t.prompts.values().map(EdgePrompt::info).collect()
        });
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    pub fn remove(&self, tenant: &str, name: &str) -> bool {
        self.with(tenant, |t| t.prompts.remove(name).is_some())
    }
    /// Remembers a salt the tenant uses; false when it has too many distinct ones already.
    pub fn note_salt(&self, tenant: &str, salt: &[u8]) -> bool {
        self.with(tenant, |t| {
            if t.salts.contains(salt) {
                return true;
            }
            if t.salts.len() >= MAX_SALTS_PER_TENANT {
                return false;
            }
            t.salts.insert(salt.to_vec());
            true
        })
    }
    /// The salts the tenant used (forgotten: a purge drops them all).
    pub fn take_salts(&self, tenant: &str) -> Vec<Vec<u8>> {
        self.with(tenant, |t| t.salts.drain().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_and_tenants() {
        let k = ApiKeys::parse("# keys\nsk-a alice\n\nsk-b\n").unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k.tenant_of("sk-a"), Some("alice"));
        assert_eq!(k.tenant_of("sk-b"), Some("sk-b"));
        assert_eq!(k.tenant_of("sk-"), None);
        assert_eq!(k.tenant_of(""), None);
        assert!(ApiKeys::parse("a b c").is_err());
        assert!(ApiKeys::parse("# none\n").is_err());
        assert_eq!(tenant_for(Some(&k), None), None);
        assert_eq!(tenant_for(None, Some("tok")), Some("tok".into()));
        assert_eq!(tenant_for(None, None), Some(String::new()));
    }

    #[test]
    fn salts_separate_tenants_and_cache_salts() {
        let a = salt("a", None);
        assert_eq!(a, salt("a", None));
        assert_ne!(a, salt("b", None));
        assert_ne!(a, salt("a", Some("")));
        assert_ne!(salt("a", Some("x")), salt("a", Some("y")));
        // No ambiguity between tenant and cache_salt bytes.
        assert_ne!(salt("ab", Some("c")), salt("a", Some("bc")));
        assert_eq!(tenant_hash("a").len(), 16);
    }

    #[test]
    fn edge_prompts_are_per_tenant() {
        let t = Tenants::default();
        let p = EdgePrompt {
            name: "p".into(),
            content: EdgePromptContent::Text("secret".into()),
            created: 0,
        };
        assert!(t.put("a", p.clone(), 1));
        assert!(t.put("a", p.clone(), 1), "replacing does not count");
        assert!(!t.put(
            "a",
            EdgePrompt {
                name: "q".into(),
                ..p.clone()
            },
            1
        ));
        assert_eq!(t.get("a", "p"), Some(p));
        assert_eq!(t.get("b", "p"), None);
        assert_eq!(t.list("a").len(), 1);
        assert!(t.remove("a", "p"));
        assert!(!t.remove("a", "p"));
        assert!(t.note_salt("a", b"s"));
        assert_eq!(t.take_salts("a"), vec![b"s".to_vec()]);
        assert!(t.take_salts("a").is_empty());
    }
}
