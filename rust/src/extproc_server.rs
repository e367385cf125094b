//! The ext_proc gRPC server's transport: Envoy's connections and streams served on one
//! background thread (a current-thread tokio runtime, hyper's HTTP/2 server, gRPC framing
//! here), the messages handed to the Python service in batches.
//!
//! Why not grpc.aio: a full-duplex no-op echo through grpc.aio costs 63–65 µs of CPU per
//! message on this class of machine, with or without protobuf objects, which is more than the
//! Go endpoint picker's whole per-message cost (bench/scale). Here a message costs a few µs of
//! framing; the service (one implementation, `llmlb.extproc.ExtProcService.Process`) still
//! decides every answer.
//!
//! The hand-over, both ways:
//! - In: each stream's messages are queued as events (`Opened`, `Message`, `Ended`, `Reset`);
//!   the first event after a drain writes one byte to a socket the event loop watches, and the
//!   loop takes the whole batch in one call. Queued bytes are bounded: past the limit, readers
//!   wait (HTTP/2 flow control then holds Envoy back).
//! - Out: the loop sends its answers in one batch per pass (`send`); one task routes them to
//!   their streams in order, so a batch costs one wake of this thread, not one per answer.
//! - Echo: a stream whose response body only has to be passed back (FULL_DUPLEX_STREAMED after
//!   the response headers) is handed over (`hand_over`): from then on its response chunks are
//!   answered here, in order behind everything the service sent before. The hand-over succeeds
//!   only when the service has taken every message counted for the stream, so no chunk waiting
//!   in Python is overtaken.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::ext_proc_wire::{
    echo_response_chunk, grpc_frame, health_check_response, health_check_service,
    response_body_chunk, Serving,
};

pub const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
/// The service name health checks may ask for (besides "", the server as a whole).
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// gRPC status codes the transport itself answers with.
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// Bytes of messages queued for the service beyond which stream readers wait.
const QUEUED_BYTES_LIMIT: usize = 64 << 20;
/// A connection that has not finished its TLS handshake by then is closed.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` lets the streams' final statuses reach the peers.
const CLOSE_FLUSH: Duration = Duration::from_millis(100);
/// The stream state bit set by `hand_over`; the bits below count messages queued for the service.
const ECHOES: u64 = 1 << 63;
/// HTTP/2 receive windows: a 4 MB prompt streams without waiting a round trip per 64 KB.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const HEALTH_REQUEST_LIMIT: usize = 64 * 1024;

/// How to listen.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    /// Several processes (`--workers`) share the port.
    pub reuse_port: bool,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_streams_per_connection: u32,
    /// A gRPC message larger than this ends its stream with RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
}

/// PEM files for TLS; with `client_ca`, clients must present a certificate it signed.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// What the service is told about its streams.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Opened(u64),
    Message(u64, Bytes),
    /// The peer ended its side of the stream (no more messages).
    Ended(u64),
    /// The stream was reset or broke: no answer reaches the peer any more.
    Reset(u64),
}

enum Out {
    Message(Bytes),
    Finish(u32, String),
}

struct StreamEntry {
    tx: mpsc::UnboundedSender<Out>,
    state: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Listener closed, GOAWAY sent: open streams go on.
    Closing,
    Closed,
}

struct Shared {
    events: Mutex<Vec<Event>>,
    queued_bytes: AtomicUsize,
    room: Notify,
    wake: UnixStream,
    streams: Mutex<HashMap<u64, StreamEntry>>,
    next_id: AtomicU64,
    serving: AtomicBool,
    accepting: AtomicBool,
    tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    settings: Settings,
    outbox: mpsc::UnboundedSender<Routing>,
}

/// What the dispatch task routes, in the order it was sent.
enum Routing {
    /// Answers and finishes for their streams.
    Batch(Vec<(u64, Out)>),
    /// Ends every stream still open with this status. It comes through the same queue as the
    /// batches, so the finishes sent before it (a drain's OKs) reach their streams first.
    FinishAll(u32, String),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn push(&self, event: Event) {
        if let Event::Message(_, message) = &event {
            self.queued_bytes.fetch_add(message.len(), Ordering::AcqRel);
        }
        let was_empty = {
            let mut events = lock(&self.events);
            let was_empty = events.is_empty();
            events.push(event);
            was_empty
        };
        if was_empty {
            // A full socket already holds a wake-up: nothing is lost by dropping this one.
            let _ = (&self.wake).write(&[1]);
        }
    }

    fn route(&self, batch: Vec<(u64, Out)>) {
        let _ = self.outbox.send(Routing::Batch(batch));
    }
}

/// The running server; dropping it closes it.
pub struct Server {
    shared: Arc<Shared>,
    wake_reader: UnixStream,
    phase: watch::Sender<Phase>,
    thread: Mutex<Option<JoinHandle<()>>>,
    port: u16,
}

fn bind(address: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // A restarted daemon must not wait for its predecessor's connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if address.is_ipv6() && address.ip().is_unspecified() {
        socket.set_only_v6(false)?; // "[::]" takes IPv4 too, as gRPC's listener does
    }
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl Server {
    /// Binds and starts serving (health NOT_SERVING until `set_serving(true)`).
    pub fn start(settings: Settings, tls: Option<&TlsFiles>) -> io::Result<Server> {
        let tls = tls
            .map(tls_config)
            .transpose()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = bind(settings.address, settings.reuse_port)?;
        let port = listener.local_addr()?.port();
        let (wake, wake_reader) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        wake_reader.set_nonblocking(true)?;
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: Mutex::new(Vec::new()),
            queued_bytes: AtomicUsize::new(0),
            room: Notify::new(),
            wake,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
            tls: RwLock::new(tls),
            settings,
            outbox,
        });
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("llmlb-extproc".into())
            .spawn(move || runtime.block_on(run(thread_shared, listener, phase_rx, outbox_rx)))?;
        Ok(Server {
            shared,
            wake_reader,
            phase,
            thread: Mutex::new(Some(thread)),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Readable when events wait (see `take_events`).
    pub fn wake_fd(&self) -> RawFd {
        self.wake_reader.as_raw_fd()
    }

    /// Every event queued since the last call, oldest first.
    pub fn take_events(&self) -> Vec<Event> {
        let mut sink = [0u8; 256];
        while matches!((&self.wake_reader).read(&mut sink), Ok(n) if n > 0) {}
        let events = std::mem::take(&mut *lock(&self.shared.events));
        let taken: usize = events
            .iter()
            .map(|e| match e {
                Event::Message(_, m) => m.len(),
                _ => 0,
            })
            .sum();
        if taken > 0 {
            let before = self.shared.queued_bytes.fetch_sub(taken, Ordering::AcqRel);
            if before > QUEUED_BYTES_LIMIT {
                self.shared.room.notify_waiters();
            }
        }
        events
    }

    /// Answers (`ProcessingResponse` bytes) for their streams, in order, then the streams that
    /// end with a status (after their answers). Unknown or finished streams are skipped.
    pub fn send(&self, messages: Vec<(u64, &[u8])>, finishes: Vec<(u64, u32, String)>) {
        let mut batch = Vec::with_capacity(messages.len() + finishes.len());
        for (id, message) in messages {
            batch.push((id, Out::Message(Bytes::from(grpc_frame(message)))));
        }
        for (id, status, text) in finishes {
            batch.push((id, Out::Finish(status, text)));
        }
        if !batch.is_empty() {
            self.shared.route(batch);
        }
    }

    /// From now on this stream's response body chunks are echoed here, if the service has
    /// taken all `delivered` messages counted for it; false if more are on their way (try again
    /// once they are handled) or the stream is gone.
    pub fn hand_over(&self, id: u64, delivered: u64) -> bool {
        let streams = lock(&self.shared.streams);
        streams.get(&id).is_some_and(|entry| {
            entry
                .state
                .compare_exchange(
                    delivered,
                    delivered | ECHOES,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        })
    }

    /// What gRPC health checks are told.
    pub fn set_serving(&self, serving: bool) {
        self.shared.serving.store(serving, Ordering::Release);
    }

    /// Whether new ext_proc streams are taken (else refused with UNAVAILABLE).
    pub fn set_accepting(&self, accepting: bool) {
        self.shared.accepting.store(accepting, Ordering::Release);
    }

    /// New connections use these certificates; open ones keep theirs.
    pub fn set_tls(&self, files: &TlsFiles) -> Result<(), String> {
        let config = tls_config(files)?;
        *self
            .shared
            .tls
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(config);
        Ok(())
    }

    /// Open streams (ext_proc), for tests and the daemon's drain.
    pub fn open_streams(&self) -> usize {
        lock(&self.shared.streams).len()
    }

    /// Closes the listener and sends every connection GOAWAY: open streams go on, new ones go
    /// to other replicas (or wait for a restart).
    pub fn stop_listening(&self) {
        self.phase.send_if_modified(|phase| {
            let change = *phase < Phase::Closing;
            if change {
                *phase = Phase::Closing;
            }
            change
        });
    }

    /// Ends every open stream with UNAVAILABLE, closes every connection and stops the thread.
    pub fn close(&self) {
        self.phase.send_replace(Phase::Closed);
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

async fn run(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mut phase: watch::Receiver<Phase>,
    outbox: mpsc::UnboundedReceiver<Routing>,
) {
    tokio::spawn(dispatch(Arc::clone(&shared), outbox));
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let connection_phase = phase.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve_connection(Arc::clone(&shared), tcp, connection_phase.clone()));
                }
                // Out of descriptors and the like: let connections end before trying again.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = phase.wait_for(|p| *p >= Phase::Closing) => break,
        }
    }
    drop(listener);
    let _ = phase.wait_for(|p| *p == Phase::Closed).await;
    let _ = shared.outbox.send(Routing::FinishAll(
        code::UNAVAILABLE,
        "llmlb stopped".into(),
    ));
    tokio::time::sleep(CLOSE_FLUSH).await;
}

/// Routes the service's answers (and the echoes made here) to their streams, in order.
async fn dispatch(shared: Arc<Shared>, mut outbox: mpsc::UnboundedReceiver<Routing>) {
    while let Some(routing) = outbox.recv().await {
        let mut streams = lock(&shared.streams);
        match routing {
            Routing::Batch(batch) => {
                for (id, out) in batch {
                    if matches!(out, Out::Finish(..)) {
                        if let Some(entry) = streams.remove(&id) {
                            finish(entry, out);
                        }
                    } else if let Some(entry) = streams.get(&id) {
                        let _ = entry.tx.send(out);
                    }
                }
            }
            Routing::FinishAll(status, text) => {
                for (_, entry) in streams.drain() {
                    finish(entry, Out::Finish(status, text.clone()));
                }
            }
        }
    }
}

/// Ends a stream taken out of the table: its reader stops, then the status goes out.
fn finish(mut entry: StreamEntry, out: Out) {
    if let Some(stop) = entry.stop.take() {
        let _ = stop.send(());
    }
    let _ = entry.tx.send(out);
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    phase: watch::Receiver<Phase>,
) {
    let tls = shared
        .tls
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match tls {
        None => serve_h2(shared, TokioIo::new(tcp), phase).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            if let Ok(Ok(stream)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                serve_h2(shared, TokioIo::new(stream), phase).await;
            }
        }
    }
}

async fn serve_h2<I>(shared: Arc<Shared>, io: I, mut phase: watch::Receiver<Phase>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let settings = &shared.settings;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(settings.max_streams_per_connection)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&service_shared);
        async move { Ok::<_, Infallible>(handle(shared, request).await) }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = phase.wait_for(|p| *p >= Phase::Closing) => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<GrpcBody> {
    match request.uri().path() {
        PROCESS_PATH => open_stream(&shared, request.into_body()),
        HEALTH_CHECK_PATH => health_check(&shared, request.into_body()).await,
        path => GrpcBody::status_only(code::UNIMPLEMENTED, format!("unknown method {path}")),
    }
}

fn open_stream(shared: &Arc<Shared>, body: Incoming) -> Response<GrpcBody> {
    if !shared.accepting.load(Ordering::Acquire) {
        return GrpcBody::status_only(code::UNAVAILABLE, "llmlb is shutting down".into());
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel();
    let state = Arc::new(AtomicU64::new(0));
    let entry = StreamEntry {
        tx,
        state: Arc::clone(&state),
        stop: Some(stop),
    };
    lock(&shared.streams).insert(id, entry);
    shared.push(Event::Opened(id));
    tokio::spawn(read_stream(Arc::clone(shared), id, body, state, stopped));
    GrpcBody::stream(rx)
}

/// The next whole gRPC message in `buffer`, or an error status for the stream.
fn next_message(buffer: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, (u32, String)> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    if buffer[0] != 0 {
        return Err((
            code::UNIMPLEMENTED,
            "compressed gRPC messages are not supported".into(),
        ));
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if len > limit {
        return Err((
            code::RESOURCE_EXHAUSTED,
            format!("gRPC message of {len} bytes is over the limit of {limit}"),
        ));
    }
    if buffer.len() < 5 + len {
        buffer.reserve(5 + len - buffer.len());
        return Ok(None);
    }
    let mut message = buffer.split_to(5 + len);
    let _ = message.split_to(5);
    Ok(Some(message.freeze()))
}

async fn read_stream(
    shared: Arc<Shared>,
    id: u64,
    mut body: Incoming,
    state: Arc<AtomicU64>,
    mut stopped: oneshot::Receiver<()>,
) {
    let limit = shared.settings.max_message_bytes;
    let mut buffer = BytesMut::new();
    let end = 'read: loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => return,
            frame = body.frame() => frame,
        };
        let data = match frame {
            None => break Event::Ended(id),
            Some(Err(_)) => break Event::Reset(id),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers from a client: nothing to read
            },
        };
        buffer.extend_from_slice(&data);
        loop {
            match next_message(&mut buffer, limit) {
                Ok(None) => break,
                Ok(Some(message)) => {
                    if !deliver(&shared, id, &state, message, &mut stopped).await {
                        return;
                    }
                }
                Err((status, text)) => {
                    shared.route(vec![(id, Out::Finish(status, text))]);
                    break 'read Event::Reset(id);
                }
            }
        }
    };
    shared.push(end);
}

/// Echoes a handed-over stream's response chunk, or queues the message for the service
/// (waiting for room); false if the service finished the stream meanwhile.
async fn deliver(
    shared: &Shared,
    id: u64,
    state: &AtomicU64,
    message: Bytes,
    stopped: &mut oneshot::Receiver<()>,
) -> bool {
    let mut current = state.load(Ordering::Acquire);
    loop {
        if current & ECHOES != 0 {
            if let Some((chunk, end)) = response_body_chunk(&message) {
                let echo = grpc_frame(&echo_response_chunk(chunk, end));
                shared.route(vec![(id, Out::Message(Bytes::from(echo)))]);
                return true;
            }
        }
        // Counted before it is queued: a hand-over racing with it fails and is tried again.
        match state.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(now) => current = now,
        }
    }
    while shared.queued_bytes.load(Ordering::Acquire) > QUEUED_BYTES_LIMIT {
        let room = shared.room.notified();
        if shared.queued_bytes.load(Ordering::Acquire) <= QUEUED_BYTES_LIMIT {
            break;
        }
        tokio::select! {
            () = room => {}
            _ = &mut *stopped => return false,
        }
    }
    shared.push(Event::Message(id, message));
    true
}

async fn health_check(shared: &Shared, body: Incoming) -> Response<GrpcBody> {
    let Ok(collected) = Limited::new(body, HEALTH_REQUEST_LIMIT).collect().await else {
        return GrpcBody::status_only(code::INVALID_ARGUMENT, "unreadable health check".into());
    };
    let mut buffer = BytesMut::from(&collected.to_bytes()[..]);
    let service = match next_message(&mut buffer, HEALTH_REQUEST_LIMIT) {
        Ok(Some(message)) => health_check_service(&message),
        _ => None,
    };
    match service {
        Some(name) if name.is_empty() || name == EXT_PROC_SERVICE => {
            let status = if shared.serving.load(Ordering::Acquire) {
                Serving::Serving
            } else {
                Serving::NotServing
            };
            GrpcBody::one_message(Bytes::from(grpc_frame(&health_check_response(status))))
        }
        Some(name) => GrpcBody::status_only(code::NOT_FOUND, format!("unknown service {name}")),
        None => GrpcBody::status_only(
            code::INVALID_ARGUMENT,
            "malformed HealthCheckRequest".into(),
        ),
    }
}

/// A gRPC response body: messages, then the status in trailers.
pub struct GrpcBody {
    first: Option<Bytes>,
    stream: Option<mpsc::UnboundedReceiver<Out>>,
    status: Option<(u32, String)>,
}

impl GrpcBody {
    fn response(body: GrpcBody) -> Response<GrpcBody> {
        let mut response = Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    }

    fn stream(rx: mpsc::UnboundedReceiver<Out>) -> Response<GrpcBody> {
        Self::response(GrpcBody {
            first: None,
            stream: Some(rx),
            status: None,
        })
    }

    fn one_message(message: Bytes) -> Response<GrpcBody> {
        Self::response(GrpcBody {
            first: Some(message),
            stream: None,
            status: Some((code::OK, String::new())),
        })
    }

    fn status_only(status: u32, text: String) -> Response<GrpcBody> {
        Self::response(GrpcBody {
            first: None,
            stream: None,
            status: Some((status, text)),
        })
    }
}

/// `grpc-message` is percent-encoded (gRPC's HTTP/2 protocol): printable ASCII but `%` as is.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn status_trailers(status: u32, text: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if !text.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&percent_encode(text)) {
            trailers.insert("grpc-message", value);
        }
    }
    trailers
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if let Some(rx) = self.stream.as_mut() {
            let out = match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(out) => out,
            };
            match out {
                Some(Out::Message(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
                Some(Out::Finish(status, text)) => self.status = Some((status, text)),
                // The server closed without a status for the stream.
                None => self.status = Some((code::UNAVAILABLE, "llmlb stopped".into())),
            }
            self.stream = None;
        }
        match self.status.take() {
            Some((status, text)) => {
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(status, &text)))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.stream.is_none() && self.status.is_none()
    }
}

fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    // ring rather than aws-lc-rs: no cmake/C toolchain beyond gcc to build the wheel. Its
    // provider lacks only the post-quantum key exchange, which Envoy does not offer by default.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("grpc_tls.cert: {e}"))?;
    if certs.is_empty() {
        return Err("grpc_tls.cert: no PEM certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| format!("grpc_tls.key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| format!("grpc_tls.client_ca: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("grpc_tls.client_ca: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("grpc_tls.client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("grpc_tls.key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_from_the_buffer_as_they_complete() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&grpc_frame(b"one"));
        buffer.extend_from_slice(&grpc_frame(b"two")[..4]);
        assert_eq!(
            next_message(&mut buffer, 100),
            Ok(Some(Bytes::from_static(b"one")))
        );
        assert_eq!(next_message(&mut buffer, 100), Ok(None));
        buffer.extend_from_slice(&grpc_frame(b"two")[4..]);
        assert_eq!(
            next_message(&mut buffer, 100),
            Ok(Some(Bytes::from_static(b"two")))
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn oversized_and_compressed_messages_end_the_stream() {
        let mut buffer = BytesMut::from(&grpc_frame(&[0u8; 10])[..]);
        assert_eq!(
            next_message(&mut buffer, 9).unwrap_err().0,
            code::RESOURCE_EXHAUSTED
        );
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert_eq!(
            next_message(&mut compressed, 9).unwrap_err().0,
            code::UNIMPLEMENTED
        );
    }

    #[test]
    fn status_text_is_percent_encoded() {
        assert_eq!(percent_encode("50% über"), "50%25 %C3%BCber");
    }

    #[test]
    fn a_hand_over_fails_while_messages_are_still_on_their_way() {
        let settings = Settings {
            address: "127.0.0.1:0".parse().unwrap(),
            reuse_port: false,
            max_streams_per_connection: 10,
            max_message_bytes: 1 << 20,
        };
        let server = Server::start(settings, None).unwrap();
        let state = Arc::new(AtomicU64::new(2));
        let (tx, _rx) = mpsc::unbounded_channel();
        lock(&server.shared.streams).insert(
            7,
            StreamEntry {
                tx,
                state: Arc::clone(&state),
                stop: None,
            },
        );
        assert!(!server.hand_over(7, 1));
        assert!(server.hand_over(7, 2));
        assert_eq!(state.load(Ordering::Acquire), 2 | ECHOES);
        assert!(!server.hand_over(8, 0));
        server.close();
    }
}
