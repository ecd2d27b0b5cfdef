//! One proxied TCP connection: a smoltcp socket on the tunnel side, a kernel socket
//! to the container on the other.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::socket::tcp::{self, RecvError, State};
use smoltcp::wire::IpEndpoint;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::wake::FlowWake;

/// How long the upstream connect may take before the client gets its RST. The client
/// meanwhile sees no SYN-ACK and retransmits its SYN, which the paused socket ignores.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Connect = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Connects to the container and writes `header` (a PROXY protocol header) before
/// anything of the client's can follow it.
pub(super) fn connect(target: SocketAddr, header: Option<Vec<u8>>) -> Connect {
    Box::pin(async move {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let open = async {
            let mut stream = socket.connect(target).await?;
            if let Some(header) = header {
                stream.write_all(&header).await?;
            }
            Ok::<_, io::Error>(stream)
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
        // We forward segments as the client sent them; batching again would only add
        // latency for interactive protocols.
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

enum Upstream {
    Connecting(Connect),
    Open(TcpStream),
    /// Failed or closed; nothing more to forward.
    Gone,
}

/// What the driver should do with a connection after servicing it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Keep,
    /// Finished, but in TIME-WAIT: the ACK of the client's FIN may still be waiting
    /// for its delayed-ACK timer, and a lost one must be answered again.
    Linger,
    Remove,
}

/// What a service round changed, for the driver's counters.
#[derive(Debug, Default)]
pub(super) struct Events {
    pub(super) opened: bool,
    pub(super) refused: bool,
}

pub(super) struct TcpConn {
    pub(super) handle: smoltcp::iface::SocketHandle,
    /// (local, remote) as in the client's SYN.
    pub(super) key: (IpEndpoint, IpEndpoint),
    pub(super) wake: FlowWake,
    target: SocketAddr,
    upstream: Upstream,
    /// The client's FIN was seen (the socket passed CLOSE-WAIT, CLOSING or TIME-WAIT).
    client_fin_seen: bool,
    /// Everything the client sent, FIN included, reached upstream.
    client_done: bool,
    /// Upstream's EOF was turned into our FIN.
    upstream_done: bool,
    /// In the driver's TIME-WAIT queue.
    pub(super) lingering: bool,
    /// Our ISN minus smoltcp's, once its SYN-ACK went out (see `seq_offset`).
    pub(super) seq_offset: Option<u32>,
}

impl TcpConn {
    pub(super) fn new(
        handle: smoltcp::iface::SocketHandle,
        key: (IpEndpoint, IpEndpoint),
        wake: FlowWake,
        target: SocketAddr,
        header: Option<Vec<u8>>,
    ) -> TcpConn {
        TcpConn {
            handle,
            key,
            wake,
            target,
            upstream: Upstream::Connecting(connect(target, header)),
            client_fin_seen: false,
            client_done: false,
            upstream_done: false,
            lingering: false,
            seq_offset: None,
        }
    }

    /// Moves whatever can move without blocking and reports whether the connection
    /// is finished. Leaves the flow's waker registered with both sockets.
    pub(super) fn service(&mut self, socket: &mut tcp::Socket, events: &mut Events) -> Verdict {
        let waker = self.wake.waker().clone();
        let mut cx = Context::from_waker(&waker);
        let verdict = self.step(socket, &mut cx, events);
        if verdict != Verdict::Remove {
            socket.register_recv_waker(&waker);
            socket.register_send_waker(&waker);
        }
        verdict
    }

    fn step(
        &mut self,
        socket: &mut tcp::Socket,
        cx: &mut Context<'_>,
        events: &mut Events,
    ) -> Verdict {
        if let Upstream::Connecting(connect) = &mut self.upstream {
            // The only way back to LISTEN is the client's RST while we held the
            // SYN-ACK: it gave up.
            if socket.state() != State::SynReceived {
                return Verdict::Remove;
            }
            match connect.as_mut().poll(cx) {
                Poll::Pending => return Verdict::Keep,
                Poll::Ready(Ok(stream)) => {
                    socket.pause_synack(false);
                    self.upstream = Upstream::Open(stream);
                    events.opened = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(target = %self.target, client = %self.key.1, error = %e,
                        "upstream connect failed; resetting");
                    // In SYN-RECEIVED this sends RST|ACK for the client's SYN, which
                    // it reports as "connection refused".
                    socket.abort();
                    self.upstream = Upstream::Gone;
                    events.refused = true;
                }
            }
        }

        if matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.client_fin_seen = true;
        }

        if let Upstream::Open(stream) = &mut self.upstream {
            let forwarded = to_upstream(socket, stream, cx, &mut self.client_done)
                .and_then(|()| from_upstream(socket, stream, cx, &mut self.upstream_done));
            if let Err(e) = forwarded {
                tracing::debug!(target = %self.target, client = %self.key.1, error = %e,
                    "upstream failed; resetting client");
                socket.abort();
                self.upstream = Upstream::Gone;
            }
        }

        match socket.state() {
            State::Listen => Verdict::Remove,
            // The RST we owe the client has not been sent yet.
            State::Closed if socket.remote_endpoint().is_some() => Verdict::Keep,
            State::Closed | State::TimeWait => {
                // After a clean close the client's last bytes may still wait for room
                // upstream; after a reset (ours, the client's, or smoltcp ending
                // TIME-WAIT) the buffer is gone and there is nothing left to deliver.
                let draining = self.client_fin_seen
                    && !self.client_done
                    && socket.recv_queue() > 0
                    && matches!(self.upstream, Upstream::Open(_));
                if draining {
                    Verdict::Keep
                } else if socket.state() == State::TimeWait {
                    Verdict::Linger
                } else {
                    Verdict::Remove
                }
            }
            _ => Verdict::Keep,
        }
    }

    /// Ends the upstream side when the connection leaves the stack: a graceful close
    /// when both directions finished, a reset otherwise, so the container does not
    /// mistake an aborted transfer for a complete one.
    pub(super) fn close_upstream(&mut self) {
        if let Upstream::Open(stream) = std::mem::replace(&mut self.upstream, Upstream::Gone) {
            if !(self.client_done && self.upstream_done) {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// Client to container: dequeue from smoltcp only what the upstream write accepted,
/// so a slow container closes the client's window instead of growing a buffer here.
fn to_upstream(
    socket: &mut tcp::Socket,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    done: &mut bool,
) -> io::Result<()> {
    while !*done {
        let written = socket.recv(|data| {
            if data.is_empty() {
                return (0, Ok(0));
            }
            match Pin::new(&mut *stream).poll_write(cx, data) {
                Poll::Ready(Ok(n)) => (n, Ok(n)),
                Poll::Ready(Err(e)) => (0, Err(e)),
                Poll::Pending => (0, Ok(0)),
            }
        });
        match written {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(RecvError::Finished) => {
                // The client's FIN, after all its data: pass the half-close on.
                // (`poll_shutdown` on a TcpStream is a plain shutdown(2), never pending.)
                if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_shutdown(cx) {
                    return Err(e);
                }
                *done = true;
            }
            // Not established yet, or reset: nothing to read.
            Err(RecvError::InvalidState) => return Ok(()),
        }
    }
    Ok(())
}

/// Container to client: read from upstream only as much as the smoltcp transmit
/// buffer can take, straight into that buffer.
fn from_upstream(
    socket: &mut tcp::Socket,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    done: &mut bool,
) -> io::Result<()> {
    while !*done && socket.may_send() && socket.send_queue() < socket.send_capacity() {
        // With room in the buffer the slice handed to us is never empty, so a zero-byte
        // read below really is end of stream.
        let read = socket.send(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (n, Poll::Ready(Ok(n)))
                }
                Poll::Ready(Err(e)) => (0, Poll::Ready(Err(e))),
                Poll::Pending => (0, Poll::Pending),
            }
        });
        match read {
            Ok(Poll::Ready(Ok(0))) => {
                // Our FIN follows once the buffered data is out.
                socket.close();
                *done = true;
            }
            Ok(Poll::Ready(Ok(_))) => {}
            Ok(Poll::Ready(Err(e))) => return Err(e),
            Ok(Poll::Pending) | Err(_) => return Ok(()),
        }
    }
    Ok(())
}
