//! What the benchmarks share: the line describing the machine a figure came from, latency percentiles,
//! a process's memory from `/proc`, the raw JetStream publish rate every engine figure is compared with,
//! a progress line for long runs, and the Brain's client they drive the engine with ([`client`]).
//! Benchmarks print figures; nothing here asserts a timing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::join_all;

/// A Brain's client on `nats` that waits up to `reply_timeout` for each answer: what the benchmarks and
/// load tests drive the engine with (a machine under load answers slowly; it is not broken).
pub fn client(nats: async_nats::Client, reply_timeout: Duration) -> taskpods_client::Client {
    taskpods_client::Client::new(
        nats,
        taskpods_client::ClientConfig {
            reply_timeout,
            ..taskpods_client::ClientConfig::default()
        },
    )
}

/// The environment variable `name` parsed as a `T` (a bench's size or rate), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `nats-server <version> · <n> cores · load <1m> <5m> <15m>`: what every benchmark prints first, so a
/// figure is never read without the machine and the load it was measured under.
pub fn machine_line() -> String {
    format!(
        "nats-server {} · {} cores · load average {}",
        crate::nats_server_version(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average()
    )
}

/// The 1, 5 and 15 minute load averages as `/proc/loadavg` has them (`?` where it cannot be read).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".to_owned())
}

/// A sample of durations, summarised as percentiles.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    /// An empty sample.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one duration.
    pub fn record(&mut self, d: Duration) {
        self.samples.push(d);
    }

    /// How many durations were recorded.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `p` quantile (0.0 to 1.0), nearest rank; zero when empty.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        self.samples.sort_unstable();
        let rank = ((self.samples.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
        self.samples[rank]
    }

    /// `p50 x ms · p99 y ms · max z ms`.
    pub fn summary(&mut self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "p50 {:>7.2} ms · p99 {:>7.2} ms · max {:>7.2} ms",
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0))
        )
    }
}

/// A process's memory as `/proc/<pid>/status` reports it, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size (`VmRSS`).
    pub rss_kib: u64,
    /// Resident anonymous memory (`RssAnon`): the heap, allocator arenas and thread stacks, without the
    /// mapped binary; the closest `/proc` comes to "heap".
    pub anon_kib: u64,
}

impl Memory {
    /// The memory of process `pid` now; `None` when `/proc` cannot tell (the process is gone).
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        Some(Self {
            rss_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:")?,
        })
    }

    /// `RSS x MiB · anonymous y MiB`.
    pub fn summary(&self) -> String {
        format!(
            "RSS {:>6.1} MiB · anonymous (heap) {:>6.1} MiB",
            self.rss_kib as f64 / 1024.0,
            self.anon_kib as f64 / 1024.0
        )
    }
}

/// Publishes `n` messages of `size` bytes to a throwaway stream (`BENCH_RAW`, created here) with
/// `in_flight` publishes awaiting their acks at once; returns messages per second. The raw limit an
/// engine's durable appends are compared with.
pub async fn raw_publish_rate(
    js: &jetstream::Context,
    n: usize,
    size: usize,
    in_flight: usize,
) -> f64 {
    js.get_or_create_stream(jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        ..Default::default()
    })
    .await
    .expect("bench stream");
    let payload = bytes::Bytes::from(vec![7u8; size]);
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let started = Instant::now();
    join_all((0..n).map(|i| {
        let (js, payload, permits) = (js.clone(), payload.clone(), permits.clone());
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            js.publish(format!("bench.raw.{}", i % 1000), payload)
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    }))
    .await;
    n as f64 / started.elapsed().as_secs_f64()
}

/// A progress line on stderr for long runs: on a terminal rewritten in place at most twice a second
/// ([`Progress::finish`] clears it), into a log one line every five seconds.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    started: Instant,
    shown: Instant,
    terminal: bool,
}

impl Progress {
    /// Starts reporting `what`, `total` steps.
    pub fn new(what: impl Into<String>, total: u64) -> Self {
        let now = Instant::now();
        Self {
            what: what.into(),
            total,
            started: now,
            shown: now,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    /// Reports `done` of the total.
    pub fn update(&mut self, done: u64) {
        let every = if self.terminal { 500 } else { 5000 };
        if self.shown.elapsed() < Duration::from_millis(every) {
            return;
        }
        self.shown = Instant::now();
        let line = format!(
            "  {}: {done}/{} ({:.0} s)",
            self.what,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        if self.terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    /// Clears the line (on a terminal).
    pub fn finish(&self) {
        if self.terminal && self.started.elapsed() >= Duration::from_millis(500) {
            eprint!("\r{:width$}\r", "", width = self.what.len() + 40);
        }
    }
}
