//! The edge's disk cache of cloud prompt KV: per content id the signed manifest and the whole stream as
//! received (`kv/ID.manifest.json`, `kv/ID.stream`), an index of the last id seen per name
//! (`names.json`, for serving while the cloud is down) and the cloud key remembered on first use
//! (`cloud-key`). Every write is a temporary file renamed into place (one a killed process left is
//! removed on open). The streams stay within a byte budget, the least recently used evicted first
//! (use is the file's modification time), room made before an entry is written. Nothing read from
//! here is trusted: the fetcher checks signature and every digest again on load.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What the index remembers of a name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub id: String,
    pub version: u32,
}

/// A cache key: a content id, or `{id}.{codec}` for a lossy encoding (`ep_kv::codec::variant_key`).
fn valid_key(key: &str) -> bool {
    match key.split_once('.') {
        None => ep_proto::valid_id(key),
        Some((id, codec)) => {
            ep_proto::valid_id(id)
                && ep_kv::codec::parse(codec).is_some_and(|c| c != ep_kv::identity::CODEC_RAW)
        }
    }
}

/// The disk cache (see the module docs).
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    lock: Mutex<()>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl DiskCache {
    /// Opens (creating) the cache in `dir` with a budget of `budget` stream + manifest bytes.
    pub fn open(dir: impl Into<PathBuf>, budget: u64) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("kv"))?;
        // A process killed while writing leaves its temporary file behind: incomplete, never read
        // as an entry, but it would hold disk outside the budget for good.
        for d in [dir.clone(), dir.join("kv")] {
            for e in std::fs::read_dir(&d)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp")
                    && e.file_type().is_ok_and(|t| t.is_file())
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    tracing::warn!(
                        file = %e.path().display(),
                        "removed an incomplete file left in the KV disk cache"
                    );
                }
            }
        }
        Ok(DiskCache {
            dir,
            budget,
            lock: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stream_path(&self, id: &str) -> PathBuf {
        self.dir.join("kv").join(format!("{id}.stream"))
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.dir.join("kv").join(format!("{id}.manifest.json"))
    }

    /// Stores only the signed manifest of `id` (its token ids: what recomputing needs when the cloud
    /// is down); a later [`put`](Self::put) adds the stream.
    pub fn put_manifest(&self, id: &str, manifest: &[u8]) -> std::io::Result<()> {
        if !valid_key(id) {
            return Err(std::io::Error::other("not a content id"));
        }
        let _g = self.lock.lock().expect("cache lock");
        write_atomic(&self.manifest_path(id), manifest)
    }

    /// The signed manifest (JSON) of `id`, with or without its stream.
    pub fn read_manifest(&self, id: &str) -> Option<Vec<u8>> {
        if !valid_key(id) {
            return None;
        }
        std::fs::read(self.manifest_path(id)).ok()
    }

    /// Whether `id` is cached.
    pub fn contains(&self, id: &str) -> bool {
        valid_key(id) && self.manifest_path(id).is_file() && self.stream_path(id).is_file()
    }

    /// The signed manifest (JSON) and the stream of `id`, marked as used now.
    pub fn read(&self, id: &str) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if !valid_key(id) {
            return Ok(None);
        }
        let _g = self.lock.lock().expect("cache lock");
        let (mp, sp) = (self.manifest_path(id), self.stream_path(id));
        let m = match std::fs::read(&mp) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let s = match std::fs::read(&sp) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Ok(f) = std::fs::File::options().write(true).open(&sp) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some((m, s)))
    }

    /// Stores the KV of `id`, then evicts the least recently used others until the cache is within
    /// its budget. Returns `false` (storing nothing) when this entry alone exceeds the budget.
    pub fn put(&self, id: &str, manifest: &[u8], stream: &[u8]) -> std::io::Result<bool> {
        if !valid_key(id) {
            return Err(std::io::Error::other("not a content id"));
        }
        let size = (manifest.len() + stream.len()) as u64;
        if size > self.budget {
            return Ok(false);
        }
        let _g = self.lock.lock().expect("cache lock");
        // Room first, so the directory stays within the budget while the entry is written.
        let _ = std::fs::remove_file(self.stream_path(id));
        self.evict(size, id)?;
        write_atomic(&self.stream_path(id), stream)?;
        write_atomic(&self.manifest_path(id), manifest)?;
        Ok(true)
    }

    /// Removes the KV of `id` (a bad entry).
    pub fn remove(&self, id: &str) {
        if !valid_key(id) {
            return;
        }
        let _g = self.lock.lock().expect("cache lock");
        let _ = std::fs::remove_file(self.manifest_path(id));
        let _ = std::fs::remove_file(self.stream_path(id));
    }

    /// Cached entries: (id, bytes, last use).
    fn entries(&self) -> std::io::Result<Vec<(String, u64, SystemTime)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join("kv"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".stream") else {
                continue;
            };
            if !valid_key(id) {
                continue;
            }
            let md = e.metadata()?;
            let m = std::fs::metadata(self.manifest_path(id))
                .map(|m| m.len())
                .unwrap_or(0);
            out.push((
                id.to_string(),
                md.len() + m,
                md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
        Ok(out)
    }

    /// Bytes the cache holds.
    pub fn usage(&self) -> std::io::Result<u64> {
        Ok(self.entries()?.iter().map(|e| e.1).sum())
    }

    /// Ids cached, most recently used first.
    pub fn ids(&self) -> std::io::Result<Vec<String>> {
        let mut e = self.entries()?;
        e.sort_by_key(|b| std::cmp::Reverse(b.2));
        Ok(e.into_iter().map(|e| e.0).collect())
    }

    /// Evicts the least recently used entries but `keep` until they and `new` more bytes fit.
    fn evict(&self, new: u64, keep: &str) -> std::io::Result<()> {
        let mut e = self.entries()?;
        e.retain(|e| e.0 != keep);
        let mut total: u64 = e.iter().map(|e| e.1).sum::<u64>() + new;
        e.sort_by_key(|a| a.2);
        for (id, bytes, _) in e {
            if total <= self.budget {
                break;
            }
            let _ = std::fs::remove_file(self.manifest_path(&id));
            let _ = std::fs::remove_file(self.stream_path(&id));
            tracing::info!(id = &id[..12], bytes, "evicted from the KV disk cache");
            total -= bytes;
        }
        Ok(())
    }

    fn names(&self) -> BTreeMap<String, NameEntry> {
        std::fs::read(self.dir.join("names.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The id last resolved for `name`.
    pub fn name(&self, name: &str) -> Option<NameEntry> {
        let _g = self.lock.lock().expect("cache lock");
        self.names().get(name).cloned()
    }

    /// Every remembered name.
    pub fn all_names(&self) -> BTreeMap<String, NameEntry> {
        let _g = self.lock.lock().expect("cache lock");
        self.names()
    }

    /// Remembers that `name` resolved to `entry`.
    pub fn set_name(&self, name: &str, entry: NameEntry) -> std::io::Result<()> {
        let _g = self.lock.lock().expect("cache lock");
        let mut n = self.names();
        if n.get(name) == Some(&entry) {
            return Ok(());
        }
        n.insert(name.to_string(), entry);
        let b = serde_json::to_vec_pretty(&n).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join("names.json"), &b)
    }

    /// The cloud key remembered on first use (hex).
    pub fn cloud_key(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("cloud-key"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Remembers the cloud key (hex).
    pub fn set_cloud_key(&self, key: &str) -> std::io::Result<()> {
        write_atomic(&self.dir.join("cloud-key"), format!("{key}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction_keeps_the_budget() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path(), 250).unwrap();
        let id = |i: u8| format!("{:064x}", i);
        assert!(c.put(&id(1), b"m", &[0; 99]).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(c.put(&id(2), b"m", &[0; 99]).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Use 1, so 2 is the least recently used.
        assert!(c.read(&id(1)).unwrap().is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(c.put(&id(3), b"m", &[0; 99]).unwrap());
        assert!(c.contains(&id(1)) && c.contains(&id(3)) && !c.contains(&id(2)));
        assert!(c.usage().unwrap() <= 250);
        assert!(
            !c.put(&id(4), b"m", &[0; 300]).unwrap(),
            "larger than the budget"
        );
        c.set_name(
            "a",
            NameEntry {
                id: id(1),
                version: 2,
            },
        )
        .unwrap();
        assert_eq!(c.name("a").unwrap().version, 2);
        assert!(c.read("../x").unwrap().is_none());
    }
}
