//! `ep-netlab`: the project's emulated-link test tool. Two network namespaces, a "cloud" host and an
//! "edge" host, joined by a link with real packet behaviour in both directions:
//!
//! - rate: `tbf` on each side's egress of the shaped link;
//! - loss: an nftables `numgen random` drop rule on each side's input (or, without `nft`, drops in
//!   the forwarder; or netem's loss where the kernel has netem);
//! - delay and jitter: a userspace link emulator (the forwarder, [`run_forwarder`]) between two TUN
//!   devices, or netem where the kernel has it (probed once).
//!
//! Two unshaped veth control links let the root namespace reach both hosts.
//!
//! The forwarder and the measuring endpoints run as helper processes: `forward`, `sink` and `source`
//! subcommands of the `ep-netlab` binary of this crate, or of `edgeprompt netlab`. [`Helper::locate`]
//! finds one: `$EP_NETLAB_BIN` (an `ep-netlab` or `edgeprompt` binary), else the current executable
//! when it is one of those two, else an `ep-netlab` or `edgeprompt` binary next to the current
//! executable or one folder up (test binaries live in `target/*/deps`). Tests pass
//! `env!("CARGO_BIN_EXE_ep-netlab")` to [`Link::up_with`].

pub mod cli;
pub mod cmds;
pub mod forward;
pub mod probe;
pub mod profile;
pub mod queue;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use cmds::Cmd;
pub use forward::{run_forwarder, ForwarderConfig};
pub use probe::{ProbeMode, ProbeResult};
pub use profile::Profile;

/// Why this machine cannot build links (not root, `ip netns` refused, no TUN device), if it cannot:
/// tests that need a link skip with this reason.
pub fn unavailable_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    if uid != "0" {
        return Some(format!("not root (uid {uid})"));
    }
    let ns = "epnetlab-chk";
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    match Command::new("ip").args(["netns", "add", ns]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        Ok(o) => {
            return Some(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("`ip` not runnable: {e}")),
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

/// Errors of the tool; those of external commands name the command line and its stderr.
#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    #[error("netlab needs root (it creates network namespaces); running as uid {0}")]
    NotRoot(String),
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` could not be started: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Profile(String),
    #[error("invalid prefix '{0}': use 1 to 10 characters [a-z0-9]")]
    Prefix(String),
    #[error("forwarder: {0}")]
    Forwarder(String),
    #[error("measure: {0}")]
    Measure(String),
    #[error("helper binary: {0}")]
    Helper(String),
    #[error("state of link '{prefix}': {msg}")]
    State { prefix: String, msg: String },
}

/// How the link drops packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossMethod {
    /// nftables `numgen random` rule on each namespace's input.
    Nft,
    /// The TUN forwarder drops (nft is not installed).
    Forwarder,
    /// netem `loss`.
    Netem,
}

/// How the link delays packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelayMethod {
    /// The userspace forwarder between two TUN devices.
    Tun,
    /// netem `delay` on each side's egress.
    Netem,
}

/// What [`Link::measure`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Achieved {
    /// Median TCP ping-pong round trip over the shaped link, ms.
    pub rtt_ms: f64,
    /// Bulk TCP goodput cloud -> edge, Mbit/s.
    pub down_mbit: f64,
    /// Bulk TCP goodput edge -> cloud, Mbit/s.
    pub up_mbit: f64,
    /// `nft`, `forwarder` or `netem`.
    pub loss_method: LossMethod,
    /// `tun` or `netem`.
    pub delay_method: DelayMethod,
}

/// The program that runs the helper subcommands (`forward`, `sink`, `source`).
#[derive(Debug, Clone)]
pub struct Helper {
    program: PathBuf,
    lead: Vec<String>,
}

impl Helper {
    /// `program` with `lead` arguments before the subcommand (`["netlab"]` for `edgeprompt`).
    pub fn new(program: impl Into<PathBuf>, lead: &[&str]) -> Helper {
        Helper {
            program: program.into(),
            lead: lead.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A helper for a binary path: `edgeprompt` gets the `netlab` lead argument.
    pub fn for_binary(path: impl Into<PathBuf>) -> Helper {
        let path = path.into();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if stem.starts_with("edgeprompt") {
            Helper::new(path, &["netlab"])
        } else {
            Helper::new(path, &[])
        }
    }

    /// Finds the helper (see the crate docs for the order).
    pub fn locate() -> Result<Helper, NetlabError> {
        if let Ok(p) = std::env::var("EP_NETLAB_BIN") {
            if !Path::new(&p).is_file() {
                return Err(NetlabError::Helper(format!(
                    "EP_NETLAB_BIN={p} is not a file"
                )));
            }
            return Ok(Helper::for_binary(p));
        }
        let exe = std::env::current_exe()
            .map_err(|e| NetlabError::Helper(format!("current_exe: {e}")))?;
        let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if stem == "ep-netlab" || stem == "edgeprompt" {
            return Ok(Helper::for_binary(exe));
        }
        let dirs: Vec<&Path> = exe
            .parent()
            .into_iter()
            .chain(exe.parent().and_then(Path::parent))
            .collect();
        for name in ["ep-netlab", "edgeprompt"] {
            for d in &dirs {
                let p = d.join(name);
                if p.is_file() {
                    return Ok(Helper::for_binary(p));
                }
            }
        }
        Err(NetlabError::Helper(format!(
            "no ep-netlab or edgeprompt binary beside {} (set EP_NETLAB_BIN)",
            exe.display()
        )))
    }

    /// The helper's command line for `sub` (optionally inside namespace `ns`).
    fn command(&self, ns: Option<&str>, sub: &str, args: &[String]) -> (Command, String) {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        c.args(&self.lead).arg(sub).args(args);
        let mut line = match ns {
            Some(ns) => format!("ip netns exec {ns} {}", self.program.display()),
            None => self.program.display().to_string(),
        };
        for a in self
            .lead
            .iter()
            .chain(std::iter::once(&sub.to_string()))
            .chain(args)
        {
            line.push(' ');
            line.push_str(a);
        }
        (c, line)
    }
}

/// The names and addresses of one link (everything derives from the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
    pub cloud_ns: String,
    pub edge_ns: String,
    /// Shaped-link device in the cloud namespace.
    pub cloud_dev: String,
    /// Shaped-link device in the edge namespace.
    pub edge_dev: String,
    /// Control veth: root side towards the cloud, and its peer in the cloud namespace.
    pub root_cloud_veth: String,
    pub cloud_veth: String,
    /// Control veth: root side towards the edge, and its peer in the edge namespace.
    pub root_edge_veth: String,
    pub edge_veth: String,
    /// nft table (family inet) in each namespace.
    pub table: String,
    /// Third octet of the control subnets (0 for the default prefix `ep`), so that links with
    /// different prefixes can coexist in the root namespace.
    pub ctl_net: u8,
}

impl Names {
    /// Names for `prefix` (1 to 10 characters `[a-z0-9]`).
    pub fn new(prefix: &str) -> Result<Names, NetlabError> {
        if prefix.is_empty()
            || prefix.len() > 10
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(NetlabError::Prefix(prefix.to_string()));
        }
        let ctl_net = if prefix == "ep" {
            0
        } else {
            // FNV-1a: a stable small number per prefix.
            let h = prefix.bytes().fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
            1 + (h % 250) as u8
        };
        let p = prefix;
        Ok(Names {
            prefix: p.to_string(),
            cloud_ns: format!("{p}-cloud"),
            edge_ns: format!("{p}-edge"),
            cloud_dev: format!("{p}c0"),
            edge_dev: format!("{p}e0"),
            root_cloud_veth: format!("{p}hc"),
            cloud_veth: format!("{p}hc1"),
            root_edge_veth: format!("{p}he"),
            edge_veth: format!("{p}he1"),
            table: format!("{p}link"),
            ctl_net,
        })
    }

    pub fn cloud_link_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 1)
    }
    pub fn edge_link_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 2)
    }
    pub fn root_cloud_ctl_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.ctl_net, 1)
    }
    pub fn cloud_ctl_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.ctl_net, 2)
    }
    pub fn root_edge_ctl_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.ctl_net, 1)
    }
    pub fn edge_ctl_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.ctl_net, 2)
    }
}

/// What a running link records for later `measure`/`down` calls from other processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    mbit: f64,
    rtt_ms: f64,
    loss_pct: f64,
    jitter_ms: f64,
    name: String,
    forwarder_pid: Option<u32>,
    loss_method: LossMethod,
    delay_method: DelayMethod,
}

const STATE_DIR: &str = "/run/ep-netlab";

fn state_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}.json"))
}

/// An emulated link. Dropping an owned link tears it down (best effort); [`Link::down`] reports
/// errors.
#[derive(Debug)]
pub struct Link {
    names: Names,
    profile: Profile,
    helper: Helper,
    forwarder: Option<Child>,
    loss_method: LossMethod,
    delay_method: DelayMethod,
    /// Whether this value built the link (and so tears it down on drop).
    owned: bool,
}

/// Checks for root.
pub fn ensure_root() -> Result<(), NetlabError> {
    let out = Cmd::new("id", &["-u"]).run()?;
    let uid = out.trim();
    if uid != "0" {
        return Err(NetlabError::NotRoot(uid.to_string()));
    }
    Ok(())
}

/// Whether `nft` is installed.
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the kernel has netem (probed once per process in a scratch namespace).
pub fn netem_available(prefix: &str) -> bool {
    static NETEM: OnceLock<bool> = OnceLock::new();
    *NETEM.get_or_init(|| {
        let ns = format!("{prefix}-probe");
        let _ = Cmd::new("ip", &["netns", "del", &ns]).run();
        if Cmd::new("ip", &["netns", "add", &ns]).run().is_err() {
            return false;
        }
        let ok = Cmd::new(
            "tc",
            &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        )
        .in_ns(&ns)
        .run()
        .is_ok();
        let _ = Cmd::new("ip", &["netns", "del", &ns]).run();
        debug!(netem = ok, "netem probe");
        ok
    })
}

const GONE: &[&str] = &[
    "No such file",
    "Cannot find device",
    "does not exist",
    "No such process",
];

/// Tears down every piece of the link with `prefix` that exists (idempotent): the forwarder named in
/// its state file, both namespaces (with the shaped devices in them), the control veths, and shaped
/// devices still in the root namespace.
pub fn teardown(prefix: &str) -> Result<(), NetlabError> {
    let n = Names::new(prefix)?;
    if let Ok(text) = std::fs::read_to_string(state_path(prefix)) {
        if let Ok(st) = serde_json::from_str::<State>(&text) {
            if let Some(pid) = st.forwarder_pid {
                kill_forwarder(pid, prefix);
            }
        }
    }
    for ns in [&n.cloud_ns, &n.edge_ns] {
        if Path::new("/run/netns").join(ns).exists() {
            Cmd::new("ip", &["netns", "del", ns]).run_ignoring(GONE)?;
        }
    }
    for dev in [
        &n.root_cloud_veth,
        &n.root_edge_veth,
        &n.cloud_dev,
        &n.edge_dev,
    ] {
        if Path::new("/sys/class/net").join(dev).exists() {
            Cmd::new("ip", &["link", "del", dev]).run_ignoring(GONE)?;
        }
    }
    let _ = std::fs::remove_file(state_path(prefix));
    Ok(())
}

/// Kills a forwarder process of `prefix` by pid, after checking that the pid still is one.
fn kill_forwarder(pid: u32, prefix: &str) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_ours = args.iter().any(|a| *a == b"forward")
        && args
            .windows(2)
            .any(|w| w[0] == b"--prefix" && w[1] == prefix.as_bytes());
    if is_ours {
        debug!(pid, "killing forwarder");
        let _ = Cmd::new("kill", &[&pid.to_string()]).run();
    }
}

/// Reads lines of a child's stdout until `ready` (or it ends, or the timeout passes).
fn wait_ready(child: &mut Child, what: &str, timeout: Duration) -> Result<(), NetlabError> {
    let out = child
        .stdout
        .take()
        .ok_or_else(|| NetlabError::Forwarder(format!("{what}: no stdout")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let ok = matches!(r.read_line(&mut line), Ok(n) if n > 0) && line.trim() == "ready";
        let _ = tx.send(ok);
        // Keep reading so that the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut r, &mut sink);
    });
    match rx.recv_timeout(timeout) {
        Ok(true) => Ok(()),
        Ok(false) => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(NetlabError::Forwarder(format!(
                "`{what}` exited before it was ready ({status}; its stderr is above)"
            )))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(NetlabError::Forwarder(format!(
                "`{what}` was not ready within {timeout:?}"
            )))
        }
    }
}

fn fmt_ms(ms: f64) -> String {
    format!("{ms}")
}

impl Link {
    /// Builds the namespaces and the shaped link for `profile`, with the helper found by
    /// [`Helper::locate`]. Root only.
    pub fn up(prefix: &str, profile: &Profile) -> Result<Link, NetlabError> {
        Link::up_with(prefix, profile, Helper::locate()?)
    }

    /// [`Link::up`] with an explicit helper binary.
    pub fn up_with(prefix: &str, profile: &Profile, helper: Helper) -> Result<Link, NetlabError> {
        ensure_root()?;
        let names = Names::new(prefix)?;
        teardown(prefix)?;
        let netem = match std::env::var("EP_NETLAB_DELAY").as_deref() {
            Ok("tun") => false,
            Ok("netem") => true,
            _ => netem_available(prefix),
        };
        let nft = std::env::var("EP_NETLAB_LOSS").as_deref() != Ok("forwarder") && nft_available();
        let (delay_method, loss_method) = if netem {
            (DelayMethod::Netem, LossMethod::Netem)
        } else if nft {
            (DelayMethod::Tun, LossMethod::Nft)
        } else {
            (DelayMethod::Tun, LossMethod::Forwarder)
        };
        let mut link = Link {
            names,
            profile: profile.clone(),
            helper,
            forwarder: None,
            loss_method,
            delay_method,
            owned: true,
        };
        // On error, the drop of `link` tears down what was built.
        link.build()?;
        info!(
            prefix, profile = %profile.name, mbit = profile.mbit, rtt_ms = profile.rtt_ms,
            loss_pct = profile.loss_pct, ?delay_method, ?loss_method, "link up"
        );
        Ok(link)
    }

    fn build(&mut self) -> Result<(), NetlabError> {
        let n = self.names.clone();
        let p = self.profile.clone();
        for ns in [&n.cloud_ns, &n.edge_ns] {
            Cmd::new("ip", &["netns", "add", ns]).run()?;
            Cmd::new("ip", &["link", "set", "lo", "up"])
                .in_ns(ns)
                .run()?;
        }
        match self.delay_method {
            DelayMethod::Netem => {
                Cmd::new(
                    "ip",
                    &[
                        "link",
                        "add",
                        &n.cloud_dev,
                        "netns",
                        &n.cloud_ns,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &n.edge_dev,
                        "netns",
                        &n.edge_ns,
                    ],
                )
                .run()?;
            }
            DelayMethod::Tun => {
                let loss = if self.loss_method == LossMethod::Forwarder {
                    p.loss_pct
                } else {
                    0.0
                };
                let args: Vec<String> = [
                    "--prefix",
                    &n.prefix,
                    "--delay-ms",
                    &fmt_ms(p.one_way_ms()),
                    "--jitter-ms",
                    &fmt_ms(p.jitter_ms),
                    "--loss-pct",
                    &fmt_ms(loss),
                    "--watch-stdin",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let (mut c, line) = self.helper.command(None, "forward", &args);
                let mut child = c
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| NetlabError::Spawn {
                        cmd: line.clone(),
                        source: e,
                    })?;
                let ready = wait_ready(&mut child, &line, Duration::from_secs(15));
                self.forwarder = Some(child);
                ready?;
                Cmd::new("ip", &["link", "set", &n.cloud_dev, "netns", &n.cloud_ns]).run()?;
                Cmd::new("ip", &["link", "set", &n.edge_dev, "netns", &n.edge_ns]).run()?;
            }
        }
        let mtu = forward::MTU.to_string();
        for (ns, dev, me, peer) in [
            (
                &n.cloud_ns,
                &n.cloud_dev,
                n.cloud_link_ip(),
                n.edge_link_ip(),
            ),
            (&n.edge_ns, &n.edge_dev, n.edge_link_ip(), n.cloud_link_ip()),
        ] {
            let (me, peer) = (me.to_string(), peer.to_string());
            Cmd::new("ip", &["link", "set", "dev", dev, "mtu", &mtu])
                .in_ns(ns)
                .run()?;
            Cmd::new("ip", &["addr", "add", &me, "peer", &peer, "dev", dev])
                .in_ns(ns)
                .run()?;
            Cmd::new("ip", &["link", "set", "dev", dev, "up"])
                .in_ns(ns)
                .run()?;
            if self.delay_method == DelayMethod::Netem {
                cmds::netem_cmd(dev, &p).in_ns(ns).run()?;
                cmds::tbf_cmd(dev, &p, true).in_ns(ns).run()?;
            } else {
                cmds::tbf_cmd(dev, &p, false).in_ns(ns).run()?;
            }
            if self.loss_method == LossMethod::Nft {
                cmds::nft_cmd(&n.table, dev, p.loss_pct).in_ns(ns).run()?;
            }
        }
        for (root_dev, ns_dev, ns, root_ip, ns_ip) in [
            (
                &n.root_cloud_veth,
                &n.cloud_veth,
                &n.cloud_ns,
                n.root_cloud_ctl_ip(),
                n.cloud_ctl_ip(),
            ),
            (
                &n.root_edge_veth,
                &n.edge_veth,
                &n.edge_ns,
                n.root_edge_ctl_ip(),
                n.edge_ctl_ip(),
            ),
        ] {
            Cmd::new(
                "ip",
                &[
                    "link", "add", root_dev, "type", "veth", "peer", "name", ns_dev, "netns", ns,
                ],
            )
            .run()?;
            Cmd::new(
                "ip",
                &["addr", "add", &format!("{root_ip}/30"), "dev", root_dev],
            )
            .run()?;
            Cmd::new("ip", &["link", "set", root_dev, "up"]).run()?;
            Cmd::new(
                "ip",
                &["addr", "add", &format!("{ns_ip}/30"), "dev", ns_dev],
            )
            .in_ns(ns)
            .run()?;
            Cmd::new("ip", &["link", "set", ns_dev, "up"])
                .in_ns(ns)
                .run()?;
        }
        let st = State {
            mbit: p.mbit,
            rtt_ms: p.rtt_ms,
            loss_pct: p.loss_pct,
            jitter_ms: p.jitter_ms,
            name: p.name.clone(),
            forwarder_pid: self.forwarder.as_ref().map(Child::id),
            loss_method: self.loss_method,
            delay_method: self.delay_method,
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(STATE_DIR)?;
            std::fs::write(state_path(&n.prefix), serde_json::to_vec_pretty(&st)?)
        };
        write().map_err(|e| NetlabError::State {
            prefix: n.prefix.clone(),
            msg: format!("writing {}: {e}", state_path(&n.prefix).display()),
        })?;
        Ok(())
    }

    /// The link with `prefix` that another process brought up (for `measure`); dropping it leaves
    /// the link up.
    pub fn attach(prefix: &str) -> Result<Link, NetlabError> {
        Link::attach_with(prefix, Helper::locate()?)
    }

    /// [`Link::attach`] with an explicit helper binary.
    pub fn attach_with(prefix: &str, helper: Helper) -> Result<Link, NetlabError> {
        let names = Names::new(prefix)?;
        let path = state_path(prefix);
        let err = |msg: String| NetlabError::State {
            prefix: prefix.to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("{}: {e} (is the link up?)", path.display())))?;
        let st: State =
            serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
        for ns in [&names.cloud_ns, &names.edge_ns] {
            if !Path::new("/run/netns").join(ns).exists() {
                return Err(err(format!("namespace {ns} does not exist")));
            }
        }
        Ok(Link {
            names,
            profile: Profile {
                name: st.name,
                mbit: st.mbit,
                rtt_ms: st.rtt_ms,
                loss_pct: st.loss_pct,
                jitter_ms: st.jitter_ms,
            },
            helper,
            forwarder: None,
            loss_method: st.loss_method,
            delay_method: st.delay_method,
            owned: false,
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
    pub fn cloud_ns(&self) -> &str {
        &self.names.cloud_ns
    }
    pub fn edge_ns(&self) -> &str {
        &self.names.edge_ns
    }
    /// The cloud's address on the shaped link (what the edge dials): 10.77.0.1.
    pub fn cloud_link_ip(&self) -> Ipv4Addr {
        self.names.cloud_link_ip()
    }
    /// The edge's address on the shaped link: 10.77.0.2.
    pub fn edge_link_ip(&self) -> Ipv4Addr {
        self.names.edge_link_ip()
    }
    /// The cloud's address on its control link from the root namespace (10.78.0.2 for prefix `ep`).
    pub fn cloud_ctl_ip(&self) -> Ipv4Addr {
        self.names.cloud_ctl_ip()
    }
    /// The edge's address on its control link from the root namespace (10.79.0.2 for prefix `ep`).
    pub fn edge_ctl_ip(&self) -> Ipv4Addr {
        self.names.edge_ctl_ip()
    }
    pub fn loss_method(&self) -> LossMethod {
        self.loss_method
    }
    pub fn delay_method(&self) -> DelayMethod {
        self.delay_method
    }

    /// `ip netns exec NS program`.
    pub fn command_in(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Measures the link: median of 20 TCP ping-pongs, then bulk TCP goodput cloud -> edge and edge
    /// -> cloud for 2 s each (4 s below 10 Mbit/s), counted by the receiver. A sink runs in the
    /// cloud namespace on the shaped link's address, the sources in the edge namespace.
    pub fn measure(&self) -> Result<Achieved, NetlabError> {
        let window = if self.profile.mbit < 10.0 {
            Duration::from_secs(4)
        } else {
            Duration::from_secs(2)
        };
        self.measure_for(20, window)
    }

    /// [`Link::measure`] with `pings` round trips and transfers of `window` each.
    pub fn measure_for(&self, pings: usize, window: Duration) -> Result<Achieved, NetlabError> {
        let addr = SocketAddr::from((self.cloud_link_ip(), 47_100));
        let (mut c, line) = self.helper.command(
            Some(&self.names.cloud_ns),
            "sink",
            &["--listen".to_string(), addr.to_string()],
        );
        let mut sink = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| NetlabError::Spawn {
                cmd: line.clone(),
                source: e,
            })?;
        let r = wait_ready(&mut sink, &line, Duration::from_secs(10))
            .and_then(|()| self.run_probes(addr, pings, window));
        let _ = sink.kill();
        let _ = sink.wait();
        r
    }

    fn run_probes(
        &self,
        addr: SocketAddr,
        pings: usize,
        window: Duration,
    ) -> Result<Achieved, NetlabError> {
        let probe = |mode: &str| -> Result<ProbeResult, NetlabError> {
            let args: Vec<String> = [
                "--connect",
                &addr.to_string(),
                "--mode",
                mode,
                "--count",
                &pings.to_string(),
                "--window-ms",
                &window.as_millis().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let (mut c, line) = self
                .helper
                .command(Some(&self.names.edge_ns), "source", &args);
            let out = c
                .stdin(Stdio::null())
                .output()
                .map_err(|e| NetlabError::Spawn {
                    cmd: line.clone(),
                    source: e,
                })?;
            if !out.status.success() {
                return Err(NetlabError::Command {
                    cmd: line,
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str(text.trim())
                .map_err(|e| NetlabError::Measure(format!("`{line}` printed {text:?}: {e}")))
        };
        let rtt = probe("rtt")?;
        let down = probe("down")?;
        let up = probe("up")?;
        Ok(Achieved {
            rtt_ms: rtt.rtt_ms,
            down_mbit: down.mbit,
            up_mbit: up.mbit,
            loss_method: self.loss_method,
            delay_method: self.delay_method,
        })
    }

    /// Tears the link down: kills the forwarder, deletes both namespaces and the control veths.
    pub fn down(mut self) -> Result<(), NetlabError> {
        self.teardown_owned()
    }

    fn teardown_owned(&mut self) -> Result<(), NetlabError> {
        self.owned = false;
        if let Some(mut f) = self.forwarder.take() {
            let _ = f.kill();
            let _ = f.wait();
        }
        teardown(&self.names.prefix)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.teardown_owned() {
                warn!(prefix = %self.names.prefix, error = %e, "tearing down the link");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let n = Names::new("ep").unwrap();
        assert_eq!(
            (n.cloud_ns.as_str(), n.edge_ns.as_str()),
            ("ep-cloud", "ep-edge")
        );
        assert_eq!(
            (n.cloud_dev.as_str(), n.edge_dev.as_str()),
            ("epc0", "epe0")
        );
        assert_eq!(
            (n.root_cloud_veth.as_str(), n.cloud_veth.as_str()),
            ("ephc", "ephc1")
        );
        assert_eq!(
            (n.root_edge_veth.as_str(), n.edge_veth.as_str()),
            ("ephe", "ephe1")
        );
        assert_eq!(n.table, "eplink");
        assert_eq!(n.cloud_link_ip(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(n.cloud_ctl_ip(), Ipv4Addr::new(10, 78, 0, 2));
        assert_eq!(n.edge_ctl_ip(), Ipv4Addr::new(10, 79, 0, 2));
        let m = Names::new("ept").unwrap();
        assert_ne!(m.ctl_net, 0);
        assert_eq!(m.ctl_net, Names::new("ept").unwrap().ctl_net);
        for bad in ["", "EP", "ep-x", "abcdefghijk"] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn helper_lead_args() {
        assert_eq!(Helper::for_binary("/x/edgeprompt").lead, vec!["netlab"]);
        assert!(Helper::for_binary("/x/ep-netlab").lead.is_empty());
        let (_, line) = Helper::for_binary("/x/edgeprompt").command(
            Some("ep-edge"),
            "source",
            &["--mode".into(), "rtt".into()],
        );
        assert_eq!(
            line,
            "ip netns exec ep-edge /x/edgeprompt netlab source --mode rtt"
        );
    }
}
