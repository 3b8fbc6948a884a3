//! The measuring endpoints: a sink that listens in the cloud namespace and a source that dials it from
//! the edge namespace. One connection per test, opened by a one-byte mode:
//! `P` ping-pong (1-byte echoes, for the RTT), `D` download (the sink sends, the source counts for a
//! fixed time), `U` upload (the source sends, the sink counts and answers its figures).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::NetlabError;

const CHUNK: usize = 64 * 1024;

/// What one source run measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    /// Median round trip in ms (`rtt` mode), else 0.
    pub rtt_ms: f64,
    /// Goodput in Mbit/s measured by the receiver (`down`/`up` modes), else 0.
    pub mbit: f64,
    /// Payload bytes the receiver counted.
    pub bytes: u64,
}

/// Which test the source runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// Median of 1-byte ping-pongs.
    Rtt,
    /// Bulk transfer sink (cloud) -> source (edge).
    Down,
    /// Bulk transfer source (edge) -> sink (cloud).
    Up,
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> NetlabError + '_ {
    move |e| NetlabError::Measure(format!("{what}: {e}"))
}

/// Listens on `addr`, calls `ready` once bound, and serves connections (each on its own thread)
/// until the process is killed.
pub fn run_sink(addr: SocketAddr, ready: impl FnOnce()) -> Result<(), NetlabError> {
    let l = TcpListener::bind(addr).map_err(io_err("sink bind"))?;
    ready();
    for s in l.incoming() {
        let s = s.map_err(io_err("sink accept"))?;
        std::thread::spawn(move || {
            if let Err(e) = serve(s) {
                debug!(error = %e, "sink connection ended");
            }
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0u8; 9];
    s.read_exact(&mut hdr)?;
    let secs = Duration::from_millis(u64::from_le_bytes(hdr[1..9].try_into().expect("8 bytes")));
    match hdr[0] {
        b'P' => {
            let mut b = [0u8; 1];
            loop {
                if s.read(&mut b)? == 0 {
                    return Ok(());
                }
                s.write_all(&b)?;
            }
        }
        b'D' => {
            // Send until the receiver has counted enough and hangs up.
            let buf = vec![0x5au8; CHUNK];
            loop {
                s.write_all(&buf)?;
            }
        }
        b'U' => {
            let (bytes, elapsed) = receive_for(&mut s, secs)?;
            let mut out = [0u8; 16];
            out[..8].copy_from_slice(&bytes.to_le_bytes());
            out[8..].copy_from_slice(&(elapsed.as_nanos() as u64).to_le_bytes());
            s.write_all(&out)?;
            let _ = s.shutdown(Shutdown::Write);
            // Drain what is still in flight until the sender hangs up.
            let mut buf = vec![0u8; CHUNK];
            while s.read(&mut buf)? > 0 {}
            Ok(())
        }
        m => Err(std::io::Error::other(format!("unknown probe mode {m}"))),
    }
}

/// Counts bytes from the first byte for `window`; returns (bytes, time from first to last counted).
fn receive_for(s: &mut TcpStream, window: Duration) -> std::io::Result<(u64, Duration)> {
    let mut buf = vec![0u8; CHUNK];
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Ok((0, Duration::ZERO));
    }
    let start = Instant::now();
    let mut bytes = 0u64; // bytes after the first read: the window starts when it arrived
    let mut last = start;
    loop {
        s.set_read_timeout(Some(
            window
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1)),
        ))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                bytes += n as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
        if start.elapsed() >= window {
            break;
        }
    }
    s.set_read_timeout(None)?;
    Ok((bytes, last - start))
}

fn mbit(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
    }
}

/// Runs one test against the sink at `addr`: `count` ping-pongs, or a `window`-long transfer.
pub fn run_source(
    addr: SocketAddr,
    mode: ProbeMode,
    count: usize,
    window: Duration,
) -> Result<ProbeResult, NetlabError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(io_err(&format!("connecting to sink {addr}")))?;
    s.set_nodelay(true).map_err(io_err("nodelay"))?;
    let mut hdr = [0u8; 9];
    hdr[0] = match mode {
        ProbeMode::Rtt => b'P',
        ProbeMode::Down => b'D',
        ProbeMode::Up => b'U',
    };
    hdr[1..].copy_from_slice(&(window.as_millis() as u64).to_le_bytes());
    s.write_all(&hdr)
        .map_err(io_err("sending the probe header"))?;
    match mode {
        ProbeMode::Rtt => {
            let mut samples = Vec::with_capacity(count);
            let mut b = [7u8; 1];
            // One warm-up round trip, then the measured ones.
            for i in 0..=count.max(1) {
                let t = Instant::now();
                s.write_all(&b).map_err(io_err("ping"))?;
                s.read_exact(&mut b).map_err(io_err("pong"))?;
                if i > 0 {
                    samples.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            samples.sort_by(f64::total_cmp);
            Ok(ProbeResult {
                rtt_ms: samples[samples.len() / 2],
                mbit: 0.0,
                bytes: 0,
            })
        }
        ProbeMode::Down => {
            let (bytes, d) = receive_for(&mut s, window).map_err(io_err("download"))?;
            let _ = s.shutdown(Shutdown::Both);
            Ok(ProbeResult {
                rtt_ms: 0.0,
                mbit: mbit(bytes, d),
                bytes,
            })
        }
        ProbeMode::Up => {
            let mut w = s.try_clone().map_err(io_err("clone"))?;
            let sender = std::thread::spawn(move || {
                let buf = vec![0xa5u8; CHUNK];
                while w.write_all(&buf).is_ok() {}
            });
            let mut out = [0u8; 16];
            s.read_exact(&mut out)
                .map_err(io_err("reading the sink's upload figures"))?;
            let _ = s.shutdown(Shutdown::Both);
            let _ = sender.join();
            let bytes = u64::from_le_bytes(out[..8].try_into().expect("8 bytes"));
            let d = Duration::from_nanos(u64::from_le_bytes(out[8..].try_into().expect("8 bytes")));
            Ok(ProbeResult {
                rtt_ms: 0.0,
                mbit: mbit(bytes, d),
                bytes,
            })
        }
    }
}
