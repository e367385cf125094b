//! PyO3 bindings: a thin layer over the pure-Rust core.
//!
//! Bodies arrive as `bytes` and are held as `PyBackedBytes` (no copy). Parsing large bodies
//! (and feeding large chunks to a `RequestStream`) runs with the GIL released (`detach`); small
//! ones stay attached, where releasing would cost more than the work. A `ParsedRequest` keeps
//! the Rust result, so a pick reads its levels without a Python list in between. The balancer's state sits behind a mutex that the asyncio daemon never
//! contends (one event-loop thread).

// PyO3 extracts arguments as owned values; taking them by value is how the binding works.
#![allow(clippy::needless_pass_by_value)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::affinity::{AffinityKey, KeySources};
use crate::balancer::{Balancer, BalancerConfig, Load, Pick, PickError, PickReason, Request};
use crate::body_decode::{parse_body_for, BodyParser};
use crate::decision_record::{self, Field, FieldValue, Record as DecisionRecord};
use crate::engine_metrics::{parse_engine_metrics, Engine, EngineMetrics, MetricsError};
use crate::ext_proc_wire;
use crate::extproc_server::{
    Event, Server as ExtProcServer, Settings as ExtProcSettings, TlsFiles,
};
use crate::fd_wait;
use crate::pb_struct;
use crate::prefix_hash::DEFAULT_BLOCK_SIZE;
use crate::request::{
    parse_request_for, stored_response_id, Affinity, Limits, ParseError, ParsedRequest,
    RequestKind, TooLarge,
};
use crate::scheduling::least_busy::Thresholds;
use crate::scheduling::policies::{LoadModel, Policy};
use crate::scraper::{Scraper, Settings as ScrapeSettings, Target};
use crate::shared::picks::{CommitReply, Outcome, OwnedRequest, SharedPicks};
use crate::shared::{
    forget_command, heartbeat_call, reap_call, release_call, scripts, Call, Keys, Record, Release,
    Settings,
};
use crate::worker_state::{self, Layout, WorkerState};

create_exception!(
    _core,
    RequestParseError,
    PyValueError,
    "The body is not a usable OpenAI request."
);
create_exception!(
    _core,
    BodyTooLargeError,
    PyValueError,
    "The body (raw or decoded) is larger than max_bytes."
);
create_exception!(
    _core,
    MetricsParseError,
    PyValueError,
    "The page is not a usable Prometheus /metrics page of a known engine."
);
create_exception!(
    _core,
    NoEndpointsError,
    PyRuntimeError,
    "The pool has no endpoints."
);
create_exception!(
    _core,
    ShedError,
    PyRuntimeError,
    "least_busy: the request's model is sheddable and no endpoint has room for it."
);
create_exception!(
    _core,
    UnknownModelError,
    PyRuntimeError,
    "No endpoint serves the request's model."
);
create_exception!(
    _core,
    OverLimitError,
    PyRuntimeError,
    "The best endpoint already has maxRequestCount requests in flight."
);

/// Bodies at least this large are parsed with the GIL released.
const DETACH_BYTES: usize = 64 * 1024;

fn parse(py: Python<'_>, body: &PyBackedBytes) -> Result<ParsedRequest, ParseError> {
    parse_as(py, RequestKind::Chat, body)
}

fn parse_as(
    py: Python<'_>,
    kind: RequestKind,
    body: &PyBackedBytes,
) -> Result<ParsedRequest, ParseError> {
    let parse = || parse_request_for(kind, body, Limits::default());
    if body.len() >= DETACH_BYTES {
        py.detach(parse)
    } else {
        parse()
    }
}

/// The `RequestKind` named `name` ("chat", "responses", ...).
fn request_kind_named(name: &str) -> PyResult<RequestKind> {
    RequestKind::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = RequestKind::ALL.map(RequestKind::as_str).to_vec();
        PyValueError::new_err(format!(
            "unknown request kind {name:?} (known: {})",
            known.join(", ")
        ))
    })
}

/// Metrics pages at least this large are parsed with the GIL released (a vLLM page runs
/// 50-150 KB and parses at several GB/s; small pages would not repay the release).
const DETACH_METRICS_BYTES: usize = 16 * 1024;

fn parse_metrics(
    py: Python<'_>,
    text: &PyBackedBytes,
    engine: Option<Engine>,
) -> Result<(Engine, EngineMetrics), MetricsError> {
    if text.len() >= DETACH_METRICS_BYTES {
        py.detach(|| parse_engine_metrics(text, engine))
    } else {
        parse_engine_metrics(text, engine)
    }
}

/// A parse result, kept in Rust: `Balancer.pick` and `prepare_shared` read its levels without
/// a round trip through a Python list.
#[pyclass(name = "ParsedRequest", module = "llmlb._core", frozen)]
struct PyParsedRequest {
    result: Result<ParsedRequest, ParseError>,
}

#[pymethods]
impl PyParsedRequest {
    #[getter]
    fn ok(&self) -> bool {
        self.result.is_ok()
    }

    #[getter]
    fn error(&self) -> Option<String> {
        self.result.as_ref().err().map(ToString::to_string)
    }

    /// The raw or decoded body passed `max_bytes` (the daemon answers 413).
    #[getter]
    fn too_large(&self) -> bool {
        matches!(self.result, Err(ParseError::TooLarge { .. }))
    }

    #[getter]
    fn kind(&self) -> Option<&'static str> {
        self.result.as_ref().ok().map(|r| r.kind.as_str())
    }

    #[getter]
    fn model(&self) -> &str {
        self.result.as_ref().map_or("", |r| r.model.as_str())
    }

    /// The prompt's size in canonical bytes (0 when not ok): the load model's token estimate.
    #[getter]
    fn prompt_bytes(&self) -> u64 {
        self.result.as_ref().map_or(0, |r| r.prompt_bytes)
    }

    #[getter]
    fn stream(&self) -> bool {
        self.result.as_ref().is_ok_and(|r| r.stream)
    }

    /// Built on each access (for tests and tools; picking reads the levels in Rust).
    #[getter]
    fn prefix_hashes(&self) -> Vec<u64> {
        self.result
            .as_ref()
            .map(|r| r.prefix_hashes.clone())
            .unwrap_or_default()
    }

    #[getter]
    fn prompt_cache_key(&self) -> Option<&str> {
        self.affinity(|a| a.prompt_cache_key.as_deref())
    }

    #[getter]
    fn conversation(&self) -> Option<&str> {
        self.affinity(|a| a.conversation.as_deref())
    }

    #[getter]
    fn safety_identifier(&self) -> Option<&str> {
        self.affinity(|a| a.safety_identifier.as_deref())
    }

    #[getter]
    fn user(&self) -> Option<&str> {
        self.affinity(|a| a.user.as_deref())
    }

    #[getter]
    fn previous_response_id(&self) -> Option<&str> {
        self.affinity(|a| a.previous_response_id.as_deref())
    }

    /// Responses `store` (`True` when absent); `True` for other kinds and when not ok.
    #[getter]
    fn store(&self) -> bool {
        self.result.as_ref().map_or(true, |r| r.store)
    }

    fn __repr__(&self) -> String {
        match &self.result {
            Ok(r) => format!(
                "ParsedRequest(kind={:?}, model={:?}, stream={}, levels={})",
                r.kind.as_str(),
                r.model,
                if r.stream { "True" } else { "False" },
                r.prefix_hashes.len()
            ),
            Err(e) => format!("ParsedRequest(ok=False, error={:?})", e.to_string()),
        }
    }
}

impl PyParsedRequest {
    fn affinity<'a>(
        &'a self,
        field: impl FnOnce(&'a Affinity) -> Option<&'a str>,
    ) -> Option<&'a str> {
        self.result.as_ref().ok().and_then(|r| field(&r.affinity))
    }
}

/// Parses a whole body of the `kind` shape (default: chat completions or completions).
#[pyfunction(name = "parse_request")]
#[pyo3(signature = (body, kind = "chat"))]
fn py_parse_request(py: Python<'_>, body: PyBackedBytes, kind: &str) -> PyResult<PyParsedRequest> {
    let kind = request_kind_named(kind)?;
    let parsed =
        parse_as(py, kind, &body).map_err(|e| RequestParseError::new_err(e.to_string()))?;
    Ok(PyParsedRequest { result: Ok(parsed) })
}

/// Decodes (`Content-Encoding`) and parses a whole body, with the size limit and level cap;
/// a bad body gives a result that is not `ok`.
#[pyfunction(name = "parse_body")]
#[pyo3(signature = (body, encoding, max_bytes, max_blocks, kind = "chat"))]
fn py_parse_body(
    py: Python<'_>,
    body: PyBackedBytes,
    encoding: Option<&str>,
    max_bytes: u64,
    max_blocks: usize,
    kind: &str,
) -> PyResult<PyParsedRequest> {
    let kind = request_kind_named(kind)?;
    let parse = || parse_body_for(kind, &body, encoding, max_bytes, max_blocks);
    let result = if body.len() >= DETACH_BYTES {
        py.detach(parse)
    } else {
        parse()
    };
    Ok(PyParsedRequest { result })
}

/// The request kind of a path (`RequestKind::from_path`): "chat", ..., "other".
#[pyfunction(name = "request_kind")]
fn py_request_kind(path: &str) -> &'static str {
    RequestKind::from_path(path).as_str()
}

/// The `{id}` of `/v1/responses/{id}[/...]`, else `None`.
#[pyfunction(name = "stored_response_id")]
fn py_stored_response_id(path: &str) -> Option<&str> {
    stored_response_id(path)
}

/// A body fed chunk by chunk (Envoy's FULL_DUPLEX_STREAMED mode).
#[pyclass(name = "RequestStream", module = "llmlb._core", frozen)]
struct PyRequestStream {
    /// `None` once finished.
    inner: Mutex<Option<BodyParser>>,
}

impl PyRequestStream {
    fn lock(&self) -> MutexGuard<'_, Option<BodyParser>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[pymethods]
impl PyRequestStream {
    #[new]
    #[pyo3(signature = (encoding, max_bytes, max_blocks, kind = "chat"))]
    fn new(
        encoding: Option<&str>,
        max_bytes: u64,
        max_blocks: usize,
        kind: &str,
    ) -> PyResult<Self> {
        let limits = Limits {
            max_bytes,
            max_blocks,
            ..Limits::default()
        };
        let parser = BodyParser::for_kind(request_kind_named(kind)?, encoding, limits);
        Ok(Self {
            inner: Mutex::new(Some(parser)),
        })
    }

    fn feed(&self, py: Python<'_>, chunk: PyBackedBytes) -> PyResult<()> {
        let mut guard = self.lock();
        let parser = guard
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("feed() after finish()"))?;
        let result = if chunk.len() >= DETACH_BYTES {
            py.detach(|| parser.feed(&chunk))
        } else {
            parser.feed(&chunk)
        };
        result.map_err(|TooLarge| {
            BodyTooLargeError::new_err(format!(
                "the body is larger than max_bytes ({} bytes fed)",
                parser.bytes_fed()
            ))
        })
    }

    fn finish(&self) -> PyResult<PyParsedRequest> {
        let parser = self
            .lock()
            .take()
            .ok_or_else(|| PyValueError::new_err("finish() called twice"))?;
        Ok(PyParsedRequest {
            result: parser.finish(),
        })
    }

    #[getter]
    fn bytes_fed(&self) -> u64 {
        self.lock().as_ref().map_or(0, BodyParser::bytes_fed)
    }

    #[getter]
    fn retained_bytes(&self) -> usize {
        self.lock().as_ref().map_or(0, BodyParser::retained_bytes)
    }
}

/// What `pick` and `prepare_shared` accept besides `None`.
#[derive(FromPyObject)]
enum RequestArg<'py> {
    Parsed(Bound<'py, PyParsedRequest>),
    Body(PyBackedBytes),
}

#[pyclass(name = "EngineMetrics", module = "llmlb._core", frozen, get_all)]
struct PyEngineMetrics {
    engine: &'static str,
    waiting: Option<f64>,
    running: Option<f64>,
    kv_cache_usage: Option<f64>,
    running_lora_adapters: Vec<String>,
    waiting_lora_adapters: Vec<String>,
    max_lora: Option<u32>,
    prefix_cache_queries: Option<f64>,
    prefix_cache_hits: Option<f64>,
    lines_skipped: u32,
}

/// Reads a model server's load from its Prometheus `/metrics` page: `(engine, metrics)`.
/// `engine=None` detects it from the page.
#[pyfunction(name = "parse_engine_metrics")]
#[pyo3(signature = (text, engine = None))]
fn py_parse_engine_metrics(
    py: Python<'_>,
    text: PyBackedBytes,
    engine: Option<&str>,
) -> PyResult<(&'static str, PyEngineMetrics)> {
    let engine = engine.map(engine_named).transpose()?;
    let (engine, m) =
        parse_metrics(py, &text, engine).map_err(|e| MetricsParseError::new_err(e.to_string()))?;
    Ok((engine.name(), PyEngineMetrics::new(engine, m)))
}

impl PyEngineMetrics {
    fn new(engine: Engine, m: EngineMetrics) -> Self {
        Self {
            engine: engine.name(),
            waiting: m.waiting,
            running: m.running,
            kv_cache_usage: m.kv_cache_usage,
            running_lora_adapters: m.running_lora_adapters,
            waiting_lora_adapters: m.waiting_lora_adapters,
            max_lora: m.max_lora,
            prefix_cache_queries: m.prefix_cache_queries,
            prefix_cache_hits: m.prefix_cache_hits,
            lines_skipped: m.lines_skipped,
        }
    }
}

fn engine_named(name: &str) -> PyResult<Engine> {
    Engine::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown engine {name:?}; expected vllm, sglang, trtllm-serve or triton"
        ))
    })
}

/// One scrape's outcome as Python sees it: `(address, metrics, reason, detail)`, metrics `None`
/// and reason/detail set when it failed.
type ScrapeOutcome = (
    String,
    Option<PyEngineMetrics>,
    Option<&'static str>,
    Option<String>,
);

/// The endpoints' `/metrics` pages scraped on a background thread (see `scraper`).
/// PEM certificate chain, key and client CA (if clients must present certificates).
type TlsPem = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);
/// A transport event for Python: (stream, kind, message).
type TransportEvent<'py> = (u64, u8, Option<Bound<'py, PyExtProcMessage>>);

/// One `ProcessingRequest` as the ext_proc service reads it, decoded in Rust (see
/// `ext_proc_wire::decode_request`): no protobuf objects on the way to Python.
#[pyclass(name = "ExtProcMessage", module = "llmlb._core", frozen)]
struct PyExtProcMessage {
    /// One of the phase constants; NONE if the message carries none, MALFORMED if it is not a
    /// well-formed `ProcessingRequest`.
    #[pyo3(get)]
    phase: i64,
    /// A headers phase's headers, `(key, raw value)` in order; empty otherwise.
    #[pyo3(get)]
    headers: Py<PyTuple>,
    /// A body phase's chunk; empty otherwise.
    #[pyo3(get)]
    body: Py<PyBytes>,
    #[pyo3(get)]
    end_of_stream: bool,
    /// `(request_body_mode, response_body_mode)` of the stream's `protocol_config`, if sent.
    #[pyo3(get)]
    body_modes: Option<(i32, i32)>,
}

#[pymethods]
impl PyExtProcMessage {
    #[classattr]
    const MALFORMED: i64 = -1;
    #[classattr]
    const NONE: i64 = 0;
    #[classattr]
    const REQUEST_HEADERS: i64 = ext_proc_wire::REQUEST_HEADERS.cast_signed();
    #[classattr]
    const RESPONSE_HEADERS: i64 = ext_proc_wire::RESPONSE_HEADERS.cast_signed();
    #[classattr]
    const REQUEST_BODY: i64 = ext_proc_wire::REQUEST_BODY.cast_signed();
    #[classattr]
    const RESPONSE_BODY: i64 = ext_proc_wire::RESPONSE_BODY.cast_signed();
    #[classattr]
    const REQUEST_TRAILERS: i64 = ext_proc_wire::REQUEST_TRAILERS.cast_signed();
    #[classattr]
    const RESPONSE_TRAILERS: i64 = ext_proc_wire::RESPONSE_TRAILERS.cast_signed();

    /// Decodes serialized `ProcessingRequest` bytes (what the transport does with each message).
    #[staticmethod]
    fn decode(py: Python<'_>, message: &[u8]) -> PyResult<Self> {
        Self::from_wire(py, message)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "ExtProcMessage(phase={}, headers={}, body={} bytes, end_of_stream={}, body_modes={:?})",
            self.phase,
            self.headers.bind(py).len(),
            self.body.as_bytes(py).len(),
            self.end_of_stream,
            self.body_modes
        )
    }
}

impl PyExtProcMessage {
    fn from_wire(py: Python<'_>, message: &[u8]) -> PyResult<Self> {
        let Some(request) = ext_proc_wire::decode_request(message) else {
            return Ok(Self {
                phase: Self::MALFORMED,
                headers: PyTuple::empty(py).unbind(),
                body: PyBytes::new(py, b"").unbind(),
                end_of_stream: false,
                body_modes: None,
            });
        };
        let headers = if request.headers.is_empty() {
            PyTuple::empty(py)
        } else {
            let pairs = request
                .headers
                .iter()
                .map(|(key, value)| {
                    let key = PyString::new(py, &String::from_utf8_lossy(key));
                    PyTuple::new(py, [key.into_any(), PyBytes::new(py, value).into_any()])
                })
                .collect::<PyResult<Vec<_>>>()?;
            PyTuple::new(py, pairs)?
        };
        Ok(Self {
            phase: request.phase.cast_signed(),
            headers: headers.unbind(),
            body: PyBytes::new(py, request.body).unbind(),
            end_of_stream: request.end_of_stream,
            body_modes: request.body_modes,
        })
    }
}

/// The `ProcessingResponse` that echoes a response body chunk (FULL_DUPLEX_STREAMED).
#[pyfunction]
fn echo_response_chunk<'py>(
    py: Python<'py>,
    body: &[u8],
    end_of_stream: bool,
) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &ext_proc_wire::echo_response_chunk(body, end_of_stream))
}

/// The `ProcessingResponse` that passes a request body chunk on (FULL_DUPLEX_STREAMED).
#[pyfunction]
fn request_body_chunk<'py>(
    py: Python<'py>,
    body: &[u8],
    end_of_stream: bool,
) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &ext_proc_wire::request_body_chunk(body, end_of_stream))
}

/// The ext_proc gRPC transport (see `extproc_server`): Envoy's streams served on a Rust
/// thread; the event loop takes their messages in batches and sends the answers.
#[pyclass(name = "ExtProcTransport", module = "llmlb._core", frozen)]
struct PyExtProcTransport {
    server: ExtProcServer,
}

#[pymethods]
impl PyExtProcTransport {
    /// Event kinds in `take_events`: (stream, kind, message or None).
    #[classattr]
    const OPENED: u8 = 0;
    #[classattr]
    const MESSAGE: u8 = 1;
    #[classattr]
    const ENDED: u8 = 2;
    #[classattr]
    const RESET: u8 = 3;

    /// Binds `address` (an IP literal `ip:port` or `[ip]:port`) and serves; `tls` is
    /// `(cert_pem, key_pem, client_ca_pem or None)`. Raises OSError if it cannot listen,
    /// ValueError for unusable TLS material.
    #[new]
    #[pyo3(signature = (address, *, reuse_port, max_streams_per_connection, max_message_bytes, tls=None))]
    fn new(
        address: &str,
        reuse_port: bool,
        max_streams_per_connection: u32,
        max_message_bytes: usize,
        tls: Option<TlsPem>,
    ) -> PyResult<Self> {
        let address = address
            .parse()
            .map_err(|_| PyValueError::new_err(format!("not an ip:port address: {address:?}")))?;
        let settings = ExtProcSettings {
            address,
            reuse_port,
            max_streams_per_connection,
            max_message_bytes,
        };
        let tls = tls.map(|(cert, key, client_ca)| TlsFiles {
            cert,
            key,
            client_ca,
        });
        let server = ExtProcServer::start(settings, tls.as_ref()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput {
                PyValueError::new_err(e.to_string())
            } else {
                PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))
            }
        })?;
        Ok(Self { server })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.server.port()
    }

    /// A descriptor that turns readable when events wait.
    fn wake_fd(&self) -> i32 {
        self.server.wake_fd()
    }

    /// Every event since the last call, oldest first.
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<TransportEvent<'py>>> {
        self.server
            .take_events()
            .into_iter()
            .map(|event| {
                Ok(match event {
                    Event::Opened(id) => (id, Self::OPENED, None),
                    Event::Message(id, message) => {
                        let message = PyExtProcMessage::from_wire(py, &message)?;
                        (id, Self::MESSAGE, Some(Bound::new(py, message)?))
                    }
                    Event::Ended(id) => (id, Self::ENDED, None),
                    Event::Reset(id) => (id, Self::RESET, None),
                })
            })
            .collect()
    }

    /// Serialized answers `(stream, bytes)`, in order, then `(stream, grpc_status, message)`
    /// for the streams that end, then hand-overs `(stream, delivered)`: the stream's response
    /// chunks are echoed in Rust from now on if all `delivered` messages counted for it were
    /// taken (after this batch's answers). Returns the streams handed over.
    #[pyo3(signature = (messages, finishes, hand_overs=Vec::new()))]
    fn send(
        &self,
        messages: Vec<(u64, PyBackedBytes)>,
        finishes: Vec<(u64, u32, String)>,
        hand_overs: Vec<(u64, u64)>,
    ) -> Vec<u64> {
        let messages = messages.iter().map(|(id, m)| (*id, &m[..])).collect();
        self.server.send(messages, finishes);
        hand_overs
            .into_iter()
            .filter(|&(stream, delivered)| self.server.hand_over(stream, delivered))
            .map(|(stream, _)| stream)
            .collect()
    }

    fn set_serving(&self, serving: bool) {
        self.server.set_serving(serving);
    }

    fn set_accepting(&self, accepting: bool) {
        self.server.set_accepting(accepting);
    }

    /// New connections use these PEM certificates (ValueError if unusable).
    #[pyo3(signature = (cert, key, client_ca=None))]
    fn set_tls(&self, cert: Vec<u8>, key: Vec<u8>, client_ca: Option<Vec<u8>>) -> PyResult<()> {
        self.server
            .set_tls(&TlsFiles {
                cert,
                key,
                client_ca,
            })
            .map_err(PyValueError::new_err)
    }

    #[getter]
    fn open_streams(&self) -> usize {
        self.server.open_streams()
    }

    /// Closes the listener and sends GOAWAY; open streams go on.
    fn stop_listening(&self) {
        self.server.stop_listening();
    }

    /// Ends the open streams with UNAVAILABLE and stops the thread.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.server.close());
    }
}

#[pyclass(name = "PageScraper", module = "llmlb._core", frozen)]
struct PyPageScraper {
    inner: Mutex<Option<Scraper>>,
}

impl PyPageScraper {
    fn with<R>(&self, f: impl FnOnce(&mut Scraper) -> R) -> PyResult<R> {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let scraper = guard
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("the scraper is closed"))?;
        Ok(f(scraper))
    }
}

#[pymethods]
impl PyPageScraper {
    #[new]
    fn new(interval_s: f64, timeout_s: f64, max_page_bytes: usize) -> PyResult<Self> {
        let seconds = |value: f64, what: &str| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "{what} must be a positive number of seconds, not {value}"
                    ))
                })
        };
        let settings = ScrapeSettings {
            interval: seconds(interval_s, "interval_s")?,
            timeout: seconds(timeout_s, "timeout_s")?,
            max_page_bytes,
        };
        let scraper = Scraper::start(settings)
            .map_err(|e| PyOSError::new_err(format!("starting the scraper thread: {e}")))?;
        Ok(Self {
            inner: Mutex::new(Some(scraper)),
        })
    }

    /// Scrapes exactly these `(address, url, engine)` from now on (`engine` `None`: detected
    /// from the first page); unchanged targets keep their timer and connection. Returns the
    /// addresses whose engine name is unknown: theirs is detected instead.
    fn set_targets(
        &self,
        py: Python<'_>,
        targets: Vec<(String, String, Option<String>)>,
    ) -> PyResult<Vec<String>> {
        let mut unknown = Vec::new();
        let targets = targets
            .into_iter()
            .map(|(address, url, name)| {
                let engine = name.as_deref().and_then(Engine::from_name);
                if engine.is_none() && name.is_some() {
                    unknown.push(address.clone());
                }
                Target {
                    address,
                    url,
                    engine,
                }
            })
            .collect();
        py.detach(|| self.with(|s| s.set_targets(targets)))?;
        Ok(unknown)
    }

    /// Every outcome since the last drain, oldest first.
    fn drain(&self) -> PyResult<Vec<ScrapeOutcome>> {
        let (outcomes, timeout) = self.with(|s| (s.drain(), s.settings().timeout))?;
        Ok(outcomes
            .into_iter()
            .map(|o| match o.result {
                Ok((engine, m)) => (o.address, Some(PyEngineMetrics::new(engine, m)), None, None),
                Err(failure) => (
                    o.address,
                    None,
                    Some(failure.reason()),
                    Some(failure.detail(timeout)),
                ),
            })
            .collect())
    }

    /// Stops the thread; scrapes in flight are abandoned. Idempotent.
    fn close(&self, py: Python<'_>) {
        let scraper = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        py.detach(|| drop(scraper));
    }
}

#[pyclass(name = "Balancer", module = "llmlb._core", frozen)]
struct PyBalancer {
    inner: Mutex<Balancer>,
    /// Shared picks through Redis, once `enable_shared` ran.
    shared: Mutex<Option<SharedPicks>>,
    /// A pinned clock in ms (`pin_clock`), or `UNPINNED`.
    pinned_ms: AtomicU64,
}

const UNPINNED: u64 = u64::MAX;

fn pick_error(error: PickError) -> PyErr {
    match error {
        PickError::NoEndpoints => NoEndpointsError::new_err("no endpoints in the pool"),
        PickError::OverLimit { endpoint, inflight } => OverLimitError::new_err(format!(
            "every endpoint is at maxRequestCount; least loaded {endpoint} has {inflight} in flight"
        )),
        PickError::Shed => ShedError::new_err(
            "every endpoint is saturated and this model is not critical; retry later",
        ),
        PickError::UnknownModel { model } => UnknownModelError::new_err(format!(
            "the model `{model}` does not exist: no endpoint of this pool serves it"
        )),
    }
}

/// A counted pick and the figures of its decision record.
#[pyclass(name = "Pick", module = "llmlb._core", frozen, get_all)]
struct PyPick {
    ticket: u64,
    endpoint: String,
    reason: &'static str,
    /// Leading prefix levels the endpoint holds, of the request's `prefix_levels`.
    prefix_depth: u32,
    prefix_levels: u32,
    /// The request's estimated prompt tokens, and those predicted cached on the endpoint.
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Candidates left after the filters.
    candidates: u32,
    /// The endpoint's total score, and the best other candidate's (`None`: it was alone).
    score: f64,
    runner_up: Option<f64>,
}

#[pymethods]
impl PyPick {
    /// A pick from its figures (tests and replays; the balancer makes the real ones).
    #[new]
    #[pyo3(signature = (
        *, ticket, endpoint, reason, prefix_depth = 0, prefix_levels = 0, prompt_tokens = 0,
        cached_tokens = 0, candidates = 1, score = 0.0, runner_up = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ticket: u64,
        endpoint: String,
        reason: &str,
        prefix_depth: u32,
        prefix_levels: u32,
        prompt_tokens: u64,
        cached_tokens: u64,
        candidates: u32,
        score: f64,
        runner_up: Option<f64>,
    ) -> PyResult<Self> {
        let reason = PickReason::ALL
            .into_iter()
            .map(PickReason::as_str)
            .find(|r| *r == reason)
            .ok_or_else(|| PyValueError::new_err(format!("unknown pick reason {reason:?}")))?;
        Ok(Self {
            ticket,
            endpoint,
            reason,
            prefix_depth,
            prefix_levels,
            prompt_tokens,
            cached_tokens,
            candidates,
            score,
            runner_up,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Pick(ticket={}, endpoint={:?}, reason={:?}, prefix_depth={})",
            self.ticket, self.endpoint, self.reason, self.prefix_depth
        )
    }
}

fn py_pick(p: &Pick) -> PyPick {
    let f = &p.figures;
    PyPick {
        ticket: p.ticket,
        endpoint: p.endpoint.to_string(),
        reason: p.reason.as_str(),
        prefix_depth: p.prefix_depth,
        prefix_levels: f.levels,
        prompt_tokens: f.prompt_tokens,
        cached_tokens: f.cached_tokens,
        candidates: f.candidates,
        score: f.score,
        runner_up: f.runner_up,
    }
}

impl PyPick {
    #[allow(clippy::too_many_arguments)]
    fn record<'a>(
        &'a self,
        policy: &'a str,
        state: &'a str,
        request_id: &'a str,
        path: &'a str,
        model: &'a str,
        pick_seconds: f64,
    ) -> DecisionRecord<'a> {
        DecisionRecord {
            endpoint: &self.endpoint,
            reason: self.reason,
            prefix_depth: self.prefix_depth,
            prefix_levels: self.prefix_levels,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            candidates: self.candidates,
            score: self.score,
            runner_up: self.runner_up,
            policy,
            state,
            request_id,
            path,
            model,
            pick_seconds,
        }
    }
}

/// The decision record of picks, in the field order it is made with (`RECORD_FIELDS`): as
/// dynamic metadata bytes for Envoy, or as a dict for logs, traces and `/debug/decisions`.
#[pyclass(name = "RecordEncoder", module = "llmlb._core", frozen)]
struct PyRecordEncoder {
    route_namespace: String,
    route_key: String,
    record_namespace: String,
    fields: Vec<(String, Field)>,
    /// `metadata()` as this field of the enclosing answer (`None`: the bare Struct).
    metadata_field: Option<u8>,
}

#[pymethods]
impl PyRecordEncoder {
    #[new]
    #[pyo3(signature = (route_namespace, route_key, record_namespace, names, metadata_field = 0))]
    fn new(
        route_namespace: String,
        route_key: String,
        record_namespace: String,
        names: Vec<String>,
        metadata_field: u8,
    ) -> PyResult<Self> {
        if metadata_field > pb_struct::MAX_ONE_BYTE_FIELD {
            return Err(PyValueError::new_err(format!(
                "metadata_field {metadata_field}: at most {}",
                pb_struct::MAX_ONE_BYTE_FIELD
            )));
        }
        let fields = names
            .into_iter()
            .map(|name| match Field::named(&name) {
                Some(field) => Ok((name, field)),
                None => Err(PyValueError::new_err(format!(
                    "no decision record field {name:?}"
                ))),
            })
            .collect::<PyResult<_>>()?;
        Ok(Self {
            route_namespace,
            route_key,
            record_namespace,
            fields,
            metadata_field: (metadata_field > 0).then_some(metadata_field),
        })
    }

    /// The answer's dynamic metadata (`google.protobuf.Struct` wire format): the route
    /// namespace with the endpoint, the record namespace with the record; with
    /// `metadata_field`, as that field of the answer, ready to append to its bytes.
    #[allow(clippy::too_many_arguments)]
    fn metadata<'py>(
        &self,
        py: Python<'py>,
        pick: &PyPick,
        policy: &str,
        state: &str,
        request_id: &str,
        path: &str,
        model: &str,
        pick_seconds: f64,
    ) -> Bound<'py, PyBytes> {
        let record = pick.record(policy, state, request_id, path, model, pick_seconds);
        PyBytes::new(
            py,
            &decision_record::encode_metadata(
                &self.route_namespace,
                &self.route_key,
                &self.record_namespace,
                &self.fields,
                &record,
                self.metadata_field,
            ),
        )
    }

    /// The record as a dict, in field order (absent fields left out).
    #[allow(clippy::too_many_arguments)]
    fn fields<'py>(
        &self,
        py: Python<'py>,
        pick: &PyPick,
        policy: &str,
        state: &str,
        request_id: &str,
        path: &str,
        model: &str,
        pick_seconds: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let record = pick.record(policy, state, request_id, path, model, pick_seconds);
        let out = PyDict::new(py);
        for (name, field) in &self.fields {
            match record.value(*field) {
                FieldValue::Text(s) => out.set_item(name, s)?,
                FieldValue::Count(n) => out.set_item(name, n)?,
                FieldValue::Number(n) => out.set_item(name, n)?,
                FieldValue::Absent => {}
            }
        }
        Ok(out)
    }
}

fn pick_result(result: Result<Pick, PickError>) -> PyResult<PyPick> {
    result.map(|p| py_pick(&p)).map_err(pick_error)
}

/// What a pick knows besides the body: the session header's value and the endpoint holding
/// the state the request refers to (see `Request::pinned`).
#[derive(Debug, Clone, Copy, Default)]
struct Context<'a> {
    session: Option<&'a str>,
    pinned: Option<&'a str>,
}

/// The request's affinity key by the configured order (see `affinity`).
fn key_of(
    parsed: Option<&ParsedRequest>,
    session: Option<&str>,
    order: &[AffinityKey],
) -> Option<u64> {
    let affinity = parsed.map(|r| &r.affinity);
    let field = |f: fn(&crate::request::Affinity) -> &Option<String>| {
        affinity.and_then(|a| f(a).as_deref())
    };
    KeySources {
        prompt_cache_key: field(|a| &a.prompt_cache_key),
        conversation: field(|a| &a.conversation),
        session,
        safety_identifier: field(|a| &a.safety_identifier),
        user: field(|a| &a.user),
    }
    .choose(order)
    .map(|(_, hash)| hash)
}

/// A request argument as the engine needs it, owned: `None` for a bad body.
fn owned_request(
    py: Python<'_>,
    request: RequestArg<'_>,
    context: Context<'_>,
    order: &[AffinityKey],
) -> Option<OwnedRequest> {
    let parsed;
    let result = match &request {
        RequestArg::Parsed(p) => p.get().result.as_ref().ok(),
        RequestArg::Body(body) => {
            parsed = parse(py, body).ok();
            parsed.as_ref()
        }
    };
    result.map(|r| OwnedRequest {
        hashes: r.prefix_hashes.clone(),
        level_ends: r.level_ends.clone(),
        prompt_bytes: r.prompt_bytes,
        context_bytes: r.context_bytes,
        model: Some(r.model.clone()),
        key: key_of(Some(r), context.session, order),
        pinned: context.pinned.map(str::to_owned),
    })
}

impl PyBalancer {
    fn shared_lock(&self) -> MutexGuard<'_, Option<SharedPicks>> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, Balancer> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that
        // matters more than refusing all traffic would, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        match self.pinned_ms.load(Ordering::Relaxed) {
            // One clock for every worker process sharing state (see `worker_state::clock_ms`).
            UNPINNED => worker_state::clock_ms(),
            pinned => pinned,
        }
    }

    /// Runs `f` on the shared protocol and the balancer (locked in this order, always).
    fn with_shared<R>(&self, f: impl FnOnce(&mut SharedPicks, &mut Balancer) -> R) -> PyResult<R> {
        let mut shared = self.shared_lock();
        let picks = shared
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("shared state is not enabled"))?;
        Ok(f(picks, &mut self.lock()))
    }
}

/// A script call for redis-py: `(KEYS, ARGV)`.
type CallTuple = (Vec<String>, Vec<Cow<'static, [u8]>>);

fn call_tuple(call: Call) -> CallTuple {
    (call.keys, call.args.into_iter().map(Cow::Owned).collect())
}

/// The picking defaults, from their one owner (`BalancerConfig::default`), by the daemon's
/// config names.
#[pyfunction]
fn balancer_defaults() -> HashMap<&'static str, f64> {
    let d = BalancerConfig::default();
    HashMap::from([
        ("redisKeyTTL", d.prefix_ttl_s as f64),
        ("prefixTableSize", d.prefix_capacity as f64),
        ("affinityLoadFactor", d.load_factor),
        ("affinityLoadFloor", f64::from(d.load_floor)),
        ("requestTokens", d.load_model.request_tokens),
        ("affinityWeight", d.load_model.affinity_weight),
        ("prefillTokensPerSecond", d.load_model.prefill_rate),
        ("maxRequestCount", f64::from(d.max_request_count)),
        ("staleAfter", d.stale_after_ms as f64),
        ("queueThresholdCritical", d.thresholds.queue),
        ("kvCacheThreshold", d.thresholds.kv_cache),
        ("queueingThresholdLoRA", d.thresholds.lora_queue),
        ("loraAffinityThreshold", d.thresholds.lora_affinity),
    ])
}

#[pymethods]
impl PyBalancer {
    /// Every setting is optional: a missing one takes its default (`balancer_defaults()`).
    #[new]
    #[pyo3(signature = (
        policy, *, prefix_ttl_s = None, prefix_capacity = None, load_factor = None,
        load_floor = None, request_tokens = None, affinity_weight = None, prefill_rate = None,
        max_request_count = None, critical_models = None, stale_after_ms = None,
        queue_threshold = None, kv_cache_threshold = None, lora_queue_threshold = None,
        lora_affinity = None, affinity_keys = None, route_unknown_models = None, seed = None
    ))]
    #[allow(clippy::too_many_arguments)] // keyword-only settings, mirrored from the config
    fn new(
        policy: &str,
        prefix_ttl_s: Option<u64>,
        prefix_capacity: Option<usize>,
        load_factor: Option<f64>,
        load_floor: Option<u32>,
        request_tokens: Option<f64>,
        affinity_weight: Option<f64>,
        prefill_rate: Option<f64>,
        max_request_count: Option<u32>,
        critical_models: Option<Vec<String>>,
        stale_after_ms: Option<u64>,
        queue_threshold: Option<f64>,
        kv_cache_threshold: Option<f64>,
        lora_queue_threshold: Option<f64>,
        lora_affinity: Option<f64>,
        affinity_keys: Option<Vec<String>>,
        route_unknown_models: Option<bool>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let policy = Policy::from_name(policy)
            .ok_or_else(|| PyValueError::new_err(format!("unknown policy {policy:?}")))?;
        let d = BalancerConfig::default();
        let load_factor = load_factor.unwrap_or(d.load_factor);
        if !(load_factor.is_finite() && load_factor >= 1.0) {
            return Err(PyValueError::new_err("load_factor must be a number >= 1"));
        }
        let load_model = LoadModel {
            request_tokens: request_tokens.unwrap_or(d.load_model.request_tokens),
            affinity_weight: affinity_weight.unwrap_or(d.load_model.affinity_weight),
            prefill_rate: prefill_rate.unwrap_or(d.load_model.prefill_rate),
        };
        load_model.validate().map_err(PyValueError::new_err)?;
        let affinity_keys = match affinity_keys {
            None => d.affinity_keys.clone(),
            Some(names) => names
                .iter()
                .map(|n| {
                    AffinityKey::from_name(n)
                        .ok_or_else(|| PyValueError::new_err(format!("unknown affinity key {n:?}")))
                })
                .collect::<PyResult<_>>()?,
        };
        let config = BalancerConfig {
            policy,
            prefix_ttl_s: prefix_ttl_s.unwrap_or(d.prefix_ttl_s),
            prefix_capacity: prefix_capacity.unwrap_or(d.prefix_capacity),
            load_factor,
            load_floor: load_floor.unwrap_or(d.load_floor),
            load_model,
            max_request_count: max_request_count.unwrap_or(d.max_request_count),
            critical_models,
            stale_after_ms: stale_after_ms.unwrap_or(d.stale_after_ms),
            thresholds: Thresholds {
                queue: queue_threshold.unwrap_or(d.thresholds.queue),
                kv_cache: kv_cache_threshold.unwrap_or(d.thresholds.kv_cache),
                lora_queue: lora_queue_threshold.unwrap_or(d.thresholds.lora_queue),
                lora_affinity: lora_affinity.unwrap_or(d.thresholds.lora_affinity),
            },
            affinity_keys,
            route_unknown_models: route_unknown_models.unwrap_or(d.route_unknown_models),
        };
        let capacity = config.prefix_capacity;
        // A seed makes the draws among never-picked endpoints reproducible (tests).
        let rng = seed.map_or_else(SmallRng::from_os_rng, SmallRng::seed_from_u64);
        let balancer = Balancer::try_with_rng(config, rng).map_err(|e| {
            PyMemoryError::new_err(format!(
                "cannot reserve a prefix table of {capacity} entries: {e}"
            ))
        })?;
        Ok(Self {
            inner: Mutex::new(balancer),
            shared: Mutex::new(None),
            pinned_ms: AtomicU64::new(UNPINNED),
        })
    }

    /// Pins the balancer's clock at `ms` (replays and tests: decisions that depend on time,
    /// such as prefill backlogs and prefix expiry, then repeat exactly); `None` unpins it.
    #[pyo3(signature = (ms))]
    fn pin_clock(&self, ms: Option<u64>) -> PyResult<()> {
        if ms == Some(UNPINNED) {
            return Err(PyValueError::new_err("clock out of range"));
        }
        self.pinned_ms
            .store(ms.unwrap_or(UNPINNED), Ordering::Relaxed);
        Ok(())
    }

    #[getter]
    fn policy(&self) -> &'static str {
        self.lock().config().policy.name()
    }

    /// Whether the policy reads prefix levels (only then are they worth hashing).
    #[getter]
    fn uses_prefix(&self) -> bool {
        self.lock().config().policy.uses_prefix()
    }

    fn set_endpoints(&self, addresses: Vec<String>) {
        self.lock().set_endpoints(&addresses);
    }

    fn set_healthy(&self, address: &str, healthy: bool) {
        self.lock().set_healthy(address, healthy);
    }

    /// Sets the models an endpoint serves (`None`: not known).
    #[pyo3(signature = (address, models))]
    fn set_models(&self, address: &str, models: Option<Vec<String>>) {
        self.lock().set_models(address, models.as_deref());
    }

    /// The models an endpoint is known to serve.
    fn models_of(&self, address: &str) -> Option<Vec<String>> {
        self.lock().models_of(address)
    }

    /// Picks an endpoint for a parsed request (or a body, parsed here without size limit,
    /// level cap or decoding): a `Pick`. An unusable body is picked by load with reason
    /// `"bad_body"`; `None` picks from headers alone.
    /// `session`: the session header's value; `pinned`: the endpoint holding the stored
    /// response the request refers to (see `Request::pinned`).
    #[pyo3(signature = (request, *, session = None, pinned = None))]
    fn pick(
        &self,
        py: Python<'_>,
        request: Option<RequestArg<'_>>,
        session: Option<&str>,
        pinned: Option<&str>,
    ) -> PyResult<PyPick> {
        let now = self.now_ms();
        let mut balancer = self.lock();
        let order = &balancer.config().affinity_keys;
        let Some(request) = request else {
            // From headers alone: no prompt, but the session and the pin still count.
            let headers_only = Request {
                key: key_of(None, session, order),
                pinned,
                ..Request::default()
            };
            return pick_result(balancer.pick_request(Some(&headers_only), now));
        };
        if let RequestArg::Parsed(parsed) = &request {
            // No copy of the levels: read in place.
            let parsed = parsed.get();
            let borrowed = parsed.result.as_ref().ok().map(|r| Request {
                hashes: &r.prefix_hashes,
                level_ends: &r.level_ends,
                prompt_bytes: r.prompt_bytes,
                context_bytes: r.context_bytes,
                model: Some(&r.model),
                key: key_of(Some(r), session, order),
                pinned,
            });
            return pick_result(balancer.pick_request(borrowed.as_ref(), now));
        }
        let context = Context { session, pinned };
        let owned = owned_request(py, request, context, order);
        pick_result(balancer.pick_request(owned.as_ref().map(OwnedRequest::borrow).as_ref(), now))
    }

    /// Records an endpoint's freshly scraped load (least_busy), stamped now.
    #[pyo3(signature = (address, *, waiting, running, kv_cache, running_lora, waiting_lora, max_lora))]
    #[allow(clippy::too_many_arguments)] // keyword-only fields of one scrape
    fn set_load(
        &self,
        address: &str,
        waiting: f64,
        running: f64,
        kv_cache: f64,
        running_lora: Vec<String>,
        waiting_lora: Vec<String>,
        max_lora: u32,
    ) {
        let load = Load {
            waiting,
            running,
            kv_cache,
            running_lora,
            waiting_lora,
            max_lora,
            at_ms: self.now_ms(),
        };
        self.lock().set_load(address, load);
    }

    /// `[(address, waiting, running, kv_cache, age_seconds, picks_since_scrape)]` for the pool;
    /// the metric fields are `None` before the first successful scrape.
    #[allow(clippy::type_complexity)]
    fn endpoint_loads(
        &self,
    ) -> Vec<(
        String,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        u32,
    )> {
        let now = self.now_ms();
        self.lock()
            .endpoint_loads()
            .into_iter()
            .map(|v| match v.load {
                Some(l) => (
                    v.address.to_string(),
                    Some(l.waiting),
                    Some(l.running),
                    Some(l.kv_cache),
                    Some(now.saturating_sub(l.at_ms) as f64 / 1000.0),
                    v.picks_since_scrape,
                ),
                None => (
                    v.address.to_string(),
                    None,
                    None,
                    None,
                    None,
                    v.picks_since_scrape,
                ),
            })
            .collect()
    }

    // --- shared state in Redis -------------------------------------------------------------

    /// Turns on shared picks for `pool` as replica `replica` (`commit_sha`: SHA1 of the commit
    /// script, for the pre-encoded `EVALSHA`).
    fn enable_shared(
        &self,
        pool: &str,
        replica: &str,
        lease_ms: u64,
        keep_ms: u64,
        commit_sha: &str,
    ) {
        let settings = Settings {
            replica: replica.to_owned(),
            lease_ms,
            keep_ms,
        };
        *self.shared_lock() = Some(SharedPicks::new(
            Keys::new(pool, replica),
            settings,
            commit_sha.to_owned(),
        ));
    }

    /// While Redis answers, decisions use the pool-wide loads of its replies; while it does not,
    /// this replica's own counts.
    fn set_remote(&self, on: bool) {
        self.lock().set_remote(on);
    }

    /// Decides a shared pick and encodes its commit: `(pending_id, RESP EVALSHA)`. `releases`
    /// (finished requests: `(request id, tokens from release_tokens)`) ride on it. Raises like
    /// `pick`.
    #[pyo3(signature = (request, request_id, releases = Vec::new(), *, session = None, pinned = None))]
    fn prepare_shared(
        &self,
        py: Python<'_>,
        request: Option<RequestArg<'_>>,
        request_id: String,
        releases: Vec<Release>,
        session: Option<&str>,
        pinned: Option<&str>,
    ) -> PyResult<(u64, Cow<'static, [u8]>)> {
        let order = self.lock().config().affinity_keys.clone();
        let owned = match request {
            None => Some(OwnedRequest {
                key: key_of(None, session, &order),
                pinned: pinned.map(str::to_owned),
                ..OwnedRequest::default()
            }),
            Some(arg) => owned_request(py, arg, Context { session, pinned }, &order),
        };
        let now = self.now_ms();
        let (id, command) = self
            .with_shared(|picks, b| picks.prepare(b, owned, request_id, &releases, now))?
            .map_err(pick_error)?;
        Ok((id, Cow::Owned(command)))
    }

    /// Reads a commit's reply `{committed, {requests...}, stream id}`: the `Pick`, or the
    /// next commit to send (bytes) after a race lost on the guard.
    fn complete_shared(&self, pending_id: u64, reply: Vec<Bound<'_, PyAny>>) -> PyResult<Either> {
        let bad = || PyValueError::new_err("not a commit reply");
        let [committed, requests, at] = reply.as_slice() else {
            return Err(bad());
        };
        let ints = |v: &Bound<'_, PyAny>| -> PyResult<Vec<i64>> {
            Ok(v.extract::<Vec<Option<i64>>>()?
                .into_iter()
                .map(|x| x.unwrap_or(0))
                .collect())
        };
        let at = at
            .extract::<PyBackedBytes>()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .or_else(|_| at.extract::<String>())?;
        let reply = CommitReply::new(committed.extract()?, &ints(requests)?, &at);
        let now = self.now_ms();
        match self
            .with_shared(|picks, b| picks.complete(b, pending_id, &reply, now))?
            .map_err(pick_error)?
        {
            Outcome::Picked(pick) => Ok(Either::Pick(py_pick(&pick))),
            Outcome::Retry(command) => Ok(Either::Retry(Cow::Owned(command))),
        }
    }

    /// Redis did not answer: counts the pending decision here only (like `pick`).
    fn fallback_shared(&self, pending_id: u64) -> PyResult<PyPick> {
        let now = self.now_ms();
        self.with_shared(|picks, b| picks.fallback(b, pending_id, now))?
            .map(|p| py_pick(&p))
            .ok_or_else(|| PyValueError::new_err(format!("unknown pending pick {pending_id}")))
    }

    /// Forgets a pending pick that will not be used (a no-op if already used).
    fn discard_shared(&self, pending_id: u64) -> PyResult<()> {
        self.with_shared(|picks, b| picks.discard(b, pending_id))
    }

    /// The release script call for a batch of finished requests (`(request id, tokens)`):
    /// `(KEYS, ARGV)` for redis-py.
    fn release_call(&self, releases: Vec<Release>) -> PyResult<CallTuple> {
        self.with_shared(|picks, _| {
            call_tuple(release_call(picks.keys(), picks.settings(), &releases))
        })
    }

    /// The same release call as a RESP `EVALSHA` of `sha`.
    fn release_command(&self, sha: &str, releases: Vec<Release>) -> PyResult<Cow<'static, [u8]>> {
        self.with_shared(|picks, _| {
            Cow::Owned(release_call(picks.keys(), picks.settings(), &releases).resp(sha))
        })
    }

    /// The heartbeat script call (`(KEYS, ARGV)`), listing up to `max_listed` lapsed replicas.
    fn heartbeat_call(&self, max_listed: u32) -> PyResult<CallTuple> {
        self.with_shared(|picks, _| {
            call_tuple(heartbeat_call(picks.keys(), picks.settings(), max_listed))
        })
    }

    /// The reap script call (`(KEYS, ARGV)`) for a lapsed replica.
    fn reap_call(&self, other: &str) -> PyResult<CallTuple> {
        self.with_shared(|picks, _| call_tuple(reap_call(picks.keys(), other)))
    }

    /// A key of the pool: `inflight`, `leases` or `picks`.
    fn shared_key(&self, name: &str) -> PyResult<String> {
        self.with_shared(|picks, _| {
            let keys = picks.keys();
            match name {
                "inflight" => Some(keys.inflight.clone()),
                "leases" => Some(keys.leases.clone()),
                "picks" => Some(keys.picks.clone()),
                // A prefix: the response id follows it.
                "response:" => Some(keys.response("")),
                _ => None,
            }
        })?
        .ok_or_else(|| PyValueError::new_err(format!("no shared key named {name:?}")))
    }

    /// Applies one record of the pool's stream (its id, and its fields as redis-py gives them):
    /// another replica's commit, release, reap or take-back. Returns whether it changed anything
    /// (this replica's own records and garbled ones do not).
    fn apply_stream_record(
        &self,
        record_id: &str,
        fields: HashMap<Vec<u8>, Vec<u8>>,
    ) -> PyResult<bool> {
        let text = |name: &[u8]| fields.get(name).and_then(|v| std::str::from_utf8(v).ok());
        let Some(replica) = text(b"r") else {
            return Ok(false);
        };
        let record = Record {
            replica,
            endpoint: text(b"e"),
            tokens: text(b"t").and_then(|t| t.parse().ok()),
            levels: fields.get(b"l".as_slice()).map(Vec::as_slice),
            failed: fields.contains_key(b"f".as_slice()),
            removed: text(b"d"),
        };
        let wall_now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let now = self.now_ms();
        self.with_shared(|picks, b| picks.apply_record(b, record_id, &record, wall_now_ms, now))
    }

    /// Ends a pick's request; `False` if the ticket was unknown or already released.
    fn release(&self, ticket: u64) -> bool {
        self.release_tokens(ticket).is_some()
    }

    /// Ends a pick's request like `release`, returning the prompt tokens the backlog still held
    /// of it (for its release record, so the other replicas take them back too); `None` if the
    /// ticket was unknown or already released.
    fn release_tokens(&self, ticket: u64) -> Option<u64> {
        let now = self.now_ms();
        self.lock().release(ticket, now)
    }

    /// Ends a request that failed (an error answer): it also takes back the prefix levels its
    /// pick claimed (and, like `release`, what the backlog still holds of its prompt tokens).
    /// With shared state, returns the stream record (RESP `XADD`) that tells the
    /// other replicas; else `None`.
    fn release_failed(&self, ticket: u64) -> Option<Cow<'static, [u8]>> {
        let now = self.now_ms();
        let taken = self.lock().release_failed(ticket, now)?;
        let shared = self.shared_lock();
        let picks = shared.as_ref()?;
        Some(Cow::Owned(forget_command(
            picks.keys(),
            &picks.settings().replica,
            &taken,
        )))
    }

    /// `[(address, inflight, own_inflight, healthy, in_pool, backlog)]`: the pool, then
    /// endpoints that left it with requests still in flight. `inflight` and `backlog` (prompt
    /// tokens not yet prefilled, estimated) are the view decisions use (every worker, or every
    /// replica through Redis); `own_inflight` this process's.
    fn endpoints(&self) -> Vec<(String, u32, u32, bool, bool, u64)> {
        let now = self.now_ms();
        self.lock()
            .endpoints(now)
            .into_iter()
            .map(|v| {
                (
                    v.address.to_string(),
                    v.inflight,
                    v.own_inflight,
                    v.healthy,
                    v.in_pool,
                    v.backlog,
                )
            })
            .collect()
    }

    /// Shares in-flight counts and prefix entries with the other workers of
    /// `llmlb serve --workers N` through the state file made by `create_worker_state`.
    fn attach_workers(&self, path: PathBuf, worker: usize) -> PyResult<()> {
        let state = WorkerState::open(&path, worker)
            .map_err(|e| PyRuntimeError::new_err(format!("worker state: {e}")))?;
        self.lock().attach_workers(Arc::new(state));
        Ok(())
    }

    #[getter]
    fn open_tickets(&self) -> usize {
        self.lock().open_tickets()
    }

    #[getter]
    fn prefix_entries(&self) -> usize {
        self.lock().prefix_entries()
    }

    /// The prefix table's size and this process's activity on it, by name.
    fn prefix_stats(&self) -> HashMap<&'static str, u64> {
        let stats = self.lock().prefix_stats();
        HashMap::from([
            ("entries", stats.entries as u64),
            ("capacity", stats.capacity as u64),
            ("lookups", stats.counts.lookups),
            ("hits", stats.counts.hits),
            ("insertions", stats.counts.insertions),
            ("evictions", stats.counts.evictions),
        ])
    }
}

/// `complete_shared`'s answer: a pick, or the next commit to send.
#[derive(IntoPyObject)]
enum Either {
    Pick(PyPick),
    Retry(Cow<'static, [u8]>),
}

/// Creates the state file the workers of `llmlb serve --workers N` share; returns its size in
/// bytes. `slots` bounds the distinct endpoint addresses over the file's life.
#[pyfunction]
fn create_worker_state(
    path: PathBuf,
    workers: usize,
    slots: usize,
    prefix_capacity: usize,
    prefix_ttl_s: u64,
) -> PyResult<usize> {
    let layout = Layout::new(workers, slots, prefix_capacity);
    WorkerState::create(&path, layout, prefix_ttl_s)
        .map_err(|e| PyRuntimeError::new_err(format!("worker state {}: {e}", path.display())))?;
    Ok(layout.bytes())
}

/// Waits up to `timeout_us` microseconds for `fd` to become readable, with the GIL released;
/// returns whether it is (see `fd_wait`).
#[pyfunction]
fn wait_readable(py: Python<'_>, fd: i32, timeout_us: u64) -> PyResult<bool> {
    py.detach(|| fd_wait::wait_readable(fd, Duration::from_micros(timeout_us)))
        .map_err(|e| PyOSError::new_err(format!("waiting on descriptor {fd}: {e}")))
}

/// The Redis Lua scripts by name (`commit`, `release`, `heartbeat`, `reap`).
#[pyfunction]
fn shared_scripts() -> HashMap<&'static str, &'static str> {
    scripts::ALL.into_iter().collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PREFIX_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)?;
    m.add("SHARED_COMMIT_ATTEMPTS", crate::shared::picks::MAX_ATTEMPTS)?;
    // The gRPC service the transport serves (and health checks name), for the Envoy config.
    m.add("EXT_PROC_SERVICE", crate::extproc_server::EXT_PROC_SERVICE)?;
    m.add(
        "PICK_REASONS",
        PickReason::ALL.map(PickReason::as_str).to_vec(),
    )?;
    m.add(
        "FALLBACK_PICK_REASONS",
        PickReason::ALL
            .into_iter()
            .filter(|r| r.is_fallback())
            .map(PickReason::as_str)
            .collect::<Vec<_>>(),
    )?;
    m.add_class::<PyBalancer>()?;
    m.add_class::<PyPick>()?;
    m.add_class::<PyRecordEncoder>()?;
    m.add_class::<PyParsedRequest>()?;
    m.add_class::<PyRequestStream>()?;
    m.add_class::<PyEngineMetrics>()?;
    m.add_class::<PyPageScraper>()?;
    m.add_class::<PyExtProcTransport>()?;
    m.add_class::<PyExtProcMessage>()?;
    m.add_function(wrap_pyfunction!(echo_response_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(request_body_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_request, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_body, m)?)?;
    m.add_function(wrap_pyfunction!(py_request_kind, m)?)?;
    m.add_function(wrap_pyfunction!(py_stored_response_id, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_engine_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(shared_scripts, m)?)?;
    m.add_function(wrap_pyfunction!(balancer_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(create_worker_state, m)?)?;
    m.add_function(wrap_pyfunction!(wait_readable, m)?)?;
    let py = m.py();
    m.add("RequestParseError", py.get_type::<RequestParseError>())?;
    m.add("BodyTooLargeError", py.get_type::<BodyTooLargeError>())?;
    m.add("MetricsParseError", py.get_type::<MetricsParseError>())?;
    m.add("NoEndpointsError", py.get_type::<NoEndpointsError>())?;
    m.add("OverLimitError", py.get_type::<OverLimitError>())?;
    m.add("UnknownModelError", py.get_type::<UnknownModelError>())?;
    m.add("ShedError", py.get_type::<ShedError>())?;
    Ok(())
}
