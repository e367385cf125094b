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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::balancer::{Balancer, BalancerConfig, Load, Pick, PickError};
use crate::body_decode::{parse_body, BodyParser};
use crate::engine_metrics::{parse_engine_metrics, Engine, EngineMetrics, MetricsError};
use crate::fd_wait;
use crate::prefix_hash::DEFAULT_BLOCK_SIZE;
use crate::request::{parse_request, ParseError, ParsedRequest, TooLarge};
use crate::scheduling::least_busy::Thresholds;
use crate::scheduling::policies::Policy;
use crate::shared::{pick_call, resp_evalsha, scripts, Keys, PickSettings, PICK_FIXED_KEYS};
use crate::worker_state::{Layout, WorkerState};

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
    OverLimitError,
    PyRuntimeError,
    "The best endpoint already has maxRequestCount requests in flight."
);

/// Bodies at least this large are parsed with the GIL released.
const DETACH_BYTES: usize = 64 * 1024;

fn parse(py: Python<'_>, body: &PyBackedBytes) -> Result<ParsedRequest, ParseError> {
    if body.len() >= DETACH_BYTES {
        py.detach(|| parse_request(body))
    } else {
        parse_request(body)
    }
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

impl PyParsedRequest {
    /// `(prefix hashes, model)`, or `None` for a bad body.
    fn routing(&self) -> Option<(&[u64], &str)> {
        self.result
            .as_ref()
            .ok()
            .map(|r| (r.prefix_hashes.as_slice(), r.model.as_str()))
    }
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

/// Parses an OpenAI chat-completions or completions body.
#[pyfunction(name = "parse_request")]
fn py_parse_request(py: Python<'_>, body: PyBackedBytes) -> PyResult<PyParsedRequest> {
    let parsed = parse(py, &body).map_err(|e| RequestParseError::new_err(e.to_string()))?;
    Ok(PyParsedRequest { result: Ok(parsed) })
}

/// Decodes (`Content-Encoding`) and parses a whole body, with the size limit and level cap;
/// a bad body gives a result that is not `ok`.
#[pyfunction(name = "parse_body")]
fn py_parse_body(
    py: Python<'_>,
    body: PyBackedBytes,
    encoding: Option<&str>,
    max_bytes: u64,
    max_blocks: usize,
) -> PyParsedRequest {
    let result = if body.len() >= DETACH_BYTES {
        py.detach(|| parse_body(&body, encoding, max_bytes, max_blocks))
    } else {
        parse_body(&body, encoding, max_bytes, max_blocks)
    };
    PyParsedRequest { result }
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
    #[pyo3(signature = (encoding, max_bytes, max_blocks))]
    fn new(encoding: Option<&str>, max_bytes: u64, max_blocks: usize) -> Self {
        Self {
            inner: Mutex::new(Some(BodyParser::new(encoding, max_bytes, max_blocks))),
        }
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
    let engine = engine
        .map(|name| {
            Engine::from_name(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown engine {name:?}; expected vllm, sglang, trtllm-serve or triton"
                ))
            })
        })
        .transpose()?;
    let (engine, m) =
        parse_metrics(py, &text, engine).map_err(|e| MetricsParseError::new_err(e.to_string()))?;
    Ok((
        engine.name(),
        PyEngineMetrics {
            engine: engine.name(),
            waiting: m.waiting,
            running: m.running,
            kv_cache_usage: m.kv_cache_usage,
            running_lora_adapters: m.running_lora_adapters,
            waiting_lora_adapters: m.waiting_lora_adapters,
            max_lora: m.max_lora,
            lines_skipped: m.lines_skipped,
        },
    ))
}

/// A request parsed for a shared-state pick, kept until the pick is committed or falls back.
struct Prepared {
    /// `None` when the body could not be parsed.
    hashes: Option<Vec<u64>>,
    no_healthy: bool,
}

struct SharedSetup {
    keys: Keys,
    /// SHA1 of the pick script, for the pre-encoded `EVALSHA`.
    pick_sha: String,
    settings: PickSettings,
    prepared: HashMap<u64, Prepared>,
    next_id: u64,
}

#[pyclass(name = "Balancer", module = "llmlb._core", frozen)]
struct PyBalancer {
    inner: Mutex<Balancer>,
    shared: Mutex<Option<SharedSetup>>,
    started: Instant,
}

fn pick_result(result: Result<Pick, PickError>) -> PyResult<PickTuple> {
    match result {
        Ok(p) => Ok((
            p.ticket,
            p.endpoint.to_string(),
            p.reason.as_str(),
            p.prefix_depth,
        )),
        Err(PickError::NoEndpoints) => Err(NoEndpointsError::new_err("no endpoints in the pool")),
        Err(PickError::OverLimit { endpoint, inflight }) => Err(OverLimitError::new_err(format!(
            "every endpoint is at maxRequestCount; least loaded {endpoint} has {inflight} in flight"
        ))),
        Err(PickError::Shed) => Err(ShedError::new_err(
            "every endpoint is saturated and this model is not critical; retry later",
        )),
    }
}

impl PyBalancer {
    fn shared_lock(&self) -> MutexGuard<'_, Option<SharedSetup>> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take_prepared(&self, prepared_id: u64) -> PyResult<Prepared> {
        self.shared_lock()
            .as_mut()
            .and_then(|s| s.prepared.remove(&prepared_id))
            .ok_or_else(|| PyValueError::new_err(format!("unknown prepared pick {prepared_id}")))
    }

    fn lock(&self) -> MutexGuard<'_, Balancer> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that
        // matters more than refusing all traffic would, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

type PickTuple = (u64, String, &'static str, u32);
/// `(prepared_id, keys, args, RESP command)`.
type PreparedTuple = (u64, Vec<String>, Vec<String>, Cow<'static, [u8]>);

#[pymethods]
impl PyBalancer {
    #[new]
    #[pyo3(signature = (
        policy, *, prefix_ttl_s = 1800, prefix_capacity = 262_144, load_factor = 1.5, load_floor = 8,
        max_request_count = 0, critical_models = None, stale_after_ms = 2000, queue_threshold = 5.0,
        kv_cache_threshold = 0.8, lora_queue_threshold = 128.0, lora_affinity = 0.999
    ))]
    #[allow(clippy::too_many_arguments)] // keyword-only settings, mirrored from the config
    fn new(
        policy: &str,
        prefix_ttl_s: u64,
        prefix_capacity: usize,
        load_factor: f64,
        load_floor: u32,
        max_request_count: u32,
        critical_models: Option<Vec<String>>,
        stale_after_ms: u64,
        queue_threshold: f64,
        kv_cache_threshold: f64,
        lora_queue_threshold: f64,
        lora_affinity: f64,
    ) -> PyResult<Self> {
        let policy = Policy::from_name(policy)
            .ok_or_else(|| PyValueError::new_err(format!("unknown policy {policy:?}")))?;
        if !(load_factor.is_finite() && load_factor >= 1.0) {
            return Err(PyValueError::new_err("load_factor must be a number >= 1"));
        }
        let config = BalancerConfig {
            policy,
            prefix_ttl_s,
            prefix_capacity,
            load_factor,
            load_floor,
            max_request_count,
            critical_models,
            stale_after_ms,
            thresholds: Thresholds {
                queue: queue_threshold,
                kv_cache: kv_cache_threshold,
                lora_queue: lora_queue_threshold,
                lora_affinity,
            },
        };
        let balancer = Balancer::try_new(config).map_err(|e| {
            PyMemoryError::new_err(format!(
                "cannot reserve a prefix table of {prefix_capacity} entries: {e}"
            ))
        })?;
        Ok(Self {
            inner: Mutex::new(balancer),
            shared: Mutex::new(None),
            started: Instant::now(),
        })
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

    /// Picks an endpoint for a parsed request (or a body, parsed here without size limit,
    /// level cap or decoding): `(ticket, endpoint, reason, prefix_depth)`. An unusable body is
    /// picked by load with reason `"bad_body"`; `None` picks from headers alone.
    #[pyo3(signature = (request))]
    fn pick(&self, py: Python<'_>, request: Option<RequestArg<'_>>) -> PyResult<PickTuple> {
        let now = self.now_ms();
        match request {
            None => pick_result(self.lock().pick_for(Some(&[]), None, now)),
            Some(RequestArg::Parsed(parsed)) => {
                let routing = parsed.get().routing();
                let (hashes, model) = routing.map_or((None, None), |(h, m)| (Some(h), Some(m)));
                pick_result(self.lock().pick_for(hashes, model, now))
            }
            Some(RequestArg::Body(body)) => {
                let parsed = parse(py, &body).ok();
                let hashes = parsed.as_ref().map(|p| p.prefix_hashes.as_slice());
                let model = parsed.as_ref().map(|p| p.model.as_str());
                pick_result(self.lock().pick_for(hashes, model, now))
            }
        }
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

    /// Turns on shared-state picks for `pool` as replica `replica`.
    fn enable_shared(
        &self,
        pool: &str,
        replica: &str,
        lease_ms: u64,
        keep_ms: u64,
        pick_sha: &str,
    ) {
        let balancer = self.lock();
        let config = balancer.config();
        let settings = PickSettings {
            replica: replica.to_owned(),
            lease_ms,
            keep_ms,
            max_request_count: config.max_request_count,
            prefix_ttl_ms: config.prefix_ttl_s.saturating_mul(1000),
            load_factor: config.load_factor,
            load_floor: config.load_floor,
        };
        drop(balancer);
        *self.shared_lock() = Some(SharedSetup {
            keys: Keys::new(pool, replica),
            pick_sha: pick_sha.to_owned(),
            settings,
            prepared: HashMap::new(),
            next_id: 1,
        });
    }

    /// Encodes the shared pick script call for a parsed request (or a body, parsed here as
    /// `pick` does): `(prepared_id, keys, args, command)`, where `command` is the same call as a
    /// ready-to-send RESP `EVALSHA`. Raises `NoEndpointsError` on an empty pool. Every prepared
    /// id must be committed, fall back or be discarded.
    /// `releases`: request ids of finished requests that the same script call releases first.
    #[pyo3(signature = (request, request_id, seed, releases = Vec::new()))]
    fn prepare_shared(
        &self,
        py: Python<'_>,
        request: Option<RequestArg<'_>>,
        request_id: &str,
        seed: u32,
        releases: Vec<String>,
    ) -> PyResult<PreparedTuple> {
        let (model, hashes) = match request {
            None => (String::new(), Some(Vec::new())),
            Some(RequestArg::Parsed(parsed)) => match parsed.get().routing() {
                Some((hashes, model)) => (model.to_owned(), Some(hashes.to_vec())),
                None => (String::new(), None),
            },
            Some(RequestArg::Body(body)) => match parse(py, &body) {
                Ok(p) => (p.model, Some(p.prefix_hashes)),
                Err(_) => (String::new(), None),
            },
        };
        let (candidates, no_healthy) = self.lock().candidates();
        if candidates.is_empty() {
            return Err(NoEndpointsError::new_err("no endpoints in the pool"));
        }
        let uses_prefix = self.lock().config().policy.uses_prefix();
        let mut guard = self.shared_lock();
        let setup = guard
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("shared state is not enabled"))?;
        let levels: &[u64] = if uses_prefix {
            hashes.as_deref().unwrap_or(&[])
        } else {
            &[]
        };
        let names: Vec<&str> = candidates.iter().map(|c| &**c).collect();
        let (keys, args) = pick_call(
            &setup.keys,
            &setup.settings,
            request_id,
            seed,
            &names,
            &model,
            levels,
            &releases,
        );
        let command = resp_evalsha(&setup.pick_sha, &keys, &args);
        let id = setup.next_id;
        setup.next_id += 1;
        setup.prepared.insert(id, Prepared { hashes, no_healthy });
        Ok((id, keys, args, Cow::Owned(command)))
    }

    /// Counts a shared pick locally: `(ticket, reason)`.
    fn commit_shared(
        &self,
        prepared_id: u64,
        endpoint: &str,
        depth: u32,
    ) -> PyResult<(u64, &'static str)> {
        let prepared = self.take_prepared(prepared_id)?;
        let reason = match (&prepared.hashes, prepared.no_healthy, depth) {
            (None, _, _) => "bad_body",
            (_, true, _) => "no_healthy",
            (_, _, 0) => "least_request",
            _ => "prefix_hit",
        };
        let now = self.now_ms();
        let ticket = self.lock().assign(
            endpoint,
            prepared.hashes.as_deref().unwrap_or(&[]),
            depth,
            now,
        );
        Ok((ticket, reason))
    }

    /// Picks from local state instead (shared state unavailable): like `pick`.
    fn fallback_shared(&self, prepared_id: u64) -> PyResult<PickTuple> {
        let prepared = self.take_prepared(prepared_id)?;
        let now = self.now_ms();
        pick_result(self.lock().pick(prepared.hashes.as_deref(), now))
    }

    /// Forgets a prepared pick that will not be used.
    fn discard_shared(&self, prepared_id: u64) {
        if let Some(setup) = self.shared_lock().as_mut() {
            setup.prepared.remove(&prepared_id);
        }
    }

    /// Key names: `{"inflight", "leases", "replica_counts", "replica_requests"}`.
    fn shared_keys(&self) -> PyResult<HashMap<&'static str, String>> {
        let guard = self.shared_lock();
        let keys = &guard
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("shared state is not enabled"))?
            .keys;
        Ok(HashMap::from([
            ("inflight", keys.inflight.clone()),
            ("leases", keys.leases.clone()),
            ("replica_counts", keys.replica_counts.clone()),
            ("replica_requests", keys.replica_requests.clone()),
        ]))
    }

    /// `(counts, requests)` key names of another replica, for reaping it.
    fn replica_keys(&self, replica: &str) -> PyResult<(String, String)> {
        let guard = self.shared_lock();
        let keys = &guard
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("shared state is not enabled"))?
            .keys;
        Ok((keys.counts_of(replica), keys.requests_of(replica)))
    }

    /// Ends a pick's request; `False` if the ticket was unknown or already released. A `failed`
    /// request (an error answer) also takes back the prefix levels its pick claimed.
    #[pyo3(signature = (ticket, failed = false))]
    fn release(&self, ticket: u64, failed: bool) -> bool {
        if failed {
            self.lock().release_failed(ticket)
        } else {
            self.lock().release(ticket)
        }
    }

    /// `[(address, inflight, own_inflight, healthy, in_pool)]`: the pool, then endpoints that
    /// left it with requests still in flight. `inflight` counts every worker process attached to
    /// the same state; `own_inflight` this process alone.
    fn endpoints(&self) -> Vec<(String, u32, u32, bool, bool)> {
        self.lock()
            .endpoints()
            .into_iter()
            .map(|v| {
                (
                    v.address.to_string(),
                    v.inflight,
                    v.own_inflight,
                    v.healthy,
                    v.in_pool,
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

/// The Redis Lua scripts by name (`pick`, `release`, `heartbeat`, `reap`, `forget`).
#[pyfunction]
fn shared_scripts() -> HashMap<&'static str, &'static str> {
    scripts::ALL.into_iter().collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PREFIX_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)?;
    m.add("PICK_FIXED_KEYS", PICK_FIXED_KEYS)?;
    m.add_class::<PyBalancer>()?;
    m.add_class::<PyParsedRequest>()?;
    m.add_class::<PyRequestStream>()?;
    m.add_class::<PyEngineMetrics>()?;
    m.add_function(wrap_pyfunction!(py_parse_request, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_body, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_engine_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(shared_scripts, m)?)?;
    m.add_function(wrap_pyfunction!(create_worker_state, m)?)?;
    m.add_function(wrap_pyfunction!(wait_readable, m)?)?;
    let py = m.py();
    m.add("RequestParseError", py.get_type::<RequestParseError>())?;
    m.add("BodyTooLargeError", py.get_type::<BodyTooLargeError>())?;
    m.add("MetricsParseError", py.get_type::<MetricsParseError>())?;
    m.add("NoEndpointsError", py.get_type::<NoEndpointsError>())?;
    m.add("OverLimitError", py.get_type::<OverLimitError>())?;
    m.add("ShedError", py.get_type::<ShedError>())?;
    Ok(())
}
