//! Where the cloud keeps its state, behind one async trait ([`Store`]): the signing key, the registry's
//! records (one JSON document per prompt name) and, per content id, the encoded KV stream and its signed
//! manifest, and the leases replicas coordinate with. [`DirStore`] is a directory (every write a
//! temporary file renamed into place; its leases live in the process, one replica per directory);
//! [`RedisStore`] is a Redis server or a Redis Cluster several cloud replicas share (the stream one
//! value, read by `GETRANGE`; the key created with `SET NX` so replicas agree on it; leases are keys
//! set with `NX PX` and renewed or released only by their owner).
//!
//! **Keys in a cluster.** Every key carries a hash tag, so what one operation touches lies in one
//! slot: the registry (`ep:{reg}:…`, the records, the set of names, the signing key and the registry
//! lease) on one node, and each stored KV (`ep:{kv:ID}:stream`, `…:manifest`, `…:job`, one tag per
//! id and codec) on whichever node its tag hashes to, so a prompt's frames are read by range from one
//! node and prompts spread over the masters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::AsyncCommands;

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("store: {0}")]
    Bad(String),
}

impl StoreError {
    /// The store cannot be reached now (connection refused, dropped or timed out), as opposed to an
    /// error in what it holds or was asked.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout()
            }
            _ => false,
        }
    }
}

fn io(path: &Path, err: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// The cloud's persistent state. Every id and name given to it has been validated by the caller
/// (hex ids; names of `[A-Za-z0-9._-]`), so both are safe as file names and key parts.
#[async_trait]
pub trait Store: Send + Sync {
    /// What this store is, for logs (`dir:/path`, `redis://host:port`).
    fn describe(&self) -> String;

    /// The 32-byte Ed25519 signing-key seed: the stored one, else `fresh` stored atomically (when
    /// several replicas race, all end with the one that was stored first).
    async fn signing_key_or_insert(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError>;
    /// The stored signing-key seed, if any.
    async fn signing_key(&self) -> Result<Option<[u8; 32]>, StoreError>;

    /// The record document of prompt `name`.
    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn put_record(&self, name: &str, doc: &[u8]) -> Result<(), StoreError>;
    async fn delete_record(&self, name: &str) -> Result<(), StoreError>;
    /// Every recorded name.
    async fn list_names(&self) -> Result<Vec<String>, StoreError>;

    /// Stores the KV of content `id`: the stream first, then the manifest (a present manifest means
    /// the stream is complete).
    async fn put_kv(&self, id: &str, stream: Bytes, manifest: &[u8]) -> Result<(), StoreError>;
    /// The signed manifest of `id`.
    async fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Bytes `start..end` of the stream of `id` (clamped to its length).
    async fn get_stream_range(&self, id: &str, start: u64, end: u64) -> Result<Bytes, StoreError>;
    /// Removes the KV of `id` (absent is not an error).
    async fn delete_kv(&self, id: &str) -> Result<(), StoreError>;

    /// Takes `lease` for `owner` for `ttl` unless another owner holds it; returns whether `owner`
    /// holds it now (taking one it already holds renews it).
    async fn try_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Extends `lease` by `ttl` if `owner` still holds it; returns whether it did.
    async fn renew_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Gives `lease` up if `owner` holds it.
    async fn release_lease(&self, lease: &Lease, owner: &str) -> Result<(), StoreError>;
    /// Who holds `lease` now, if anyone.
    async fn lease_holder(&self, lease: &Lease) -> Result<Option<String>, StoreError>;
}

/// A lease replicas coordinate with: held by one owner at a time until it expires or is released.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Lease {
    /// Read-modify-write of the registry's records.
    Registry,
    /// The computation of the KV of this content id.
    Job(String),
}

/// Leases held in the process (a directory store's: one replica per directory).
#[derive(Debug, Default)]
struct LocalLeases(Mutex<HashMap<Lease, (String, Instant)>>);

impl LocalLeases {
    fn try_take(&self, lease: &Lease, owner: &str, ttl: Duration, renew_only: bool) -> bool {
        let mut m = self.0.lock().expect("leases");
        let now = Instant::now();
        let holder = m
            .get(lease)
            .filter(|(_, until)| *until > now)
            .map(|(o, _)| o.as_str());
        let ok = match holder {
            Some(o) => o == owner,
            None => !renew_only,
        };
        if ok {
            m.insert(lease.clone(), (owner.to_string(), now + ttl));
        }
        ok
    }
    fn release(&self, lease: &Lease, owner: &str) {
        let mut m = self.0.lock().expect("leases");
        if m.get(lease).is_some_and(|(o, _)| o == owner) {
            m.remove(lease);
        }
    }
    fn holder(&self, lease: &Lease) -> Option<String> {
        let m = self.0.lock().expect("leases");
        m.get(lease)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(o, _)| o.clone())
    }
}

/// Opens a store from its spec: `redis://HOST:PORT[/DB]` (one server),
/// `redis-cluster://HOST:PORT[,HOST:PORT…]` (a Redis Cluster, reached through any of its nodes) or a
/// directory path (created if missing).
pub async fn open_store(spec: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if spec.starts_with("redis-cluster://") {
        Ok(std::sync::Arc::new(
            RedisStore::connect_cluster(spec).await?,
        ))
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        Ok(std::sync::Arc::new(RedisStore::connect(spec).await?))
    } else {
        Ok(std::sync::Arc::new(DirStore::open(spec)?))
    }
}

/// A store in a directory: `key` (the signing-key seed), `records/NAME.json`, `kv/ID.stream` and
/// `kv/ID.manifest.json`. Writes go to a temporary file in the same directory, renamed into place.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
    leases: std::sync::Arc<LocalLeases>,
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for sub in ["records", "kv"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        Ok(DirStore {
            root,
            leases: Default::default(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of the stream of `id` (tests alter it to play a corrupted store).
    pub fn stream_path(&self, id: &str) -> PathBuf {
        self.root.join("kv").join(format!("{id}.stream"))
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join("kv").join(format!("{id}.manifest.json"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("records").join(format!("{name}.json"))
    }
}

/// Writes `bytes` to `path` through a temporary file in its directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Creates `path` with `bytes` unless it exists (a hard link of a complete temporary file, so a
/// reader never sees a partial file); returns what the file holds afterwards.
fn create_exclusive(path: &Path, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(bytes.to_vec()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(path),
        Err(e) => Err(e.error),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Bad(format!("store task: {e}")))?
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

fn remove_opt(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, e)),
    }
}

fn seed_of(b: &[u8]) -> Result<[u8; 32], StoreError> {
    b.try_into().map_err(|_| {
        StoreError::Bad(format!(
            "the stored signing key has {} bytes, not 32",
            b.len()
        ))
    })
}

#[async_trait]
impl Store for DirStore {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn signing_key_or_insert(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let path = self.root.join("key");
        blocking(move || {
            let b = create_exclusive(&path, &fresh).map_err(|e| io(&path, e))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
            seed_of(&b)
        })
        .await
    }

    async fn signing_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let path = self.root.join("key");
        blocking(move || read_opt(&path)?.map(|b| seed_of(&b)).transpose()).await
    }

    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.record_path(name);
        blocking(move || read_opt(&path)).await
    }

    async fn put_record(&self, name: &str, doc: &[u8]) -> Result<(), StoreError> {
        let (path, doc) = (self.record_path(name), doc.to_vec());
        blocking(move || write_atomic(&path, &doc).map_err(|e| io(&path, e))).await
    }

    async fn delete_record(&self, name: &str) -> Result<(), StoreError> {
        let path = self.record_path(name);
        blocking(move || remove_opt(&path)).await
    }

    async fn list_names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("records");
        blocking(move || {
            let mut names = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let e = e.map_err(|e| io(&dir, e))?;
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(name) = n.strip_suffix(".json") {
                    if !name.starts_with('.') {
                        names.push(name.to_string());
                    }
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn put_kv(&self, id: &str, stream: Bytes, manifest: &[u8]) -> Result<(), StoreError> {
        let (sp, mp, m) = (
            self.stream_path(id),
            self.manifest_path(id),
            manifest.to_vec(),
        );
        blocking(move || {
            write_atomic(&sp, &stream).map_err(|e| io(&sp, e))?;
            write_atomic(&mp, &m).map_err(|e| io(&mp, e))
        })
        .await
    }

    async fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.manifest_path(id);
        blocking(move || read_opt(&path)).await
    }

    async fn get_stream_range(&self, id: &str, start: u64, end: u64) -> Result<Bytes, StoreError> {
        let path = self.stream_path(id);
        blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            let len = f.metadata().map_err(|e| io(&path, e))?.len();
            let (s, e) = (start.min(len), end.min(len));
            if s >= e {
                return Ok(Bytes::new());
            }
            f.seek(SeekFrom::Start(s)).map_err(|e| io(&path, e))?;
            let mut buf = vec![0u8; (e - s) as usize];
            f.read_exact(&mut buf).map_err(|e| io(&path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn delete_kv(&self, id: &str) -> Result<(), StoreError> {
        let (sp, mp) = (self.stream_path(id), self.manifest_path(id));
        blocking(move || {
            remove_opt(&mp)?;
            remove_opt(&sp)
        })
        .await
    }

    async fn try_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.leases.try_take(lease, owner, ttl, false))
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.leases.try_take(lease, owner, ttl, true))
    }

    async fn release_lease(&self, lease: &Lease, owner: &str) -> Result<(), StoreError> {
        self.leases.release(lease, owner);
        Ok(())
    }

    async fn lease_holder(&self, lease: &Lease) -> Result<Option<String>, StoreError> {
        Ok(self.leases.holder(lease))
    }
}

/// A store in Redis, one server or a Redis Cluster: `ep:{reg}:key`, `ep:{reg}:names` (a set),
/// `ep:{reg}:rec:NAME`, `ep:{reg}:lease`, and per stored KV `ep:{kv:ID}:stream` (one value, read with
/// `GETRANGE`), `ep:{kv:ID}:manifest` and `ep:{kv:ID}:job` (the computation's lease). One
/// multiplexed connection that reconnects by itself, or the cluster client's connections to every
/// master, which follow the cluster's slots through failovers.
#[derive(Clone)]
pub struct RedisStore {
    url: String,
    conn: Conn,
}

/// A connection to one server or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStore {
    /// A store on one Redis server (`redis://HOST:PORT[/DB]`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_manager().await?;
        Ok(RedisStore {
            url: url.to_string(),
            conn: Conn::Single(conn),
        })
    }

    /// A store on a Redis Cluster: `redis-cluster://HOST:PORT[,HOST:PORT…]`, any of its nodes (the
    /// client learns the rest and the slots from them).
    pub async fn connect_cluster(spec: &str) -> Result<Self, StoreError> {
        let nodes: Vec<String> = spec
            .strip_prefix("redis-cluster://")
            .unwrap_or(spec)
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| format!("redis://{n}"))
            .collect();
        if nodes.is_empty() {
            return Err(StoreError::Bad(format!(
                "'{spec}' names no node: redis-cluster://HOST:PORT[,HOST:PORT…]"
            )));
        }
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(4)
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(RedisStore {
            url: spec.to_string(),
            conn: Conn::Cluster(conn),
        })
    }
}

const R_KEY: &str = "ep:{reg}:key";
const R_NAMES: &str = "ep:{reg}:names";

fn r_rec(name: &str) -> String {
    format!("ep:{{reg}}:rec:{name}")
}
fn r_stream(id: &str) -> String {
    format!("ep:{{kv:{id}}}:stream")
}
fn r_manifest(id: &str) -> String {
    format!("ep:{{kv:{id}}}:manifest")
}
fn r_lease(lease: &Lease) -> String {
    match lease {
        Lease::Registry => "ep:{reg}:lease".to_string(),
        Lease::Job(id) => format!("ep:{{kv:{id}}}:job"),
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

/// Extends the key's expiry if it holds the owner.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes the key if it holds the owner.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
return redis.call('DEL', KEYS[1]) else return 0 end";

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        // Without any password part of the URL.
        match self.url.rsplit_once('@') {
            Some((_, host)) => format!("redis://…@{host}"),
            None => self.url.clone(),
        }
    }

    async fn signing_key_or_insert(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let mut c = self.conn.clone();
        let _: bool = redis::cmd("SET")
            .arg(R_KEY)
            .arg(&fresh[..])
            .arg("NX")
            .query_async::<Option<String>>(&mut c)
            .await
            .map(|r| r.is_some())?;
        let b: Vec<u8> = c.get(R_KEY).await?;
        seed_of(&b)
    }

    async fn signing_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let mut c = self.conn.clone();
        let b: Option<Vec<u8>> = c.get(R_KEY).await?;
        b.map(|b| seed_of(&b)).transpose()
    }

    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.get(r_rec(name)).await?)
    }

    async fn put_record(&self, name: &str, doc: &[u8]) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(r_rec(name), doc)
            .ignore()
            .sadd(R_NAMES, name)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn delete_record(&self, name: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(r_rec(name))
            .ignore()
            .srem(R_NAMES, name)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn list_names(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        let mut names: Vec<String> = c.smembers(R_NAMES).await?;
        names.sort();
        Ok(names)
    }

    async fn put_kv(&self, id: &str, stream: Bytes, manifest: &[u8]) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c.set(r_stream(id), stream.as_ref()).await?;
        let _: () = c.set(r_manifest(id), manifest).await?;
        Ok(())
    }

    async fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.get(r_manifest(id)).await?)
    }

    async fn get_stream_range(&self, id: &str, start: u64, end: u64) -> Result<Bytes, StoreError> {
        if start >= end {
            return Ok(Bytes::new());
        }
        let mut c = self.conn.clone();
        // GETRANGE's end is inclusive and clamped by Redis.
        let b: Vec<u8> = c
            .getrange(r_stream(id), start as isize, (end - 1) as isize)
            .await?;
        Ok(Bytes::from(b))
    }

    async fn delete_kv(&self, id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c.del(&[r_manifest(id), r_stream(id)]).await?;
        Ok(())
    }

    async fn try_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let key = r_lease(lease);
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async(&mut c)
            .await?;
        if set.is_some() {
            return Ok(true);
        }
        self.renew_lease(lease, owner, ttl).await
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let n: i64 = redis::Script::new(RENEW)
            .key(r_lease(lease))
            .arg(owner)
            .arg(ttl_ms(ttl))
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    async fn release_lease(&self, lease: &Lease, owner: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::Script::new(RELEASE)
            .key(r_lease(lease))
            .arg(owner)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    async fn lease_holder(&self, lease: &Lease) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.get(r_lease(lease)).await?)
    }
}
