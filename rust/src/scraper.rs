//! The metrics scraper: every endpoint's `/metrics` page fetched and parsed on one background
//! thread, each endpoint on its own timer.
//!
//! Why not the event loop: at 100 endpoints scraped every 50 ms (2,000 pages a second) the
//! asyncio scraper (aiohttp, a task per endpoint) cost half a core, ~255 µs a scrape, almost
//! all of it HTTP client and task switching in Python (bench/scale, `idle`). Here a scrape is a
//! request on a kept-alive connection of hyper's pooled HTTP/1 client, driven by a
//! current-thread tokio runtime, and the page is parsed where it lands; the daemon only drains
//! the outcomes (one call per drain) and hands the loads to the balancer.
//!
//! Each endpoint has one task: scrape, then wait out the rest of the interval (`Delay`: a slow
//! endpoint delays only its own next scrape, never piles requests on itself). A page is bounded
//! by a timeout for the whole exchange and by a size limit; failures come back as outcomes
//! with a reason (the `llmlb_metrics_scrape_errors_total` label) and a detail.
//! Outcomes queue until drained; the queue is bounded (oldest dropped), so a daemon that stops
//! draining cannot grow it without limit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;

use crate::engine_metrics::{parse_engine_metrics, Engine, EngineMetrics};

/// Outcomes kept per target between drains before the oldest are dropped.
const QUEUE_PER_TARGET: usize = 16;
/// Idle connections are closed after this long (a scrape reuses its endpoint's connection).
const POOL_IDLE: Duration = Duration::from_secs(30);

/// One endpoint to scrape: its pool address (the key outcomes carry), the page's URL and the
/// engine whose names to read (`None`: detected from the first page, then kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub url: String,
    pub engine: Option<Engine>,
}

/// Why a scrape gave no page, or no usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A status other than 200.
    HttpStatus(u16),
    /// No whole answer within the timeout.
    Timeout,
    /// Connecting, sending or reading failed (or the URL is unusable).
    Connect(String),
    /// The page is larger than the limit.
    TooLarge(usize),
    /// The page is not a metrics page of a known engine.
    Parse(String),
}

impl Failure {
    /// The reason label (`llmlb_metrics_scrape_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::HttpStatus(_) => "http_status",
            Failure::Timeout => "timeout",
            Failure::Connect(_) => "connect",
            Failure::TooLarge(_) => "too_large",
            Failure::Parse(_) => "parse",
        }
    }

    /// What an operator reads in the log and `/debug/endpoints`.
    pub fn detail(&self, timeout: Duration) -> String {
        match self {
            Failure::HttpStatus(status) => format!("HTTP {status}"),
            Failure::Timeout => format!("no answer within {} ms", timeout.as_millis()),
            Failure::Connect(message) | Failure::Parse(message) => message.clone(),
            Failure::TooLarge(limit) => format!("page over {limit} bytes"),
        }
    }
}

/// One scrape's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub address: String,
    pub result: Result<(Engine, EngineMetrics), Failure>,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_page_bytes: usize,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

struct Shared {
    outcomes: Mutex<VecDeque<Outcome>>,
    /// Bound of `outcomes`, from the number of targets.
    capacity: Mutex<usize>,
}

impl Shared {
    fn push(&self, outcome: Outcome) {
        let capacity = *self.capacity.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        while outcomes.len() >= capacity.max(1) {
            outcomes.pop_front();
        }
        outcomes.push_back(outcome);
    }
}

/// The scraper thread and its targets. Dropping it stops the thread (in-flight scrapes are
/// abandoned, their connections closed).
pub struct Scraper {
    settings: Settings,
    runtime: Handle,
    client: HttpClient,
    shared: Arc<Shared>,
    tasks: HashMap<String, (Target, AbortHandle)>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    /// Starts the thread (named `llmlb-scraper`), with no targets yet.
    pub fn start(settings: Settings) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("llmlb-scraper".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_background();
            })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.timeout));
        let client = {
            let _entered = handle.enter();
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_max_idle_per_host(1)
                .build(connector)
        };
        Ok(Self {
            settings,
            runtime: handle,
            client,
            shared: Arc::new(Shared {
                outcomes: Mutex::new(VecDeque::new()),
                capacity: Mutex::new(QUEUE_PER_TARGET),
            }),
            tasks: HashMap::new(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Scrapes exactly these targets from now on: new ones start at once, removed ones stop,
    /// one whose URL or engine changed starts over.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let wanted: HashMap<String, Target> = targets
            .into_iter()
            .map(|t| (t.address.clone(), t))
            .collect();
        self.tasks.retain(|address, (current, task)| {
            let keep = wanted.get(address) == Some(current);
            if !keep {
                task.abort();
            }
            keep
        });
        for (address, target) in wanted {
            if self.tasks.contains_key(&address) {
                continue;
            }
            let task = self.runtime.spawn(scrape_loop(
                self.client.clone(),
                target.clone(),
                self.settings,
                Arc::clone(&self.shared),
            ));
            self.tasks.insert(address, (target, task.abort_handle()));
        }
        *self
            .shared
            .capacity
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = QUEUE_PER_TARGET * self.tasks.len().max(1);
    }

    /// The addresses being scraped.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Every outcome since the last drain, oldest first.
    pub fn drain(&self) -> Vec<Outcome> {
        let mut outcomes = self
            .shared
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        outcomes.drain(..).collect()
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn scrape_loop(client: HttpClient, target: Target, settings: Settings, shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut engine = target.engine;
    loop {
        ticks.tick().await;
        let result = scrape(&client, &target.url, engine, settings).await;
        if let Ok((detected, _)) = &result {
            engine = engine.or(Some(*detected));
        }
        shared.push(Outcome {
            address: target.address.clone(),
            result,
        });
    }
}

/// One GET and parse of `url`.
pub async fn scrape(
    client: &HttpClient,
    url: &str,
    engine: Option<Engine>,
    settings: Settings,
) -> Result<(Engine, EngineMetrics), Failure> {
    let page = match tokio::time::timeout(settings.timeout, fetch(client, url, settings)).await {
        Ok(page) => page?,
        Err(_) => return Err(Failure::Timeout),
    };
    parse_engine_metrics(&page, engine).map_err(|e| Failure::Parse(e.to_string()))
}

async fn fetch(client: &HttpClient, url: &str, settings: Settings) -> Result<Bytes, Failure> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Failure::Connect(format!("bad metrics URL {url:?}: {e}")))?;
    let reply = client
        .get(uri)
        .await
        .map_err(|e| Failure::Connect(describe(&e)))?;
    if reply.status() != hyper::StatusCode::OK {
        return Err(Failure::HttpStatus(reply.status().as_u16()));
    }
    let body = Limited::new(reply.into_body(), settings.max_page_bytes);
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Failure::TooLarge(settings.max_page_bytes))
        }
        Err(e) => Err(Failure::Connect(describe(e.as_ref()))),
    }
}

/// An error with its causes, as one line ("client error (Connect): tcp connect error: ...").
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Drains until `pred` holds for an outcome or `within` passes (tests and tools).
    pub fn wait_for(
        scraper: &Scraper,
        within: Duration,
        mut pred: impl FnMut(&Outcome) -> bool,
    ) -> Vec<Outcome> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let batch = scraper.drain();
            let done = batch.iter().any(&mut pred);
            seen.extend(batch);
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    }

    const PAGE: &str = "# TYPE vllm:num_requests_waiting gauge\n\
        vllm:num_requests_waiting{model_name=\"m\"} 3\n\
        vllm:num_requests_running{model_name=\"m\"} 2\n\
        vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n";

    /// A keep-alive HTTP/1.1 server on 127.0.0.1 answering every request with `status` and
    /// `body` after `delay`; counts requests and connections.
    struct TestServer {
        address: String,
        requests: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
    }

    fn serve(status: u16, body: String, delay: Duration) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { return };
                stream.set_nodelay(true).unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let (r, body) = (Arc::clone(&r), body.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut pending = Vec::new();
                    for _ in 0..10_000 {
                        let Ok(n) = stream.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(delay);
                            let answer = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(answer.as_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        TestServer {
            address,
            requests,
            connections,
        }
    }

    fn settings(interval_ms: u64, timeout_ms: u64) -> Settings {
        Settings {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            max_page_bytes: 64 * 1024,
        }
    }

    fn target(server: &TestServer) -> Target {
        Target {
            address: server.address.clone(),
            url: format!("http://{}/metrics", server.address),
            engine: None,
        }
    }

    #[test]
    fn scrapes_every_interval_on_one_kept_alive_connection() {
        let server = serve(200, PAGE.into(), Duration::ZERO);
        let mut scraper = Scraper::start(settings(20, 500)).unwrap();
        scraper.set_targets(vec![target(&server)]);
        let mut ok = 0;
        let outcomes = wait_for(&scraper, Duration::from_secs(5), |o| {
            ok += usize::from(o.result.is_ok());
            ok >= 5
        });
        assert!(ok >= 5, "{outcomes:?}");
        let (engine, m) = outcomes[0].result.clone().unwrap();
        assert_eq!(engine, Engine::Vllm);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (Some(3.0), Some(2.0), Some(0.25))
        );
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failures_carry_their_reason() {
        let status = serve(500, "boom".into(), Duration::ZERO);
        let garbage = serve(200, "<html>not metrics</html>\n".into(), Duration::ZERO);
        let big = serve(200, "x".repeat(100 * 1024), Duration::ZERO);
        let slow = serve(200, PAGE.into(), Duration::from_millis(400));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut scraper = Scraper::start(settings(50, 150)).unwrap();
        let mut targets: Vec<Target> = [&status, &garbage, &big, &slow].map(target).into();
        targets.push(Target {
            address: refused.clone(),
            url: format!("http://{refused}/metrics"),
            engine: None,
        });
        scraper.set_targets(targets);
        let mut reasons: HashMap<String, &'static str> = HashMap::new();
        wait_for(&scraper, Duration::from_secs(5), |o| {
            if let Err(f) = &o.result {
                reasons.insert(o.address.clone(), f.reason());
            }
            reasons.len() == 5
        });
        assert_eq!(reasons[&status.address], "http_status");
        assert_eq!(reasons[&garbage.address], "parse");
        assert_eq!(reasons[&big.address], "too_large");
        assert_eq!(reasons[&slow.address], "timeout");
        assert_eq!(reasons[&refused], "connect");
    }

    #[test]
    fn a_slow_endpoint_delays_only_its_own_scrapes() {
        let fast = serve(200, PAGE.into(), Duration::ZERO);
        let slow = serve(200, PAGE.into(), Duration::from_millis(300));
        let mut scraper = Scraper::start(settings(20, 1000)).unwrap();
        scraper.set_targets(vec![target(&fast), target(&slow)]);
        std::thread::sleep(Duration::from_millis(700));
        let outcomes = scraper.drain();
        let count = |a: &str| outcomes.iter().filter(|o| o.address == a).count();
        assert!(count(&fast.address) >= 15, "{}", count(&fast.address));
        assert!(count(&slow.address) <= 3, "{}", count(&slow.address));
    }

    #[test]
    fn removed_targets_stop_and_the_queue_is_bounded() {
        let server = serve(200, PAGE.into(), Duration::ZERO);
        let mut scraper = Scraper::start(settings(5, 500)).unwrap();
        scraper.set_targets(vec![target(&server)]);
        std::thread::sleep(Duration::from_millis(300));
        assert!(scraper.drain().len() <= QUEUE_PER_TARGET);
        scraper.set_targets(vec![]);
        assert_eq!(scraper.targets().count(), 0);
        std::thread::sleep(Duration::from_millis(50));
        let before = server.requests.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(server.requests.load(Ordering::SeqCst), before);
    }
}
