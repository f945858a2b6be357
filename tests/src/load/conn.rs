//! A non-blocking frame connection for `mio`, plaintext or TLS: queue client frames, flush what
//! the socket takes, and split whole server frames off what arrives. Reads and writes drain until
//! `WouldBlock`, since mio readiness is edge-triggered.

use bytes::BytesMut;
use chime_protocol::{ClientFrame, FrameDecoder, RawFrame};
use mio::net::TcpStream;
use mio::Interest;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why a connection stopped.
#[derive(Debug)]
pub enum ConnError {
    /// A socket error.
    Io(io::Error),
    /// A TLS error.
    Tls(rustls::Error),
    /// The server sent bytes that are not a frame.
    Decode(chime_protocol::DecodeError),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "i/o: {e}"),
            ConnError::Tls(e) => write!(f, "tls: {e}"),
            ConnError::Decode(e) => write!(f, "decode: {e}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// One connection's socket and buffers.
pub struct FrameConn {
    /// The non-blocking socket.
    stream: TcpStream,
    /// The TLS session, when the listener is TLS.
    tls: Option<ClientConnection>,
    /// Received plaintext not yet split into frames.
    rbuf: BytesMut,
    /// Encoded frames not yet written (plaintext connections; TLS buffers inside rustls).
    wbuf: Vec<u8>,
    /// How much of `wbuf` is written.
    wpos: usize,
    /// Splits frames off `rbuf`.
    decoder: FrameDecoder,
}

/// TLS settings for [`FrameConn::connect`].
#[derive(Clone)]
pub struct TlsSetup {
    /// The rustls config (see [`crate::load::tls::client_config`]).
    pub config: Arc<ClientConfig>,
    /// The name to present (ignored by the pinning verifier, but rustls needs one).
    pub name: ServerName<'static>,
}

impl FrameConn {
    /// Connects (blocking, bounded by `timeout`: loopback connects are fast, and pacing them keeps
    /// the server's accept backlog from overflowing), then switches to non-blocking.
    pub fn connect(addr: SocketAddr, tls: Option<&TlsSetup>, timeout: Duration) -> Result<FrameConn, ConnError> {
        let std_stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        std_stream.set_nodelay(true)?;
        std_stream.set_nonblocking(true)?;
        let tls = match tls {
            Some(t) => Some(ClientConnection::new(t.config.clone(), t.name.clone()).map_err(ConnError::Tls)?),
            None => None,
        };
        Ok(FrameConn {
            stream: TcpStream::from_std(std_stream),
            tls,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: Vec::new(),
            wpos: 0,
            decoder: FrameDecoder::default(),
        })
    }

    /// The socket, to register with a `mio::Poll`.
    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Queues one frame; call [`FrameConn::flush`] to send. The generator's frames are small:
    /// one that would not fit in a frame is a bug in the generator, and is dropped with a log line.
    pub fn queue(&mut self, frame: &ClientFrame, request_id: u32) {
        let queued = match self.tls.as_mut() {
            Some(tls) => {
                let mut out = Vec::with_capacity(64);
                let encoded = frame.encode_into(&mut out, request_id);
                // rustls buffers plaintext without limit by default; writing to a Vec-like sink
                // cannot fail.
                let _ = tls.writer().write_all(&out);
                encoded
            }
            None => frame.encode_into(&mut self.wbuf, request_id),
        };
        if let Err(e) = queued {
            log::error!("chime-load: {e}");
        }
    }

    /// Whether bytes wait to be written.
    pub fn wants_write(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.wants_write(),
            None => self.wpos < self.wbuf.len(),
        }
    }

    /// The readiness to register for.
    pub fn interest(&self) -> Interest {
        if self.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Writes until done or `WouldBlock`.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        match self.tls.as_mut() {
            Some(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.stream) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            None => {
                while self.wpos < self.wbuf.len() {
                    match self.stream.write(&self.wbuf[self.wpos..]) {
                        Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                        Ok(n) => self.wpos += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if self.wpos == self.wbuf.len() {
                    self.wbuf.clear();
                    self.wpos = 0;
                }
            }
        }
        Ok(())
    }

    /// Reads until `WouldBlock` and appends every whole frame to `out`. `Ok(false)` means the
    /// peer closed the stream (frames before the close are still in `out`).
    pub fn read_frames(&mut self, out: &mut Vec<RawFrame>) -> Result<bool, ConnError> {
        let open = match self.tls.as_mut() {
            Some(tls) => read_tls(&mut self.stream, tls, &mut self.rbuf)?,
            None => read_plain(&mut self.stream, &mut self.rbuf)?,
        };
        while let Some(frame) = self.decoder.decode(&mut self.rbuf).map_err(ConnError::Decode)? {
            out.push(frame);
        }
        Ok(open)
    }
}

fn read_plain(stream: &mut TcpStream, rbuf: &mut BytesMut) -> Result<bool, ConnError> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_tls(stream: &mut TcpStream, tls: &mut ClientConnection, rbuf: &mut BytesMut) -> Result<bool, ConnError> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let open = match tls.read_tls(stream) {
            Ok(0) => false,
            Ok(_) => {
                tls.process_new_packets().map_err(ConnError::Tls)?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        // Take the plaintext out after every record batch: rustls refuses to decrypt more while
        // its plaintext buffer is full, which a busy room fills in one read.
        loop {
            match tls.reader().read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        if !open {
            return Ok(false);
        }
    }
}
