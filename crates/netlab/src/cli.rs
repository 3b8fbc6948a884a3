//! The command line of the tool, shared by the `ep-netlab` binary and `edgeprompt netlab`:
//! `up`, `down`, `measure`, and the hidden helper subcommands `forward`, `sink` and `source` that
//! [`crate::Link`] starts.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::probe::{run_sink, run_source, ProbeMode};
use crate::{run_forwarder, teardown, ForwarderConfig, Link, Names, NetlabError, Profile};

/// `netlab …`: the emulated cloud–edge link.
#[derive(Debug, Args)]
pub struct NetlabArgs {
    #[command(subcommand)]
    pub command: NetlabCommand,
}

#[derive(Debug, Subcommand)]
pub enum NetlabCommand {
    /// Build the namespaces and the shaped link, measure it, print the achieved figures as JSON,
    /// then wait for Ctrl-C or SIGTERM and tear down.
    Up(UpArgs),
    /// Tear down the link with this prefix (idempotent).
    Down(PrefixArgs),
    /// Measure a link that `up` built (RTT, goodput both ways) and print JSON.
    Measure(PrefixArgs),
    /// Helper: the TUN link emulator (started by `up`).
    #[command(hide = true)]
    Forward(ForwardArgs),
    /// Helper: the measuring sink (runs in the cloud namespace).
    #[command(hide = true)]
    Sink(SinkArgs),
    /// Helper: the measuring source (runs in the edge namespace).
    #[command(hide = true)]
    Source(SourceArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A named profile: fiber, ideal_6g, 5g_urban, cell_edge, congested.
    #[arg(long, required_unless_present = "link", conflicts_with = "link")]
    pub profile: Option<String>,
    /// A custom link: MBIT,RTT_MS,LOSS_PCT (for example 50,40,0).
    #[arg(long)]
    pub link: Option<String>,
    /// Uniform jitter on each direction in ms (packets may then reorder).
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Prefix of the namespaces and devices.
    #[arg(long, default_value = "ep")]
    pub prefix: String,
    /// Skip the measurement.
    #[arg(long)]
    pub no_measure: bool,
    /// Tear down right after printing instead of waiting for a signal.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct PrefixArgs {
    /// Prefix of the namespaces and devices.
    #[arg(long, default_value = "ep")]
    pub prefix: String,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[arg(long, default_value = "ep")]
    pub prefix: String,
    /// One-way delay of each direction, ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Exit when stdin closes (the parent that started us went away).
    #[arg(long)]
    pub watch_stdin: bool,
}

#[derive(Debug, Args)]
pub struct SinkArgs {
    #[arg(long)]
    pub listen: SocketAddr,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    #[arg(long, value_enum)]
    pub mode: ProbeMode,
    /// Ping-pongs for `rtt`.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Transfer window for `down`/`up`, ms.
    #[arg(long, default_value_t = 2000)]
    pub window_ms: u64,
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1e3)
}

fn print_link(link: &Link, achieved: Option<&crate::Achieved>) {
    let j = json!({
        "prefix": link.names().prefix,
        "profile": link.profile(),
        "cloud_ns": link.cloud_ns(),
        "edge_ns": link.edge_ns(),
        "cloud_link_ip": link.cloud_link_ip().to_string(),
        "cloud_ctl_ip": link.cloud_ctl_ip().to_string(),
        "edge_ctl_ip": link.edge_ctl_ip().to_string(),
        "loss_method": link.loss_method(),
        "delay_method": link.delay_method(),
        "achieved": achieved,
    });
    println!("{}", serde_json::to_string_pretty(&j).expect("json"));
}

fn wait_for_signal() -> Result<(), NetlabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetlabError::Forwarder(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| NetlabError::Forwarder(format!("SIGTERM handler: {e}")))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

/// Runs one `netlab` subcommand.
pub fn run(args: NetlabArgs) -> Result<(), NetlabError> {
    match args.command {
        NetlabCommand::Up(a) => {
            let profile = match (&a.profile, &a.link) {
                (Some(p), _) => Profile::named(p)?,
                (None, Some(l)) => Profile::parse_custom(l)?,
                (None, None) => {
                    return Err(NetlabError::Profile(
                        "give --profile NAME or --link MBIT,RTT_MS,LOSS_PCT".into(),
                    ))
                }
            }
            .with_jitter(a.jitter_ms);
            let link = Link::up(&a.prefix, &profile)?;
            let achieved = if a.no_measure {
                None
            } else {
                Some(link.measure()?)
            };
            print_link(&link, achieved.as_ref());
            if !a.once {
                eprintln!(
                    "link '{}' is up; Ctrl-C or SIGTERM tears it down",
                    link.names().prefix
                );
                wait_for_signal()?;
            }
            link.down()
        }
        NetlabCommand::Down(a) => {
            crate::ensure_root()?;
            teardown(&a.prefix)
        }
        NetlabCommand::Measure(a) => {
            crate::ensure_root()?;
            let link = Link::attach(&a.prefix)?;
            let achieved = link.measure()?;
            print_link(&link, Some(&achieved));
            Ok(())
        }
        NetlabCommand::Forward(a) => {
            let n = Names::new(&a.prefix)?;
            if a.watch_stdin {
                std::thread::spawn(|| {
                    let mut sink = Vec::new();
                    let _ = std::io::stdin().read_to_end(&mut sink);
                    tracing::debug!("stdin closed: forwarder exits");
                    std::process::exit(0);
                });
            }
            let cfg = ForwarderConfig {
                cloud_dev: n.cloud_dev,
                edge_dev: n.edge_dev,
                delay: ms(a.delay_ms),
                jitter: ms(a.jitter_ms),
                loss_pct: a.loss_pct,
            };
            run_forwarder(&cfg, || println!("ready"))
        }
        NetlabCommand::Sink(a) => run_sink(a.listen, || println!("ready")),
        NetlabCommand::Source(a) => {
            let r = run_source(
                a.connect,
                a.mode,
                a.count,
                Duration::from_millis(a.window_ms),
            )?;
            println!("{}", serde_json::to_string(&r).expect("json"));
            Ok(())
        }
    }
}
