//! The cloud and an edge as real processes in two network namespaces joined by an emulated 40 Mbit/s
//! link (`ep-netlab`): the cloud is SIGKILLed in the middle of the edge's KV transfer and restarted,
//! then the link drops every packet for 1.5 s; the request that was waiting completes with the tokens
//! a fresh edge gets afterwards, the stream resumed where it stopped. Needs root and `ip netns`; elsewhere it says why it skips.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, Proc};
use ep_netlab::{Helper, Link, Profile};
use serde_json::{json, Value};

const PREFIX: &str = "epkill";

fn model() -> String {
    ep_testutil::require_test_model()
        .to_string_lossy()
        .into_owned()
}

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    ep_netlab::unavailable_reason()
}

fn curl(method: &str, url: &str, token: &str, body: Option<&Value>, max_s: u32) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .args(["--max-time", &max_s.to_string()])
        .args(["-H", &format!("Authorization: Bearer {token}")]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let o = c.arg(url).output().expect("curl runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or((&out, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn wait_health(url: &str, p: &Proc) {
    let t0 = Instant::now();
    while curl("GET", url, "-", None, 2).0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{url} never answered:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cloud_cmd(link: &Link, store: &Path, port: u16) -> Command {
    let mut c = link.command_in(link.cloud_ns(), &bin());
    c.args(["cloud", "--listen", &format!("0.0.0.0:{port}"), "--store"])
        .arg(store)
        .args(["--token", "t", "--model", &model()]);
    c
}

fn edge_cmd(link: &Link, port: u16, cloud_port: u16, key: &str) -> Command {
    let mut c = link.command_in(link.edge_ns(), &bin());
    c.args(["edge", "--listen", &format!("0.0.0.0:{port}")])
        .args([
            "--cloud-url",
            &format!("http://{}:{cloud_port}", link.cloud_link_ip()),
        ])
        .args([
            "--cloud-token",
            "t",
            "--cloud-key",
            key,
            "--allow-plain-http",
        ])
        .args([
            "--kv-strategy",
            "fetch-f16",
            "--model-id",
            "m",
            "--model",
            &model(),
        ]);
    c
}

fn chat_body() -> Value {
    json!({
        "model": "m:doc",
        "messages": [{"role": "user", "content": "Which word comes most often?"}],
        "max_tokens": 8,
        "temperature": 0,
    })
}

/// Drops every packet arriving in either namespace (`cut`), or removes that rule; `false` when `nft`
/// cannot run.
fn nft_cut(link: &Link, cut: bool) -> bool {
    for ns in [link.cloud_ns(), link.edge_ns()] {
        let script = if cut {
            "add table inet epcut; add chain inet epcut input { type filter hook input priority -10; policy drop; }"
        } else {
            "delete table inet epcut"
        };
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "nft", script])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return false;
        }
    }
    true
}

#[test]
fn a_fetch_survives_the_cloud_killed_mid_transfer_and_a_dead_link() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the cloud-kill test: {why}");
        return;
    }
    let link = Link::up_with(
        PREFIX,
        &Profile::parse_custom("40,10,0").unwrap(),
        Helper::for_binary(bin()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (cport, eport) = (18_401, 18_402);
    let cloud_url = format!("http://{}:{cport}", link.cloud_ctl_ip());
    let cloud = Proc::spawn(
        cloud_cmd(&link, &store, cport),
        dir.path().join("cloud1.log"),
    );
    wait_health(&format!("{cloud_url}/health"), &cloud);
    // About 900 tokens: 21 MB of f16 KV, some 4 s on this link.
    let words = ["harbor", "signal", "lantern", "meadow", "copper", "violet"];
    let text: String = (0..800)
        .map(|i| words[(i * 5 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let reg = json!({"name": "doc", "messages": [{"role": "system", "content": text}]});
    let (code, body) = curl(
        "POST",
        &format!("{cloud_url}/v1/cloud-prompts"),
        "t",
        Some(&reg),
        10,
    );
    assert!(code == 200 || code == 201 || code == 202, "{code} {body}");
    let t0 = Instant::now();
    loop {
        let (_, b) = curl(
            "GET",
            &format!("{cloud_url}/v1/cloud-prompts/doc"),
            "t",
            None,
            5,
        );
        if b.contains("\"ready\"") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{b}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let key = Command::new(bin())
        .args(["cloud", "key", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();

    let edge = Proc::spawn(
        edge_cmd(&link, eport, cport, &key),
        dir.path().join("edge1.log"),
    );
    let edge_url = format!("http://{}:{eport}", link.edge_ctl_ip());
    wait_health(&format!("{edge_url}/health"), &edge);
    let url = format!("{edge_url}/v1/chat/completions");
    let waiting = {
        let url = url.clone();
        std::thread::spawn(move || curl("POST", &url, "tenant", Some(&chat_body()), 120))
    };
    // Mid-transfer: the cloud is killed, then started again on the same store.
    std::thread::sleep(Duration::from_millis(1500));
    drop(cloud);
    std::thread::sleep(Duration::from_millis(300));
    let cloud = Proc::spawn(
        cloud_cmd(&link, &store, cport),
        dir.path().join("cloud2.log"),
    );
    // Then the link goes dead both ways for 1.5 s (every packet dropped) while the resumed
    // stream runs, and comes back.
    std::thread::sleep(Duration::from_millis(1500));
    let flapped = nft_cut(&link, true);
    assert!(
        !waiting.is_finished(),
        "the request finished before the link was cut: the test no longer covers a dead link"
    );
    if flapped {
        std::thread::sleep(Duration::from_millis(1500));
        nft_cut(&link, false);
    } else {
        eprintln!("nft is not available: the link is not cut, only the cloud killed");
    }
    let (code, got) = waiting.join().unwrap();
    assert_eq!(code, 200, "{got}\n{}", edge.log());
    let log = edge.log();
    assert!(
        log.contains("resuming"),
        "the stream was interrupted:\n{log}"
    );
    assert!(log.contains("cloud prompt KV complete"), "{log}");

    // A fresh edge after the restart: the same answer.
    wait_health(&format!("{cloud_url}/health"), &cloud);
    drop(edge);
    let edge2 = Proc::spawn(
        edge_cmd(&link, eport, cport, &key),
        dir.path().join("edge2.log"),
    );
    wait_health(&format!("{edge_url}/health"), &edge2);
    let (code, want) = curl("POST", &url, "tenant", Some(&chat_body()), 120);
    assert_eq!(code, 200, "{want}");
    let text = |b: &str| -> String {
        let v: Value = serde_json::from_str(b).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        text(&got),
        text(&want),
        "the resumed KV gives the same tokens"
    );
    drop(edge2);
    drop(cloud);
    link.down().unwrap();
}
