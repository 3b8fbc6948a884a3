//! Construction of the `ip`, `tc` and `nft` commands (pure, unit-tested) and running them with errors
//! that name the command and its stderr.

use std::process::{Command, Stdio};

use tracing::debug;

use crate::{NetlabError, Profile};

/// One command line: program and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
}

impl Cmd {
    pub fn new(program: &str, args: &[&str]) -> Cmd {
        Cmd {
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `ip netns exec NS <self>`.
    pub fn in_ns(self, ns: &str) -> Cmd {
        let mut args = vec!["netns".to_string(), "exec".to_string(), ns.to_string()];
        args.push(self.program);
        args.extend(self.args);
        Cmd {
            program: "ip".to_string(),
            args,
        }
    }

    /// The command line as one shell-like string (for errors and logs).
    pub fn line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains([' ', '"', '{', '}', ';', '<']) {
                s.push('\'');
                s.push_str(a);
                s.push('\'');
            } else {
                s.push_str(a);
            }
        }
        s
    }

    /// Runs it; a non-zero exit is an error naming the command and its stderr.
    pub fn run(&self) -> Result<String, NetlabError> {
        debug!(cmd = %self.line(), "run");
        let out = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| NetlabError::Spawn {
                cmd: self.line(),
                source: e,
            })?;
        if !out.status.success() {
            return Err(NetlabError::Command {
                cmd: self.line(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs it, treating failures whose stderr matches one of `benign` as success (teardown of
    /// things that are already gone).
    pub fn run_ignoring(&self, benign: &[&str]) -> Result<(), NetlabError> {
        match self.run() {
            Ok(_) => Ok(()),
            Err(NetlabError::Command { ref stderr, .. })
                if benign.iter().any(|b| stderr.contains(b)) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// tbf parameters for one direction: (rate in bit/s, burst bytes, queue limit bytes).
pub fn tbf_params(p: &Profile) -> (u64, u64, u64) {
    let rate_bytes = p.rate_bytes();
    // At least 4 ms worth of tokens (HZ=250) and 32 KiB: tbf must not become the forwarder's limit
    // at high rates.
    let burst = (rate_bytes / 250.0).max(32.0 * 1024.0);
    // A queue of about one BDP plus some headroom, so TCP sees real queueing and drops at overflow.
    let limit = (p.bdp_bytes() * 1.25 + 16.0 * 1024.0).max(64.0 * 1024.0);
    (
        (p.mbit * 1e6).round() as u64,
        burst.ceil() as u64,
        limit.ceil() as u64,
    )
}

/// `tc qdisc replace dev DEV root tbf …` (or as the child of netem's class `1:1` when `parent`).
pub fn tbf_cmd(dev: &str, p: &Profile, under_netem: bool) -> Cmd {
    let (rate, burst, limit) = tbf_params(p);
    let (rate, burst, limit) = (format!("{rate}bit"), burst.to_string(), limit.to_string());
    let mut args = vec!["qdisc", "replace", "dev", dev];
    if under_netem {
        args.extend(["parent", "1:1", "handle", "10:"]);
    } else {
        args.push("root");
    }
    args.extend(["tbf", "rate", &rate, "burst", &burst, "limit", &limit]);
    Cmd::new("tc", &args)
}

/// `tc qdisc replace dev DEV root handle 1: netem delay …ms [jitter] loss …%` (delay and loss when
/// the kernel has netem).
pub fn netem_cmd(dev: &str, p: &Profile) -> Cmd {
    let delay = format!("{}ms", p.one_way_ms());
    let jitter = format!("{}ms", p.jitter_ms);
    let loss = format!("{}%", p.loss_pct);
    // netem holds the delayed packets: room for a few BDPs of 1500-byte packets.
    let limit = ((p.bdp_bytes() * 4.0 / 1500.0).ceil() as u64)
        .max(1000)
        .to_string();
    let mut args = vec![
        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "limit", &limit, "delay",
        &delay,
    ];
    if p.jitter_ms > 0.0 {
        args.push(&jitter);
    }
    if p.loss_pct > 0.0 {
        args.extend(["loss", &loss]);
    }
    Cmd::new("tc", &args)
}

/// The nft commands for the loss table `inet TABLE` of one namespace: an input-hook rule that drops
/// `loss_pct` percent of what arrives on `dev` (`numgen random mod 100000 < loss_pct × 1000`).
pub fn nft_cmd(table: &str, dev: &str, loss_pct: f64) -> Cmd {
    let n = ((loss_pct * 1000.0).round() as u64).to_string();
    let rule = format!("iifname \"{dev}\" numgen random mod 100000 < {n} drop");
    Cmd::new(
        "nft",
        &[&format!(
            "add table inet {table}; add chain inet {table} input {{ type filter hook input priority 0; policy accept; }}; add rule inet {table} input {rule}"
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prof(spec: &str) -> Profile {
        Profile::parse_custom(spec).unwrap()
    }

    #[test]
    fn tbf_for_slow_and_fast_links() {
        // 5 Mbit/s, 120 ms: BDP 75 kB.
        let (rate, burst, limit) = tbf_params(&prof("5,120,1"));
        assert_eq!(rate, 5_000_000);
        assert_eq!(burst, 32 * 1024);
        assert_eq!(limit, (75_000.0f64 * 1.25 + 16384.0).ceil() as u64);
        // 10 Gbit/s: burst is 4 ms of tokens.
        let (rate, burst, _) = tbf_params(&prof("10000,1,0"));
        assert_eq!((rate, burst), (10_000_000_000, 5_000_000));
        // 1 Mbit/s, 200 ms: the 64 KiB floor.
        assert_eq!(tbf_params(&prof("1,200,3")).2, 64 * 1024);
        let c = tbf_cmd("epe0", &prof("5,120,1"), false);
        assert_eq!(
            c.line(),
            "tc qdisc replace dev epe0 root tbf rate 5000000bit burst 32768 limit 110134"
        );
        let c = tbf_cmd("epc0", &prof("5,120,1"), true);
        assert!(c
            .line()
            .starts_with("tc qdisc replace dev epc0 parent 1:1 handle 10: tbf "));
    }

    #[test]
    fn netem_command() {
        let c = netem_cmd("epc0", &prof("5,120,1"));
        assert_eq!(
            c.line(),
            "tc qdisc replace dev epc0 root handle 1: netem limit 1000 delay 60ms loss 1%"
        );
        let c = netem_cmd("epc0", &prof("1000,5,0").with_jitter(2.0));
        assert_eq!(
            c.line(),
            "tc qdisc replace dev epc0 root handle 1: netem limit 1667 delay 2.5ms 2ms"
        );
    }

    #[test]
    fn nft_rule() {
        let c = nft_cmd("eplink", "epc0", 3.0);
        assert_eq!(c.program, "nft");
        assert!(c.args[0].contains(
            "add rule inet eplink input iifname \"epc0\" numgen random mod 100000 < 3000 drop"
        ));
        assert!(c.args[0].starts_with("add table inet eplink; add chain inet eplink input { type filter hook input priority 0;"));
    }

    #[test]
    fn commands_in_namespaces() {
        let c = Cmd::new("ip", &["link", "set", "lo", "up"]).in_ns("ep-edge");
        assert_eq!(c.line(), "ip netns exec ep-edge ip link set lo up");
    }

    #[test]
    fn errors_name_the_command() {
        let e = Cmd::new("sh", &["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sh -c 'echo oops >&2; exit 3'") && e.contains("oops"),
            "{e}"
        );
        Cmd::new("sh", &["-c", "echo gone >&2; exit 1"])
            .run_ignoring(&["gone"])
            .unwrap();
        let e = Cmd::new("/nonexistent/prog", &[])
            .run()
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/prog"), "{e}");
    }
}
