//! The userspace link emulator: two TUN devices, and per direction a reader thread that takes IP
//! packets from one device into a [`DelayQueue`] and a writer thread that hands them to the other
//! device when due. Plain threads rather than async tasks: a condvar wait with a timeout wakes within
//! tens of microseconds, while tokio's timer has a 1 ms grain that would add up to 1 ms to each
//! direction (the 1 ms RTT profile would read 3 ms).

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, info, warn};

use crate::queue::DelayQueue;
use crate::NetlabError;

/// Bytes each direction's delay line may hold.
pub const QUEUE_BYTES: usize = 64 << 20;
/// The TUN devices' MTU.
pub const MTU: u16 = 1500;

/// What the forwarder does.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Name of the cloud-side device (`{prefix}c0`).
    pub cloud_dev: String,
    /// Name of the edge-side device (`{prefix}e0`).
    pub edge_dev: String,
    /// One-way delay of each direction.
    pub delay: Duration,
    /// Uniform jitter in `[0, jitter]` added to each packet's delay (packets may then reorder).
    pub jitter: Duration,
    /// Drop probability of each direction in percent (used when nftables is unavailable).
    pub loss_pct: f64,
}

/// Shared state of one direction.
struct Line {
    queue: Mutex<DelayQueue>,
    wake: Condvar,
}

fn create_tun(name: &str) -> Result<tun::Device, NetlabError> {
    let mut cfg = tun::Configuration::default();
    cfg.tun_name(name).mtu(MTU);
    // Only open the device here: addresses, MTU and state are set with `ip` once it has been
    // moved into its namespace.
    cfg.platform_config(|p| {
        p.ensure_root_privileges(false);
    });
    tun::create(&cfg)
        .map_err(|e| NetlabError::Forwarder(format!("creating TUN device {name}: {e}")))
}

/// Creates both TUN devices, calls `ready` once they exist, then forwards packets both ways until a
/// device goes away (its namespace was deleted) or the process is killed.
pub fn run_forwarder(cfg: &ForwarderConfig, ready: impl FnOnce()) -> Result<(), NetlabError> {
    let cloud = create_tun(&cfg.cloud_dev)?;
    let edge = create_tun(&cfg.edge_dev)?;
    let (cloud_r, cloud_w) = cloud.split();
    let (edge_r, edge_w) = edge.split();
    info!(
        cloud = %cfg.cloud_dev, edge = %cfg.edge_dev, delay_ms = cfg.delay.as_secs_f64() * 1e3,
        jitter_ms = cfg.jitter.as_secs_f64() * 1e3, loss_pct = cfg.loss_pct, "forwarder ready"
    );
    ready();
    let origin = Instant::now();
    let down = Arc::new(Line {
        queue: Mutex::new(DelayQueue::new(cfg.delay, QUEUE_BYTES)),
        wake: Condvar::new(),
    });
    let up = Arc::new(Line {
        queue: Mutex::new(DelayQueue::new(cfg.delay, QUEUE_BYTES)),
        wake: Condvar::new(),
    });
    let mut readers = Vec::new();
    for (name, line, reader, writer) in
        [("down", down, cloud_r, edge_w), ("up", up, edge_r, cloud_w)]
    {
        let (l, jitter, loss) = (line.clone(), cfg.jitter, cfg.loss_pct / 100.0);
        readers.push(
            std::thread::Builder::new()
                .name(format!("netlab-{name}-rx"))
                .spawn(move || read_loop(name, reader, &l, origin, jitter, loss))
                .map_err(|e| NetlabError::Forwarder(format!("spawning a thread: {e}")))?,
        );
        // The writers are left to end with the process.
        std::thread::Builder::new()
            .name(format!("netlab-{name}-tx"))
            .spawn(move || write_loop(name, writer, &line, origin))
            .map_err(|e| NetlabError::Forwarder(format!("spawning a thread: {e}")))?;
    }
    // The readers end when their device goes away (its namespace was deleted).
    for t in readers {
        t.join()
            .map_err(|_| NetlabError::Forwarder("a forwarder thread panicked".into()))??;
    }
    Ok(())
}

fn read_loop(
    dir: &str,
    mut dev: impl Read,
    line: &Line,
    origin: Instant,
    jitter: Duration,
    loss: f64,
) -> Result<(), NetlabError> {
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; usize::from(MTU) + 64];
    let (mut dropped_loss, mut dropped_full) = (0u64, 0u64);
    loop {
        let n = match dev.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(dir, error = %e, "TUN read ended");
                return Ok(());
            }
        };
        if loss > 0.0 && rng.gen::<f64>() < loss {
            dropped_loss += 1;
            continue;
        }
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(rng.gen::<f64>())
        };
        let now = origin.elapsed();
        let mut q = line.queue.lock().expect("delay line lock");
        let head = q.next_due();
        if q.push(now, extra, buf[..n].to_vec()).is_err() {
            dropped_full += 1;
            if dropped_full.is_power_of_two() {
                warn!(dir, dropped_full, "delay line full: dropping");
            }
            continue;
        }
        // The writer sleeps until the head is due: wake it only when the head changed.
        if q.next_due() != head {
            line.wake.notify_one();
        }
        drop(q);
        if dropped_loss > 0 && dropped_loss.is_power_of_two() {
            debug!(dir, dropped_loss, "forwarder loss drops");
        }
    }
}

fn write_loop(dir: &str, mut dev: impl Write, line: &Line, origin: Instant) {
    let mut q = line.queue.lock().expect("delay line lock");
    loop {
        let now = origin.elapsed();
        if let Some(pkt) = q.pop_due(now) {
            drop(q);
            if let Err(e) = dev.write(&pkt) {
                // A device that is not up yet refuses packets; the stack retransmits.
                debug!(dir, error = %e, "TUN write failed");
            }
            q = line.queue.lock().expect("delay line lock");
            continue;
        }
        q = match q.next_due() {
            Some(due) => {
                line.wake
                    .wait_timeout(q, due.saturating_sub(now))
                    .expect("delay line lock")
                    .0
            }
            None => line.wake.wait(q).expect("delay line lock"),
        };
    }
}
