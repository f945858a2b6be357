//! What the client tests share: a scripted server side of a connection ([`Peer`]), loopback
//! listeners for it, plaintext and TLS, and the frames the scripts use.
#![allow(clippy::unwrap_used, dead_code)]

use bytes::BytesMut;
use chime_client::cert_fingerprint;
use chime_protocol::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The server side of one connection, speaking frames over any byte stream.
pub struct Peer<S: Read + Write> {
    pub stream: S,
    pub buf: BytesMut,
    decoder: FrameDecoder,
}

impl<S: Read + Write> Peer<S> {
    pub fn new(stream: S) -> Self {
        Peer { stream, buf: BytesMut::new(), decoder: FrameDecoder::default() }
    }

    /// The next client frame; panics (failing the test) on EOF or garbage.
    pub fn read(&mut self) -> (u32, ClientFrame) {
        loop {
            if let Some(raw) = self.decoder.decode(&mut self.buf).unwrap() {
                return (raw.request_id, ClientFrame::decode(&raw).unwrap());
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed the connection unexpectedly");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn send(&mut self, id: u32, frame: &ServerFrame) {
        self.stream.write_all(&frame.encode(id).unwrap()).unwrap();
        self.stream.flush().unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// Reads the HELLO and answers WELCOME.
    pub fn handshake(&mut self) {
        let (id, frame) = self.read();
        match frame {
            ClientFrame::Hello(h) => {
                assert_eq!(h.magic, MAGIC);
                assert_eq!((h.max_version, h.min_version), (PROTOCOL_VERSION, MIN_PROTOCOL_VERSION));
                assert_eq!(h.client_name, "chime");
            }
            other => panic!("expected HELLO, got {other:?}"),
        }
        assert_eq!(id, 1, "HELLO takes the first request id");
        self.send(id, &ServerFrame::Welcome(welcome()));
    }
}

pub fn welcome() -> Welcome {
    Welcome {
        protocol_version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        server_name: "test".into(),
        server_version: "0".into(),
        limits: Limits::default(),
    }
}

pub fn delta(room: u64, seq: u64, text: &str) -> Delta {
    Delta {
        room: RoomId(room),
        seq: Seq(seq),
        author_id: UserId(7),
        author: "ann".into(),
        ts_ms: 1_700_000_000_000,
        body: DeltaBody::message(text),
    }
}

/// Runs `script` against the first connection to a fresh loopback listener.
pub fn plain_server(script: impl FnOnce(Peer<TcpStream>) + Send + 'static) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        // Bounds the test if the client under test stops talking.
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        script(Peer::new(tcp));
    });
    (addr, handle)
}

/// A self-signed TLS server configuration for `versions`, and its certificate's fingerprint.
pub fn tls_config(versions: &[&'static rustls::SupportedProtocolVersion]) -> (Arc<ServerConfig>, [u8; 32]) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let fingerprint = cert_fingerprint(&cert);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    (Arc::new(config), fingerprint)
}
