//! PyO3 bindings: a thin layer over the pure-Rust core.
//!
//! Bodies arrive as `bytes` and are held as `PyBackedBytes` (no copy). Parsing large bodies
//! runs with the GIL released (`detach`); small ones stay attached, where releasing would cost
//! more than the work. The balancer's state sits behind a mutex that the asyncio daemon never
//! contends (one event-loop thread).

// PyO3 extracts arguments as owned values; taking them by value is how the binding works.
#![allow(clippy::needless_pass_by_value)]

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::balancer::{Balancer, BalancerConfig, PickError};
use crate::prefix_hash::DEFAULT_BLOCK_SIZE;
use crate::request::{parse_request, ParseError, ParsedRequest};
use crate::scheduling::policies::Policy;

create_exception!(
    _core,
    RequestParseError,
    PyValueError,
    "The body is not a usable OpenAI request."
);
create_exception!(
    _core,
    NoEndpointsError,
    PyRuntimeError,
    "The pool has no endpoints."
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

#[pyclass(name = "ParsedRequest", module = "llmlb._core", frozen, get_all)]
struct PyParsedRequest {
    kind: &'static str,
    model: String,
    stream: bool,
    prefix_hashes: Vec<u64>,
}

/// Parses an OpenAI chat-completions or completions body.
#[pyfunction(name = "parse_request")]
fn py_parse_request(py: Python<'_>, body: PyBackedBytes) -> PyResult<PyParsedRequest> {
    let parsed = parse(py, &body).map_err(|e| RequestParseError::new_err(e.to_string()))?;
    Ok(PyParsedRequest {
        kind: parsed.kind.as_str(),
        model: parsed.model,
        stream: parsed.stream,
        prefix_hashes: parsed.prefix_hashes,
    })
}

#[pyclass(name = "Balancer", module = "llmlb._core", frozen)]
struct PyBalancer {
    inner: Mutex<Balancer>,
    started: Instant,
}

impl PyBalancer {
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

#[pymethods]
impl PyBalancer {
    #[new]
    #[pyo3(signature = (
        policy, *, prefix_ttl_s = 1800, prefix_capacity = 262_144, load_factor = 1.25, load_floor = 2,
        max_request_count = 0
    ))]
    fn new(
        policy: &str,
        prefix_ttl_s: u64,
        prefix_capacity: usize,
        load_factor: f64,
        load_floor: u32,
        max_request_count: u32,
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
        };
        Ok(Self {
            inner: Mutex::new(Balancer::new(config)),
            started: Instant::now(),
        })
    }

    #[getter]
    fn policy(&self) -> &'static str {
        self.lock().config().policy.name()
    }

    fn set_endpoints(&self, addresses: Vec<String>) {
        self.lock().set_endpoints(&addresses);
    }

    fn set_healthy(&self, address: &str, healthy: bool) {
        self.lock().set_healthy(address, healthy);
    }

    /// Parses `body` and picks an endpoint: `(ticket, endpoint, reason, prefix_depth)`.
    /// An unusable body is picked by load with reason `"bad_body"`; `body=None` picks from
    /// headers alone (no prefix information).
    #[pyo3(signature = (body))]
    fn pick(&self, py: Python<'_>, body: Option<PyBackedBytes>) -> PyResult<PickTuple> {
        let parsed = body.map(|b| parse(py, &b));
        let hashes = match &parsed {
            None => Some(&[][..]),
            Some(Ok(p)) => Some(p.prefix_hashes.as_slice()),
            Some(Err(_)) => None,
        };
        let now = self.now_ms();
        match self.lock().pick(hashes, now) {
            Ok(p) => Ok((p.ticket, p.endpoint.to_string(), p.reason.as_str(), p.prefix_depth)),
            Err(PickError::NoEndpoints) => Err(NoEndpointsError::new_err("no endpoints in the pool")),
            Err(PickError::OverLimit { endpoint, inflight }) => Err(OverLimitError::new_err(format!(
                "every endpoint is at maxRequestCount; least loaded {endpoint} has {inflight} in flight"
            ))),
        }
    }

    /// Ends a pick's request; `False` if the ticket was unknown or already released.
    fn release(&self, ticket: u64) -> bool {
        self.lock().release(ticket)
    }

    /// `[(address, inflight, healthy, in_pool)]`: the pool, then endpoints that left it with
    /// requests still in flight.
    fn endpoints(&self) -> Vec<(String, u32, bool, bool)> {
        self.lock()
            .endpoints()
            .into_iter()
            .map(|v| (v.address.to_string(), v.inflight, v.healthy, v.in_pool))
            .collect()
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PREFIX_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)?;
    m.add_class::<PyBalancer>()?;
    m.add_class::<PyParsedRequest>()?;
    m.add_function(wrap_pyfunction!(py_parse_request, m)?)?;
    let py = m.py();
    m.add("RequestParseError", py.get_type::<RequestParseError>())?;
    m.add("NoEndpointsError", py.get_type::<NoEndpointsError>())?;
    m.add("OverLimitError", py.get_type::<OverLimitError>())?;
    Ok(())
}
