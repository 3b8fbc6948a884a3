//! What the service-level tests share: the binary under test and its processes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgeprompt"))
}

/// A child process killed on drop, its stderr (logging at info) kept in a file.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs the binary with `args`.
    pub fn start(args: &[&str], log: PathBuf) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        Proc::spawn(cmd, log)
    }

    /// Runs `cmd` (the binary wrapped, say, in `ip netns exec`).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("EDGEPROMPT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("binary starts");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
