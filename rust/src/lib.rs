//! llmlb core: OpenAI request parsing (incremental, with body decoding), chained prefix
//! hashing, the embedded picking state and the picking pipeline. Plain Rust; the optional
//! `python` feature adds the PyO3 bindings.

pub mod affinity;
pub mod backlog;
pub mod balancer;
pub mod body_decode;
pub mod decision_record;
pub mod engine_metrics;
pub mod ext_proc_wire;
pub mod extproc_server;
pub mod fd_wait;
pub mod pb_struct;
pub mod prefix_hash;
pub mod prefix_table;
pub mod request;
pub mod scheduling;
pub mod scraper;
pub mod shared;
pub mod worker_state;

#[cfg(feature = "python")]
mod bindings;
