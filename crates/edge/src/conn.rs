//! Connections that cannot hold the edge hostage: a client that stops reading (a zero receive
//! window) leaves its response unwritten, and without a bound hyper would wait on that socket for
//! as long as the peer acknowledges the kernel's window probes — forever, with the request still
//! generating. [`StallListener`] hands out sockets whose writes fail with `TimedOut` once they have
//! made no progress for the configured time; hyper then drops the connection, which drops the
//! response stream, which cancels the request in the engine.
//!
//! What one stalled connection holds meanwhile is bounded: hyper stops polling a response body
//! while its write queue is full (16 buffers), the kernel's send buffer is fixed at
//! [`SEND_BUFFER`] (autotuning on loopback would let it grow to megabytes — on a 64 KiB MSS its
//! first expansion alone is over 1 MB — so a whole long answer could vanish into a client that
//! reads nothing, and no write would ever stall), and the engine's events for the request queue up
//! for at most the stall timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// The kernel send buffer of every accepted socket (Linux doubles it for its bookkeeping): room for
/// hundreds of SSE events, and at a 10 ms round trip still 6 MB/s per connection for a whole body.
pub const SEND_BUFFER: usize = 64 << 10;

/// A TCP listener whose connections time out writes that make no progress.
pub struct StallListener {
    inner: TcpListener,
    stall: Duration,
    stalled: Counter,
}

impl StallListener {
    /// `stall`: how long a write may wait for the peer's window; `stalled` counts connections
    /// closed for it.
    pub fn new(inner: TcpListener, stall: Duration, stalled: Counter) -> Self {
        Self {
            inner,
            stall,
            stalled,
        }
    }
}

impl axum::serve::Listener for StallListener {
    type Io = StallIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's accept for a TCP listener: errors (out of file descriptors under a flood of
        // connections) are logged and retried after a pause, never fatal.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = io.set_nodelay(true);
        if let Err(e) = socket2::SockRef::from(&io).set_send_buffer_size(SEND_BUFFER) {
            tracing::warn!(error = %e, "cannot set a connection's send buffer");
        }
        (
            StallIo {
                inner: io,
                stall: self.stall,
                timer: None,
                stalled: self.stalled.clone(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted socket whose writes fail after `stall` without progress.
pub struct StallIo {
    inner: TcpStream,
    stall: Duration,
    /// Armed when a write first returns `Pending`, disarmed by any progress.
    timer: Option<Pin<Box<Sleep>>>,
    stalled: Counter,
}

impl StallIo {
    /// Runs after the inner write returned `r`: progress (bytes written, when `progress`) disarms
    /// the timer; `Pending` arms it (registering the task's waker with it) and fails the write once
    /// it has fired. A flush or shutdown that is ready says nothing of the peer and leaves it.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        progress: bool,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let stall = self.stall;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        self.timer = None;
                        self.stalled.inc();
                        tracing::warn!(
                            stall_secs = stall.as_secs_f64(),
                            "closing a connection whose client stopped reading"
                        );
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client read nothing for the write-stall timeout",
                        )))
                    }
                }
            }
            ready => {
                if progress {
                    self.timer = None;
                }
                ready
            }
        }
    }
}

impl AsyncRead for StallIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r, false)
    }
}
