//! API conformance: `schemathesis` (the venv of `scripts/setup-test-env.sh`) against the real edge
//! and cloud binaries on loopback, from the OpenAPI documents they serve. All of schemathesis's
//! checks, a bounded number of examples per operation and a fixed seed: no 5xx, every status code,
//! content type, header and body as documented (429 and 503 are documented), schema-valid requests
//! accepted and schema-invalid ones refused with a 4xx.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{curl, dir_str, free_port, model, Proc};
use serde_json::{json, Value};

/// Test cases per operation and phase (`--max-examples`).
const MAX_EXAMPLES: &str = "30";
/// The fixed seed of the generated requests.
const SEED: &str = "1";
/// The edge's `--max-tokens-limit`, so that generated requests stay short.
const MAX_TOKENS: &str = "8";

fn wait_for(url: &str, what: &str, p: &Proc) {
    let t0 = Instant::now();
    while curl("GET", url, None, None).0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not come up: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The schemathesis CLI of the end-to-end venv (`scripts/setup-test-env.sh` installs it; CI always
/// has it, so its absence fails rather than skips).
fn schemathesis() -> PathBuf {
    let py = std::env::var("EDGEPROMPT_E2E_PYTHON").unwrap_or_else(|_| {
        ep_model::paths::edgeprompt_home()
            .join("venv-e2e/bin/python")
            .to_string_lossy()
            .into_owned()
    });
    let st = Path::new(&py).with_file_name("schemathesis");
    assert!(
        st.exists(),
        "no schemathesis at {}: run scripts/setup-test-env.sh (it installs schemathesis into the \
         end-to-end venv; scripts/test.sh runs it)",
        st.display()
    );
    st
}

/// What the cloud's run is told beyond the command line: the one request its schema cannot judge.
const CLOUD_CONFIG: &str = r#"
# A stream's `from` must be the first token of one of that KV's frames: valid by the schema (an
# integer), it depends on the stored manifest, so a 400 (`invalid_from`) is a correct answer there.
[[operations]]
include-path = "/v1/kv/{id}/stream"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = ["2XX", "3XX", "400", "401", "403", "404", "409", "429", "5XX"]
"#;

/// Runs schemathesis against the OpenAPI document at `base`/openapi.json with `token`; returns
/// its output, after asserting that it passed.
fn run_schemathesis(
    st: &Path,
    dir: &Path,
    what: &str,
    base: &str,
    token: &str,
    config: &str,
) -> String {
    let config_path = dir.join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let schema = format!("{base}/openapi.json");
    let args = [
        "--config-file",
        &dir_str(&config_path),
        "run",
        &schema,
        "--header",
        &auth,
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
    ];
    eprintln!(
        "{what}: schemathesis {}",
        args.join(" ").replace(token, "<token>")
    );
    let t0 = Instant::now();
    let o = Command::new(st)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("schemathesis runs");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "schemathesis found problems in the {what} ({}):\n{out}",
        o.status
    );
    let summary: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    eprintln!(
        "{what}: passed in {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    out
}

/// A cloud (directory store, bearer token) with one cloud prompt, and an edge fetching from it
/// with API keys and `--max-tokens-limit 8`: schemathesis finds no 5xx and nothing undocumented in
/// either.
#[test]
fn edge_and_cloud_conform_to_their_openapi() {
    let st = schemathesis();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let token = "cloud-secret-token";
    let cloud_port = free_port();
    let store = dir_str(&dir.path().join("store"));
    let m = model();
    let cloud = Proc::start(
        &[
            "cloud",
            "--listen",
            &format!("127.0.0.1:{cloud_port}"),
            "--store",
            &store,
            "--model",
            &m,
            "--threads",
            "2",
            "--token",
            token,
        ],
        dir.path().join("cloud.log"),
    );
    let cloud_url = format!("http://127.0.0.1:{cloud_port}");
    wait_for(&format!("{cloud_url}/health"), "the cloud", &cloud);
    let (code, body) = curl(
        "POST",
        &format!("{cloud_url}/v1/cloud-prompts"),
        Some(token),
        Some(&json!({"name": "bakery", "messages": [{"role": "system",
            "content": "You are the assistant of a small bakery. Answer in one friendly sentence."}]})),
    );
    assert!(code == 200 || code == 202, "{code}: {body}");
    common::wait_ready(cloud_port, token, "bakery");

    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "conformance-key tenant-conformance\n").unwrap();
    let edge_port = free_port();
    let edge = Proc::start(
        &[
            "edge",
            "--listen",
            &format!("127.0.0.1:{edge_port}"),
            "--model",
            &m,
            "--threads",
            "2",
            "--model-id",
            "smol",
            "--cloud-url",
            &cloud_url,
            "--cloud-token",
            token,
            "--cache-dir",
            &dir_str(&dir.path().join("edge-cache")),
            "--api-keys",
            &dir_str(&keys),
            "--max-tokens-limit",
            MAX_TOKENS,
        ],
        dir.path().join("edge.log"),
    );
    let edge_url = format!("http://127.0.0.1:{edge_port}");
    wait_for(&format!("{edge_url}/health"), "the edge", &edge);
    // The bounds schemathesis generates within are the server's own.
    let (_, doc) = curl("GET", &format!("{edge_url}/openapi.json"), None, None);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        doc.pointer("/components/schemas/SamplingFields/properties/max_tokens/maximum"),
        Some(&json!(8)),
        "{doc}"
    );

    let edge_dir = dir.path().join("st-edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    run_schemathesis(&st, &edge_dir, "edge", &edge_url, "conformance-key", "");
    // The edge still answers (nothing schemathesis sent broke it).
    let (code, b) = curl(
        "POST",
        &format!("{edge_url}/v1/chat/completions"),
        Some("conformance-key"),
        Some(
            &json!({"model": "smol:bakery", "max_tokens": 4, "temperature": 0,
                     "messages": [{"role": "user", "content": "When do you open?"}]}),
        ),
    );
    assert_eq!(code, 200, "{b}\nedge log: {}", edge.log());

    let cloud_dir = dir.path().join("st-cloud");
    std::fs::create_dir_all(&cloud_dir).unwrap();
    run_schemathesis(&st, &cloud_dir, "cloud", &cloud_url, token, CLOUD_CONFIG);
    let (code, b) = curl("GET", &format!("{cloud_url}/health"), None, None);
    assert_eq!(code, 200, "{b}\ncloud log: {}", cloud.log());
    eprintln!(
        "conformance: edge and cloud passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
