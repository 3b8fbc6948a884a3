//! The shipped site configurations with the real binaries on loopback: three cold edges behind the
//! nginx site cache (`deploy/nginx/site-cache.conf.template`, rendered as `envsubst` would) pull each
//! frame from the cloud once and answer as an edge fetching directly does; `Range` requests through
//! the cache return the cloud's bytes; the site token guards the cached KV. The HAProxy router's
//! configuration (`deploy/haproxy/edges.cfg`) passes `haproxy -c`. The whole fleet, with a Redis
//! Cluster, faults and the router in use, is `scripts/fleet/test.sh` (root, network namespaces).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, dir_str, free_port, Proc};
use serde_json::{json, Value};

const CLOUD_TOKEN: &str = "site-test-cloud-token";
const SITE_TOKEN: &str = "site-test-site-token";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// nginx with the rendered site-cache configuration; stopped with SIGQUIT (its workers with it).
struct Nginx {
    child: Child,
    run: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, port: u16, cloud_port: u16) -> Nginx {
        let template =
            std::fs::read_to_string(repo().join("deploy/nginx/site-cache.conf.template")).unwrap();
        let (run, cache) = (dir.join("nginx"), dir.join("cache"));
        std::fs::create_dir_all(&run).unwrap();
        let mut conf = template;
        for (k, v) in [
            ("EP_SITE_LISTEN", format!("127.0.0.1:{port}")),
            (
                "EP_CLOUD_SERVERS",
                format!("server 127.0.0.1:{cloud_port};"),
            ),
            ("EP_SITE_TOKEN", SITE_TOKEN.to_string()),
            ("EP_CLOUD_TOKEN", CLOUD_TOKEN.to_string()),
            ("EP_CACHE_DIR", dir_str(&cache)),
            ("EP_CACHE_MAX", "1g".to_string()),
            ("EP_RUN_DIR", dir_str(&run)),
        ] {
            conf = conf.replace(&format!("${{{k}}}"), &v);
        }
        assert!(!conf.contains("${EP_"), "a variable the test does not set");
        let path = dir.join("site-cache.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (scripts/test.sh installs Debian's nginx)");
        let n = Nginx { child, run };
        wait_health(port, || {
            std::fs::read_to_string(n.run.join("nginx-error.log")).unwrap_or_default()
        });
        n
    }
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.run.join("nginx-access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (at most 60 s) until `GET /health` on loopback `port` answers 200; `log` says why not.
fn wait_health(port: u16, log: impl Fn() -> String) {
    let t0 = Instant::now();
    let url = format!("http://127.0.0.1:{port}/health");
    while curl("GET", &url, None, None).0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "port {port} did not come up: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_up(port: u16, p: &Proc) {
    wait_health(port, || p.log());
}

fn counter(port: u16, name: &str) -> f64 {
    let (_, text) = curl(
        "GET",
        &format!("http://127.0.0.1:{port}/metrics"),
        Some(CLOUD_TOKEN),
        None,
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn answer(port: u16) -> String {
    let (code, b) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        Some("tenant-a"),
        Some(&json!({
            "model": "smol:desk",
            "messages": [{"role": "user", "content": "My parcel has not arrived. What can you do?"}],
            "max_tokens": 12,
            "temperature": 0,
        })),
    );
    assert_eq!(code, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `curl` of a byte range; (status, body).
fn range(url: &str, token: &str, spec: &str) -> (u16, Vec<u8>) {
    let o = Command::new("curl")
        .args(["-s", "-S", "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", &format!("Range: bytes={spec}")])
        .args(["-o", "-", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    let (body, code) = o.stdout.split_at(o.stdout.len() - 3);
    (
        String::from_utf8_lossy(code).parse().unwrap(),
        body.to_vec(),
    )
}

#[test]
fn three_edges_behind_the_site_cache_pull_each_frame_from_the_cloud_once() {
    let dir = tempfile::tempdir().unwrap();
    // nginx's workers run as an unprivileged user when it is started as root: they must reach the
    // cache directory.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let store = dir.path().join("store");
    let cloud_port = free_port();
    let cloud = Proc::start(
        &[
            "cloud",
            "--listen",
            &format!("127.0.0.1:{cloud_port}"),
            "--store",
            &dir_str(&store),
            "--token",
            CLOUD_TOKEN,
            "--model",
            &common::model(),
            "--threads",
            "2",
            "--kv-codecs",
            "raw",
        ],
        dir.path().join("cloud.log"),
    );
    wait_up(cloud_port, &cloud);
    // A third of the `up` demo's prompt: ~600 tokens, a stream of several 1 MiB slices.
    let text = include_str!("../assets/up-cloud-prompt.txt");
    let cut = (0..=text.len() / 3)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap();
    let text = &text[..cut];
    let (code, b) = curl(
        "POST",
        &format!("http://127.0.0.1:{cloud_port}/v1/cloud-prompts"),
        Some(CLOUD_TOKEN),
        Some(&json!({"name": "desk", "messages": [{"role": "system", "content": text}]})),
    );
    assert!(code == 200 || code == 202, "{code}: {b}");
    let info = common::wait_ready(cloud_port, CLOUD_TOKEN, "desk");
    let id = info["id"].as_str().unwrap().to_string();
    let (_, m) = curl(
        "GET",
        &format!("http://127.0.0.1:{cloud_port}/v1/kv/{id}/manifest"),
        Some(CLOUD_TOKEN),
        None,
    );
    let m: Value = serde_json::from_str(&m).unwrap();
    let frames = m["manifest"]["frames"].as_array().unwrap().len() as f64;
    let stream_bytes = m["manifest"]["stream_bytes"].as_u64().unwrap();
    assert!(
        stream_bytes > 3 << 20,
        "{stream_bytes} bytes: several slices"
    );
    let key = Command::new(common::bin())
        .args(["cloud", "key", "--store", &dir_str(&store)])
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();

    let cache_port = free_port();
    let nginx = Nginx::start(dir.path(), cache_port, cloud_port);
    let edge = |name: &str, cloud: u16, token: &str| {
        let port = free_port();
        let args = common::edge_args(
            port,
            cloud,
            token,
            None,
            &["--cloud-key", &key, "--kv-strategy", "fetch-f16"],
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::start(&args, dir.path().join(format!("edge-{name}.log")));
        (p, port)
    };
    let edges: Vec<(Proc, u16)> = (0..3)
        .map(|i| edge(&format!("site{i}"), cache_port, SITE_TOKEN))
        .collect();
    for (p, port) in &edges {
        wait_up(*port, p);
    }
    let before = counter(cloud_port, "edgeprompt_cloud_kv_frames_served_total");
    // The three cold edges at once.
    let answers: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = edges
            .iter()
            .map(|(_, port)| s.spawn(move || answer(*port)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served = counter(cloud_port, "edgeprompt_cloud_kv_frames_served_total") - before;
    assert_eq!(
        served,
        frames,
        "each frame from the cloud once; the cache's log:\n{}",
        nginx.access_log()
    );
    let log = nginx.access_log();
    let slices = log
        .lines()
        .filter(|l| {
            l.contains(&format!("/v1/kv/{id}/stream")) && l.contains("upstream_range=\"bytes=")
        })
        .count();
    assert!(slices >= 4, "slices fetched and served: {log}");
    // An edge fetching directly answers the same.
    let (direct, port) = edge("direct", cloud_port, CLOUD_TOKEN);
    wait_up(port, &direct);
    let want = answer(port);
    assert!(!want.is_empty());
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &want, "edge {i} behind the cache");
    }
    // Ranges through the cache are the cloud's bytes, across a slice boundary.
    let spec = "1000000-2500000";
    let via = range(
        &format!("http://127.0.0.1:{cache_port}/v1/kv/{id}/stream"),
        SITE_TOKEN,
        spec,
    );
    let direct_bytes = range(
        &format!("http://127.0.0.1:{cloud_port}/v1/kv/{id}/stream"),
        CLOUD_TOKEN,
        spec,
    );
    assert_eq!(via.0, 206);
    assert_eq!(via.1.len(), 1_500_001);
    assert!(
        via.1 == direct_bytes.1,
        "the cached range differs from the cloud's"
    );
    // The cached KV is the site's: no token, or the cloud's own, is refused by the cache.
    for token in [None, Some(CLOUD_TOKEN)] {
        let (code, body) = curl(
            "GET",
            &format!("http://127.0.0.1:{cache_port}/v1/kv/{id}/manifest"),
            token,
            None,
        );
        assert_eq!(code, 401, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
    }
}

#[test]
fn the_shipped_router_configuration_is_valid() {
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(repo().join("deploy/haproxy/edges.cfg"))
        .env("EP_ROUTER_LISTEN", "127.0.0.1:18000")
        .env("EP_EDGE1", "127.0.0.1:18001")
        .env("EP_EDGE2", "127.0.0.1:18002")
        .env("EP_EDGE3", "127.0.0.1:18003")
        .output()
        .expect("haproxy (scripts/test.sh installs Debian's haproxy)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without its variables it is refused, not run with empty addresses.
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(repo().join("deploy/haproxy/edges.cfg"))
        .env_remove("EP_EDGE1")
        .env_remove("EP_EDGE2")
        .env_remove("EP_EDGE3")
        .env_remove("EP_ROUTER_LISTEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
}
