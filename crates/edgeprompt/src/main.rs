//! `edgeprompt`: the command-line interface. Thin: argument parsing, I/O and error reporting; the work
//! is in the library crates.

mod edge_cmd;
mod fleet;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ep_engine::{AttnMode, Engine, EngineConfig, Event, Finished, Request};
use ep_kv::KvDtype;
use ep_model::chat::{ChatMessage, ChatTemplate};
use ep_model::generate::GenerateParams;
use ep_model::sampling::SamplingParams;
use ep_model::tokenizer::Tokenizer;
use ep_model::{load_model_dir_or_gguf, paths, Model, ModelBundle};
use indicatif::{ProgressBar, ProgressStyle};

mod cloud_cmd;
mod model_cmd;
mod netbench;
mod netlab_cmd;
mod relbench;
mod servebench;
mod up_cmd;

#[derive(Parser)]
#[command(
    name = "edgeprompt",
    version,
    about = "EdgePrompt: cloud–edge LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(GenerateArgs),
    /// Chat interactively (one message per line; /reset clears the conversation, /exit or EOF quits).
    Chat(ChatArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the model's KV content identity (what KV it computes: shape, numerics, tokenizer, every
    /// weight byte) as `epci1-<hex>`.
    Identity(IdentityArgs),
    /// KV files: export the KV of a prompt prefix in the wire format (what a cloud serves to edges).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Serve the OpenAI-compatible API (chat and completions, SSE, edge prompts, tenants, metrics).
    Edge(edge_cmd::EdgeArgs),
    /// The cloud: the cloud prompt registry, KV computed once and served signed to edges
    /// (`cloud key --store S` prints the signing key).
    Cloud(cloud_cmd::CloudArgs),
    /// A cloud and an edge on loopback with the embedded defaults: registers an example cloud prompt,
    /// sends a chat request with private details through the edge, streams the answer and prints what
    /// crossed the network (then serves until Ctrl-C, or exits with --once).
    Up(up_cmd::UpArgs),
    /// An emulated cloud–edge link for tests: two network namespaces joined by a link shaped to a
    /// profile (rate, RTT, loss); `netlab up --profile 5g_urban`, `netlab down`, `netlab measure`.
    Netlab(netlab_cmd::NetlabArgs),
    /// The loopback fleet (root): a Redis Cluster, 2 cloud replicas, a site cache, a router and 3
    /// edges in network namespaces, tested under faults (`fleet test`; scripts/fleet/test.sh).
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Model files: `model random` writes a random-weight GGUF of a Llama shape (for timing only).
    Model(model_cmd::ModelArgs),
}

#[derive(Subcommand)]
enum KvCommand {
    /// Compute the KV of the rendered system prefix (the chat template applied to the system message
    /// alone, the prefix a request with that system message extends) and write it as a frame stream.
    Export(KvExportArgs),
}

#[derive(Args)]
struct KvExportArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    engine: EngineOpts,
    /// The system message whose prefix KV is exported.
    #[arg(long)]
    system: String,
    /// Output file (written to a temporary file, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// Tokens per frame (each layer's KV is split into frames of at most this many tokens).
    #[arg(long, default_value_t = 256)]
    frame_tokens: usize,
}

#[derive(Args)]
struct IdentityArgs {
    /// Model: a GGUF file or a Hugging Face directory. Default: the fetched SmolLM2-135M-Instruct.
    #[arg(long, env = "EDGEPROMPT_MODEL")]
    model: Option<PathBuf>,
    /// Print the identity's fields and digests as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Raw engine speed: prefill at 512 tokens; decode at batch 1, 8, 32 at a short context and at 1024
    /// tokens of context. Each point is the median of --reps interleaved runs.
    Micro(MicroArgs),
    /// The non-interactive scenario: batches of requests sharing cloud prompts, decode throughput per
    /// attention mode. Each point is the median of --reps interleaved runs.
    Batch(BatchArgs),
    /// KV codecs: MMLU questions after their subject's 5-shot cloud prompt, whose KV is sent through
    /// each codec (encode, wire stream, decode); answer and top-1 agreement with the exact KV, KL
    /// divergence, bytes per token with headers and framing. One JSON record per codec.
    Codecs(CodecsArgs),
    /// Time to first token of a fresh edge on emulated links (network namespaces, root), per way of
    /// getting a cloud prompt's KV: fetch-f16/int8/int4, recompute, split, adaptive. JSON records and
    /// a Markdown table of medians.
    Network(netbench::NetworkArgs),
    /// The paper's interactive scenario over HTTP against real servers: a cloud and an edge per
    /// attention mode (paged, relay, splice) and llama.cpp's llama-server, driven by a load generator
    /// at a grid of request rates (Poisson, or Azure trace arrivals); throughput, normalized latency,
    /// TTFT and TPOT percentiles, the highest rate meeting p90 TTFT ≤ 2 s and p90 TPOT ≤ 150 ms; then
    /// the batch scenario (bench batch and llama-batched-bench). JSON records, a Markdown report and
    /// plots.
    Serve(servebench::ServeArgs),
    /// The edge under overload (thousands of streaming clients: 429 with Retry-After beyond its
    /// queue, RSS against its bound), a client that stops reading, the prefix-cache timing side
    /// channel between tenants, and a soak at a fraction of the measured capacity; a cloud and an
    /// edge as processes on loopback. One JSON record per phase.
    Reliability(relbench::ReliabilityArgs),
}

#[derive(Args)]
struct CodecsArgs {
    #[command(flatten)]
    common: Common,
    /// Codecs to compare: raw, int8, int4 (measured variants: +kN key groups, +vN value groups,
    /// +hiL first L layers int8, +zN zstd level, e.g. int4+k64+v64).
    #[arg(long, value_delimiter = ',', default_value = "raw,int8,int4")]
    codecs: Vec<String>,
    /// MMLU test questions, spread round-robin over the subjects.
    #[arg(long, default_value_t = 200)]
    questions: usize,
    /// Greedy continuation compared per question (teacher-forced), in tokens.
    #[arg(long, default_value_t = 16)]
    cont_tokens: usize,
    /// Tokens per wire frame.
    #[arg(long, default_value_t = 256)]
    frame_tokens: usize,
    /// Public datasets directory (MMLU); default $EDGEPROMPT_DATASETS, then ../shared/datasets.
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BatchArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    engine: EngineOpts,
    /// Attention modes to compare (paged, relay, splice).
    #[arg(long, value_delimiter = ',', default_value = "paged,relay,splice")]
    modes: Vec<String>,
    /// Cloud prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "0,512,1024,2048,4096")]
    prefix_tokens: Vec<usize>,
    /// Requests per batch.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batch: Vec<usize>,
    /// Distinct cloud prompts per batch (the batch splits evenly over them).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    groups: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    gen: usize,
    /// Runs per point.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Public datasets directory (MMLU); default $EDGEPROMPT_DATASETS, then ../shared/datasets;
    /// without one, prompts are generated.
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct MicroArgs {
    #[command(flatten)]
    common: Common,
    /// Write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runs per point.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Decode contexts (tokens already in each sequence's KV).
    #[arg(long, value_delimiter = ',', default_value = "16,1024")]
    context: Vec<usize>,
    /// Prefill length.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Timed decode steps per point.
    #[arg(long, default_value_t = 16)]
    steps: usize,
}

/// Options every subcommand takes.
#[derive(Args, Clone)]
struct Common {
    /// Model: a GGUF file or a Hugging Face directory (config.json + *.safetensors). Default: the
    /// fetched SmolLM2-135M-Instruct in $EDGEPROMPT_HOME.
    #[arg(long, env = "EDGEPROMPT_MODEL")]
    model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Context length in tokens (default: the model's training context, at most 8192).
    #[arg(long)]
    ctx_size: Option<usize>,
}

/// Options of the serving engine (KV store and scheduler).
#[derive(Args, Clone)]
struct EngineOpts {
    /// Data type of stored K/V: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    kv_dtype: String,
    /// KV memory budget in MiB (a hard limit: requests wait or are preempted beyond it).
    #[arg(long, default_value_t = 1024)]
    kv_mem_mib: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Tokens one forward step may process (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Attention: splice (shared prefix-tree nodes attended jointly), relay (one shared system
    /// prefix) or paged (every sequence its own blocks). Results are identical; speed differs.
    #[arg(long, default_value = "splice")]
    attn_mode: String,
}

impl EngineOpts {
    fn config(&self, max_seq_len: usize) -> Result<EngineConfig> {
        let kv_dtype: KvDtype = self
            .kv_dtype
            .parse()
            .map_err(|e| anyhow::anyhow!("--kv-dtype: {e}"))?;
        if self.kv_mem_mib == 0 || self.step_tokens == 0 {
            bail!("--kv-mem-mib and --step-tokens must be at least 1");
        }
        if self.block_size == 0 || !self.block_size.is_multiple_of(8) {
            bail!("--block-size must be a positive multiple of 8");
        }
        let attn_mode: AttnMode = self
            .attn_mode
            .parse()
            .map_err(|e| anyhow::anyhow!("--attn-mode: {e}"))?;
        Ok(EngineConfig {
            attn_mode,
            kv_dtype,
            block_tokens: self.block_size,
            kv_budget_bytes: self.kv_mem_mib << 20,
            max_seq_len,
            max_step_tokens: self.step_tokens,
            ..EngineConfig::default()
        })
    }
}

#[derive(Args, Clone)]
struct Sampling {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the top probability (0: off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Tokens of history the penalties look at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Presence penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Frequency penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (default: from the clock; printed to stderr).
    #[arg(long)]
    seed: Option<u64>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when this string is generated (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    common: Common,
    /// The user prompt.
    #[arg(long)]
    prompt: String,
    /// System message (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as is, without the chat template; special-token text becomes special tokens.
    /// (Through the template, special-token text in --prompt / --system stays text.)
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    engine: EngineOpts,
    /// Print one JSON object as the last line of stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Use the prefix KV in this file (written by `kv export` with the same model and KV layout)
    /// instead of computing it; the file is checked whole before any of it is used.
    #[arg(long)]
    kv: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    common: Common,
    /// System message (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    engine: EngineOpts,
}

struct Loaded {
    model: Model,
    tok: Tokenizer,
    template: Option<ChatTemplate>,
    n_ctx: usize,
}

fn load(common: &Common) -> Result<Loaded> {
    let path = common
        .model
        .clone()
        .unwrap_or_else(paths::default_model_path);
    if !path.exists() {
        if common.model.is_none() {
            bail!(
                "the default model is not at {}: run scripts/fetch-model.sh first, or pass --model PATH",
                path.display()
            );
        }
        bail!("model {} does not exist", path.display());
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    // A GGUF file, or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    let ModelBundle {
        model,
        tokenizer: tok,
        template,
    } = load_model_dir_or_gguf(&path, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let n_ctx = common.ctx_size.unwrap_or(model.cfg.n_ctx_train.min(8192));
    if n_ctx < 2 {
        bail!("--ctx-size must be at least 2");
    }
    tracing::info!(
        path = %path.display(),
        arch = %model.cfg.arch,
        layers = model.cfg.n_layer,
        simd = model.kernels().name(),
        "model loaded"
    );
    Ok(Loaded {
        model,
        tok,
        template,
        n_ctx,
    })
}

fn params(s: &Sampling) -> Result<GenerateParams> {
    let seed = s.seed.unwrap_or_else(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        if s.temperature > 0.0 {
            eprintln!("seed: {seed}");
        }
        seed
    });
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed,
    };
    sampling.validate()?;
    Ok(GenerateParams {
        max_tokens: s.max_tokens,
        sampling,
        stop: s.stop.clone(),
        ignore_eos: s.ignore_eos,
        ..GenerateParams::default()
    })
}

fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build()?)
}

fn messages(system: &Option<String>) -> Vec<ChatMessage> {
    system
        .iter()
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect()
}

fn render(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    msgs: &[ChatMessage],
) -> Result<Vec<u32>> {
    let t =
        template.context("the model has no chat template (tokenizer.chat_template); use --raw")?;
    // Special-token text in message content stays text (no role injection).
    Ok(ep_model::chat::render_prompt(tok, t, msgs, true)?.tokens)
}

/// A loaded model moved onto an engine thread.
struct Served {
    engine: Engine,
    tok: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
}

fn serve(common: &Common, opts: &EngineOpts, pool: rayon::ThreadPool) -> Result<Served> {
    let pool = Arc::new(pool);
    let l = pool.install(|| load(common))?;
    // Nothing here takes the per-step statistics (the cloud runs for days).
    let cfg = EngineConfig {
        step_log: false,
        ..opts.config(l.n_ctx)?
    };
    let tok = Arc::new(l.tok);
    let engine = Engine::start(Arc::new(l.model), tok.clone(), cfg, Some(pool))?;
    Ok(Served {
        engine,
        tok,
        template: l.template,
    })
}

/// One request's result with its timings.
struct Streamed {
    tokens: Vec<u32>,
    text: String,
    fin: Finished,
}

impl Streamed {
    fn prefill_tok_s(&self) -> f64 {
        rate(
            self.fin.prompt_tokens - self.fin.cached_tokens,
            self.fin.first_token.as_secs_f64(),
        )
    }
    fn decode_tok_s(&self) -> f64 {
        rate(
            self.fin.generated.saturating_sub(1),
            (self.fin.total - self.fin.first_token).as_secs_f64(),
        )
    }
    fn print_speed(&self) {
        eprintln!(
            "\n[prompt {} tokens ({} computed) at {:.1} tok/s; {} tokens generated at {:.1} tok/s; finish: {}]",
            self.fin.prompt_tokens,
            self.fin.prompt_tokens - self.fin.cached_tokens,
            self.prefill_tok_s(),
            self.fin.generated,
            self.decode_tok_s(),
            self.fin.reason.as_str()
        );
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Submits a request and streams its text to `on_text`.
fn run_request(engine: &Engine, req: Request, on_text: &mut dyn FnMut(&str)) -> Result<Streamed> {
    let mut stream = engine.submit(req)?;
    let mut tokens = Vec::new();
    let mut text = String::new();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token { token, text: t, .. } => {
                tokens.push(token);
                if !t.is_empty() {
                    on_text(&t);
                    text.push_str(&t);
                }
            }
            Event::Done(fin) => {
                if !fin.text_tail.is_empty() {
                    on_text(&fin.text_tail);
                    text.push_str(&fin.text_tail);
                }
                return Ok(Streamed { tokens, text, fin });
            }
            Event::Error(e) => bail!("{e}"),
            Event::Kv(_) => {}
        }
    }
    bail!("the engine stopped before the request finished")
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = params(&a.sampling)?;
    if a.raw && a.system.is_some() {
        bail!("--system cannot be used with --raw (put the system text in the prompt)");
    }
    let sv = serve(&a.common, &a.engine, thread_pool(a.common.threads)?)?;
    let prompt = if a.raw {
        sv.tok.encode(&a.prompt, true)?
    } else {
        let mut msgs = messages(&a.system);
        msgs.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        render(&sv.tok, sv.template.as_ref(), &msgs)?
    };
    let mut req = Request::new(prompt.clone(), params);
    // The import stays pinned (its KV usable) while `_import` lives.
    let _import = match &a.kv {
        Some(path) => {
            let (header, frames) = read_kv_file(path)?;
            let imp = sv
                .engine
                .import_header_blocking(&header)
                .with_context(|| format!("{}", path.display()))?;
            for f in &frames {
                imp.write_frame(f)
                    .with_context(|| format!("{}", path.display()))?;
            }
            if prompt.starts_with(&header.tokens) {
                req.public_prefix = header.tokens.len();
            } else {
                eprintln!(
                    "warning: the prompt does not start with the {} tokens of {}; only a common prefix of whole blocks can be used",
                    header.tokens.len(),
                    path.display()
                );
            }
            Some(imp)
        }
        None => None,
    };
    let g = if a.json {
        run_request(&sv.engine, req, &mut |_| {})?
    } else {
        let mut out = std::io::stdout().lock();
        let g = run_request(&sv.engine, req, &mut |s| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        g
    };
    if a.json {
        let j = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "text": g.text,
            "finish_reason": g.fin.reason.as_str(),
            "prompt_tokens_imported": g.fin.imported_tokens,
            "prompt_tokens_computed": g.fin.prompt_tokens - g.fin.cached_tokens,
            "prefill_tok_s": g.prefill_tok_s(),
            "decode_tok_s": g.decode_tok_s(),
        });
        println!("{j}");
    } else {
        g.print_speed();
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let params = params(&a.sampling)?;
    let sv = serve(&a.common, &a.engine, thread_pool(a.common.threads)?)?;
    let mut msgs = messages(&a.system);
    let stdin = std::io::stdin();
    let mut line = String::new();
    eprintln!("chat with the model; /reset clears the conversation, /exit quits");
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs = messages(&a.system);
                continue;
            }
            _ => {}
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: input.to_string(),
        });
        // The whole conversation is sent each turn; the engine's prefix cache reuses its KV.
        let r = render(&sv.tok, sv.template.as_ref(), &msgs).and_then(|prompt| {
            let mut out = std::io::stdout().lock();
            let r = run_request(&sv.engine, Request::new(prompt, params.clone()), &mut |s| {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            });
            let _ = writeln!(out);
            r
        });
        match r {
            Ok(g) => {
                g.print_speed();
                msgs.push(ChatMessage {
                    role: "assistant".into(),
                    content: g.text,
                });
            }
            Err(e) => {
                // The conversation no longer fits (or another request-level problem): say so and
                // let the user go on or /reset.
                msgs.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

fn cmd_bench_micro(a: MicroArgs) -> Result<()> {
    if a.reps == 0 || a.steps == 0 || a.prefill == 0 || a.batch.contains(&0) {
        bail!("--reps, --steps, --prefill and every --batch must be at least 1");
    }
    let pool = thread_pool(a.common.threads)?;
    let threads = pool.current_num_threads();
    let mut out = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    pool.install(|| {
        let l = load(&a.common)?;
        let max_ctx = a.context.iter().max().copied().unwrap_or(0) + a.steps + 1;
        if max_ctx.max(a.prefill + 1) > l.n_ctx {
            bail!(
                "the benchmark needs {} tokens of context, more than --ctx-size {}",
                max_ctx.max(a.prefill + 1),
                l.n_ctx
            );
        }
        let cfg = ep_bench::micro::MicroConfig {
            prefill_tokens: a.prefill,
            batches: a.batch.clone(),
            contexts: a.context.clone(),
            decode_steps: a.steps,
            reps: a.reps,
            threads,
        };
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("bench micro [{bar:30}] {pos}/{len} runs")
                .expect("static template")
                .progress_chars("=> "),
        );
        let recs = ep_bench::micro::run(&l.model, &cfg, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        println!(
            "{:<8} {:>5} {:>8} {:>10}",
            "kind", "batch", "context", "tok/s"
        );
        for r in &recs {
            println!(
                "{:<8} {:>5} {:>8} {:>10.1}",
                r.kind, r.batch, r.context, r.tok_s
            );
            if let Some(f) = out.as_mut() {
                writeln!(f, "{}", serde_json::to_string(r)?)?;
            }
        }
        Ok(())
    })
}

fn cmd_bench_batch(a: BatchArgs) -> Result<()> {
    let pool = Arc::new(thread_pool(a.common.threads)?);
    let threads = pool.current_num_threads();
    let datasets = ep_bench::batch::datasets_dir(a.datasets.clone());
    if let Some(d) = &datasets {
        if !d.join("mmlu").is_dir() {
            bail!("datasets directory {} has no mmlu/ folder", d.display());
        }
    }
    let mut out = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let l = pool.install(|| load(&a.common))?;
    let max_prefix = a.prefix_tokens.iter().max().copied().unwrap_or(0);
    let cfg = ep_bench::batch::BatchConfig {
        modes: a.modes.clone(),
        prefix_tokens: a.prefix_tokens.clone(),
        batches: a.batch.clone(),
        groups: a.groups.clone(),
        gen: a.gen,
        reps: a.reps,
        datasets,
        engine: EngineConfig {
            max_seqs: a.batch.iter().max().copied().unwrap_or(1),
            ..a.engine.config(l.n_ctx.max(max_prefix + 1024))?
        },
        threads,
    };
    let model = Arc::new(l.model);
    let tok = Arc::new(l.tok);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("bench batch [{bar:30}] {pos}/{len} runs")
            .expect("static template")
            .progress_chars("=> "),
    );
    let recs = ep_bench::batch::run(&model, &tok, &cfg, Some(pool), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "{:<7} {:>6} {:>5} {:>6} {:>12} {:>8} {:>9} {:>9}  outputs",
        "mode", "prefix", "batch", "groups", "decode tok/s", "step ms", "req/s", "prefill s"
    );
    for r in &recs {
        println!(
            "{:<7} {:>6} {:>5} {:>6} {:>12.1} {:>8.1} {:>9.2} {:>9.2}  {}",
            r.mode,
            r.prefix_tokens,
            r.batch,
            r.groups,
            r.decode_tok_s,
            r.step_ms,
            r.requests_per_s,
            r.prefill_s,
            &r.outputs_sha256[..12]
        );
        if let Some(f) = out.as_mut() {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
    }
    Ok(())
}

fn cmd_bench_codecs(a: CodecsArgs) -> Result<()> {
    let pool = thread_pool(a.common.threads)?;
    let Some(datasets) = ep_bench::batch::datasets_dir(a.datasets.clone()) else {
        bail!("bench codecs needs MMLU: pass --datasets DIR (holding mmlu/dev and mmlu/test) or set $EDGEPROMPT_DATASETS");
    };
    if !datasets.join("mmlu").is_dir() {
        bail!(
            "datasets directory {} has no mmlu/ folder",
            datasets.display()
        );
    }
    let mut out = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    pool.install(|| {
        let l = load(&a.common)?;
        let cfg = ep_bench::codecs::CodecsConfig {
            datasets,
            questions: a.questions,
            codecs: a.codecs.clone(),
            cont_tokens: a.cont_tokens,
            frame_tokens: a.frame_tokens,
            block_tokens: 16,
        };
        let bar = ProgressBar::new(a.questions as u64).with_style(
            ProgressStyle::with_template(
                "bench codecs [{bar:30}] {pos}/{len} questions ({elapsed}, eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let t0 = std::time::Instant::now();
        let recs = ep_bench::codecs::run(&l.model, &l.tok, &cfg, |done, _| {
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        eprintln!(
            "{} questions, {} codecs in {:.1} s",
            a.questions,
            recs.len(),
            t0.elapsed().as_secs_f64()
        );
        println!(
            "{:<16} {:>9} {:>7} {:>7} {:>7} {:>9} {:>6} {:>9} {:>9}",
            "codec",
            "B/token",
            "vs f16",
            "top-1",
            "answer",
            "mean KL",
            "acc",
            "enc MB/s",
            "dec MB/s"
        );
        for r in &recs {
            println!(
                "{:<16} {:>9.1} {:>6.2}x {:>7.4} {:>7.3} {:>9.2e} {:>6.3} {:>9.1} {:>9.1}",
                r.codec,
                r.bytes_per_token,
                r.compression_vs_f16,
                r.top1_agreement,
                r.answer_agreement,
                r.mean_kl,
                r.accuracy,
                r.encode_mb_s,
                r.decode_mb_s
            );
            if let Some(f) = out.as_mut() {
                writeln!(f, "{}", serde_json::to_string(r)?)?;
            }
        }
        Ok(())
    })
}

/// Reads a KV frame stream, checking every digest, before anything of it is used.
fn read_kv_file(
    path: &std::path::Path,
) -> Result<(ep_kv::wire::KvHeader, Vec<ep_kv::wire::Frame>)> {
    use ep_kv::wire::{Item, StreamReader};
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut r = StreamReader::new();
    r.push(&bytes);
    let mut header = None;
    let mut frames = Vec::new();
    loop {
        match r
            .next_item()
            .with_context(|| format!("{}: not a valid KV file", path.display()))?
        {
            Some(Item::Header(h)) => header = Some(h),
            Some(Item::Frame(f)) => frames.push(f),
            None => break,
        }
    }
    if r.pending_bytes() > 0 {
        bail!(
            "{}: truncated KV file ({} bytes after the last whole frame)",
            path.display(),
            r.pending_bytes()
        );
    }
    let header = header.with_context(|| format!("{}: empty KV file", path.display()))?;
    let n_layer = header.layout.n_layer as usize;
    let n = header.tokens.len();
    let mut covered = vec![0usize; n_layer];
    for f in &frames {
        covered[f.layer as usize] += (f.end - f.start) as usize;
    }
    if let Some(l) = covered.iter().position(|&c| c != n) {
        bail!(
            "{}: layer {l} covers {} of the {n} tokens",
            path.display(),
            covered[l]
        );
    }
    Ok((header, frames))
}

fn cmd_kv_export(a: KvExportArgs) -> Result<()> {
    if a.frame_tokens == 0 {
        bail!("--frame-tokens must be at least 1");
    }
    let sv = serve(&a.common, &a.engine, thread_pool(a.common.threads)?)?;
    let t = sv
        .template
        .as_ref()
        .context("the model has no chat template (tokenizer.chat_template)")?;
    let tokens =
        ep_model::chat::render_prompt(&sv.tok, t, &messages(&Some(a.system.clone())), false)?
            .tokens;
    let kv = sv.engine.export_blocking(tokens)?;
    let (header, frames) = kv.to_frames(sv.engine.identity().digest(), a.frame_tokens);
    let bytes = ep_engine::kvio::encode_stream(&header, &frames);
    let dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(&bytes)?;
    tmp.persist(&a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "wrote {}: {} tokens, {} layers in {} frames, {} bytes ({:.0} per token), identity {}",
        a.out.display(),
        header.tokens.len(),
        header.layout.n_layer,
        frames.len(),
        bytes.len(),
        bytes.len() as f64 / header.tokens.len().max(1) as f64,
        sv.engine.identity().to_hex()
    );
    Ok(())
}

fn cmd_identity(a: IdentityArgs) -> Result<()> {
    use ep_kv::identity::{hex, ContentIdentity, CODEC_RAW};
    let common = Common {
        model: a.model,
        threads: None,
        ctx_size: None,
    };
    let l = load(&common)?;
    let id = ContentIdentity::of(&l.model, &l.tok);
    if !a.json {
        println!("{}", id.to_hex());
        return Ok(());
    }
    let j = serde_json::json!({
        "identity": id.to_hex(),
        "digest": hex(&id.digest()),
        "arch": id.arch,
        "n_layer": id.n_layer,
        "n_embd": id.n_embd,
        "n_ff": id.n_ff,
        "n_head": id.n_head,
        "n_head_kv": id.n_head_kv,
        "head_dim": id.head_dim,
        "n_vocab": id.n_vocab,
        "rope": if id.rope_neox { "neox" } else { "norm" },
        "rope_dims": id.rope_dims,
        "rope_base": id.rope_base,
        "rope_freq_scale": id.rope_freq_scale,
        "rms_eps": id.rms_eps,
        "biases": id.biases,
        "f32_activations": id.f32_activations,
        "numerics_version": id.numerics_version,
        "backend": id.backend,
        "tokenizer": hex(&id.tokenizer),
        "weights": hex(&id.weights),
        "cache_root_f16_16_raw": id.cache_root(KvDtype::F16, 16, CODEC_RAW).to_hex(),
    });
    println!("{j}");
    Ok(())
}

/// Servers and load generators hold a socket per client: the soft limit on open files (often 1,024)
/// is raised to the hard limit, as servers commonly do, so thousands of connections are refused by
/// the server's own queue (429) rather than by `accept` failing.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEPROMPT_LOG")
                // Warnings, how each cloud prompt's KV is obtained (the edge's decisions), and
                // the cloud's life of a prompt (registered, computing, taken over, ready, deleted:
                // a few lines per prompt, none per request).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,ep_edge::decision=info,ep_cloud=info")
                })
                // The tokenizers crate traces every character it normalises, i.e. the prompts'
                // text: none of its logging is kept, whatever EDGEPROMPT_LOG asks for
                // (tests/security.rs greps a canary run's logs).
                .add_directive("tokenizers=off".parse().expect("a valid directive")),
        )
        .init();
    let cli = Cli::parse();
    raise_open_file_limit();
    let r = match cli.cmd {
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Bench(BenchCommand::Micro(a)) => cmd_bench_micro(a),
        Command::Bench(BenchCommand::Batch(a)) => cmd_bench_batch(a),
        Command::Bench(BenchCommand::Codecs(a)) => cmd_bench_codecs(a),
        Command::Bench(BenchCommand::Network(a)) => netbench::run(a),
        Command::Bench(BenchCommand::Serve(a)) => servebench::run(a),
        Command::Bench(BenchCommand::Reliability(a)) => relbench::run(a),
        Command::Identity(a) => cmd_identity(a),
        Command::Kv(KvCommand::Export(a)) => cmd_kv_export(a),
        Command::Edge(a) => edge_cmd::run(a),
        Command::Cloud(a) => cloud_cmd::run(a),
        Command::Up(a) => up_cmd::run(a),
        Command::Netlab(a) => netlab_cmd::run(a),
        Command::Fleet(a) => fleet::run(a),
        Command::Model(a) => model_cmd::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
