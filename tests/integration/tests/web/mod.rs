//! What the web UI tests share: a real stack (nats-server, the engine with the local backend and its web
//! UI on a random loopback port), a raw HTTP client (so tests can send what an attacker would), and a
//! headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/install-test-deps`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use taskpods_client::{Client, ClientConfig};
use taskpods_engine::gateway::GatewayConfig;
use taskpods_engine::http::HttpConfig;
use taskpods_engine::server::Engine;
use taskpods_events::{LaunchTask, TaskId};
use taskpods_harness::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The output cap the test engine hands its agents (small, so a truncated task is quick).
pub const OUTPUT_CAP: u64 = 1 << 20;

/// nats-server, the engine (local backend) and its web UI.
pub struct Stack {
    pub server: NatsServer,
    pub state: common::StateDir,
    pub engine: Option<Engine>,
    pub client: Client,
    pub addr: SocketAddr,
}

impl Stack {
    pub async fn start(http: HttpConfig) -> Self {
        let server = NatsServer::start();
        let state = common::StateDir::new();
        // The shared local engine, with its web UI on a random port and a small output cap.
        let mut config = common::local_engine(&server, state.path());
        config.gateway = GatewayConfig {
            heartbeat_interval: Duration::from_millis(500),
            output_cap_bytes: OUTPUT_CAP,
            ..GatewayConfig::default()
        };
        config.http = Some(HttpConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            status_interval: Duration::from_millis(500),
            ..http
        });
        let engine = Engine::start(config).await.expect("engine");
        let addr = engine
            .ui_url()
            .expect("the UI is served")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let client = Client::new(server.connect().await, ClientConfig::default());
        Self {
            server,
            state,
            engine: Some(engine),
            client,
            addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn launch(&self, script: &str, timeout_secs: u32) -> TaskId {
        self.launch_with(LaunchTask {
            timeout_secs: Some(timeout_secs),
            ..LaunchTask::script(script)
        })
        .await
    }

    /// Launches over NATS and waits until the views show the task (read-your-writes).
    pub async fn launch_with(&self, launch: LaunchTask) -> TaskId {
        let launched = self.client.launch(launch).await.expect("launch");
        self.client
            .view(launched.task_id, launched.sequence, Duration::from_secs(20))
            .await
            .expect("the views show the task");
        launched.task_id
    }

    /// Waits until the task has ended and the views show it; returns `{"task": <its view>}`.
    pub async fn ended(&self, task: TaskId, within: Duration) -> Value {
        let until = tokio::time::Instant::now() + within;
        loop {
            let snapshot = self.client.get(task).await.expect("the task's events");
            if snapshot.task.state.is_terminal() {
                let view = self
                    .client
                    .view(task, snapshot.last_sequence, Duration::from_secs(20))
                    .await
                    .expect("the views show the end");
                return serde_json::json!({ "task": view });
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {task} has not ended within {within:?}: {:?}",
                snapshot.task.state
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What [`FILES_SCRIPT`] leaves in `/tmp/out`, in path order: a copy of its binary input, an empty file,
/// a nested text file, and a file whose name (a quote, a space, a non-ASCII letter) and contents (script)
/// are hostile.
pub const FILES_ARTIFACTS: [&str; 4] = [
    "copy.bin",
    "empty.dat",
    "sub/dir/report.txt",
    "we\"ird é.html",
];
/// The script of [`Stack::files_task`].
pub const FILES_SCRIPT: &str = "cp /tmp/in/data.bin /tmp/out/copy.bin && : > /tmp/out/empty.dat && \
     mkdir -p /tmp/out/sub/dir && echo 'report line' > /tmp/out/sub/dir/report.txt && \
     printf '<script>window.__pwned=9</script>' > '/tmp/out/we\"ird é.html'";
/// The bytes of [`FILES_ARTIFACTS`]`[3]`.
pub const HOSTILE_HTML: &str = "<script>window.__pwned=9</script>";

/// A finished task with files (see [`Stack::files_task`]).
pub struct FilesTask {
    pub task: TaskId,
    /// The bytes of its input `data.bin` (and of its artifact `copy.bin`).
    pub input: Vec<u8>,
}

impl Stack {
    /// Puts a 300 KiB binary input `data.bin` (every byte value), launches [`FILES_SCRIPT`] with it and
    /// waits until it has succeeded.
    pub async fn files_task(&self) -> FilesTask {
        let input: Vec<u8> = (0..300 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let task = TaskId::mint();
        let put = self
            .client
            .put_input(task, "data.bin", &mut &input[..])
            .await
            .expect("put the input");
        self.launch_with(LaunchTask {
            task_id: Some(task.0),
            inputs: vec![put],
            timeout_secs: Some(60),
            ..LaunchTask::script(FILES_SCRIPT)
        })
        .await;
        let end = self.ended(task, Duration::from_secs(60)).await;
        assert_eq!(end["task"]["state"], "succeeded", "{end}");
        FilesTask { task, input }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.abort();
        }
    }
}

/// A raw HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends one request exactly as written (any method, headers and `Host`), reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("the answer within 30 s")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

/// `GET path` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let answer = request(addr, "GET", path, &[], b"").await;
    (answer.status, answer.json())
}

/// Headless Chromium under chromedriver, with a fresh profile; both are killed on drop.
pub struct Browser {
    driver: Child,
    _profile: tempfile::TempDir,
    pub client: fantoccini::Client,
}

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

impl Browser {
    pub async fn start(width: u32, height: u32) -> Self {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "{CHROMEDRIVER} and {CHROMIUM} are needed: run scripts/install-test-deps"
        );
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--enable-precise-memory-info",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "no WebDriver session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        client
            .set_window_size(width, height)
            .await
            .expect("window size");
        Self {
            driver,
            _profile: profile,
            client,
        }
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("script runs")
    }

    /// Waits until `script` returns something truthy; returns it.
    pub async fn until(&self, what: &str, within: Duration, script: &str) -> Value {
        let end = tokio::time::Instant::now() + within;
        loop {
            let value = self.js(script).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the page did not show {what} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the element with `id`.
    pub async fn text(&self, id: &str) -> String {
        let value = self
            .js(&format!(
                "const e = document.getElementById({id:?}); return e ? e.textContent : null;"
            ))
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    /// The text of the first element matching the CSS `selector`.
    pub async fn text_of(&self, selector: &str) -> String {
        let value = self
            .js(&format!(
                "const e = document.querySelector({selector:?}); return e ? e.textContent : null;"
            ))
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigates");
    }

    /// Saves a PNG screenshot of the window.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).unwrap();
    }

    /// Memory of the browser's processes, in bytes: the proportional set size (shared pages divided among
    /// the processes sharing them) summed over chromedriver's process tree.
    pub fn resident_bytes(&self) -> u64 {
        let mut total = 0;
        let mut parents = vec![self.driver.id()];
        while let Some(parent) = parents.pop() {
            for child in children_of(parent) {
                total += pss_of(child);
                parents.push(child);
            }
        }
        total
    }
}

/// The children of `pid`, whichever of its threads started them.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn pss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's processes outlive chromedriver: end the whole tree we started, by process id.
        let mut tree = Vec::new();
        let mut parents = vec![self.driver.id()];
        while let Some(parent) = parents.pop() {
            for child in children_of(parent) {
                tree.push(child);
                parents.push(child);
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        if !tree.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(tree.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Where screenshots go: `docs/` of the repository.
pub fn docs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

/// Reads server-sent events from `path` until `enough` says so (or `within` passes); returns
/// `(event name, data)` pairs in order.
pub async fn sse(
    addr: SocketAddr,
    path: &str,
    within: Duration,
    enough: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let end = tokio::time::Instant::now() + within;
    let (mut raw, mut body, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let mut in_body = false;
    let mut buf = [0u8; 65536];
    loop {
        if enough(&events) {
            return events;
        }
        let n = match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return events,
        };
        raw.extend_from_slice(&buf[..n]);
        if !in_body {
            let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..split]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
            raw.drain(..split + 4);
            in_body = true;
        }
        // Take every complete chunk of the chunked body.
        while let Some(line) = raw.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line]).trim(), 16)
                .unwrap_or(0);
            if raw.len() < line + 2 + size + 2 {
                break;
            }
            body.extend_from_slice(&raw[line + 2..line + 2 + size]);
            raw.drain(..line + 2 + size + 2);
        }
        while let Some(split) = body.windows(2).position(|w| w == b"\n\n") {
            let text = String::from_utf8_lossy(&body[..split]).into_owned();
            body.drain(..split + 2);
            let (mut name, mut data) = (String::from("message"), String::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !data.is_empty() {
                events.push((
                    name,
                    serde_json::from_str(&data).unwrap_or(Value::String(data)),
                ));
            }
        }
    }
}

/// The views and the UI without an executor: nats-server, the topology, a real projector and the HTTP
/// server alone (as `taskpods ui` runs it). Tests write events (and output) straight to the streams, so
/// thousands of tasks take seconds.
pub struct ViewsOnly {
    pub server: NatsServer,
    pub js: async_nats::jetstream::Context,
    pub names: taskpods_events::Names,
    pub addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl ViewsOnly {
    pub async fn start() -> Self {
        let server = NatsServer::start();
        let nats = server.connect().await;
        let js = async_nats::jetstream::new(nats.clone());
        let topology = taskpods_engine::topology::TopologyConfig::default();
        taskpods_engine::topology::ensure(&js, &topology)
            .await
            .expect("topology");
        let names = topology.names.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let projector = taskpods_projections::ProjectorConfig {
            names: names.clone(),
            ..taskpods_projections::ProjectorConfig::default()
        };
        tokio::spawn({
            let (js, stop) = (js.clone(), stop.clone());
            async move {
                let stats = std::sync::Arc::new(taskpods_projections::ProjectorStats::default());
                let _ = taskpods_projections::projector::run(js, projector, stats, stop).await;
            }
        });
        let http = taskpods_engine::http::HttpServer::bind(HttpConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            status_interval: Duration::from_millis(500),
            ..HttpConfig::default()
        })
        .await
        .expect("binds");
        let addr = http.local_addr();
        tokio::spawn({
            let (names, stop) = (names.clone(), stop.clone());
            async move { http.run(nats, names, None, stop).await.expect("serves") }
        });
        Self {
            server,
            js,
            names,
            addr,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Appends `events` (each task's in order) and waits until the projector has folded them all.
    pub async fn publish(&self, events: &[(u64, taskpods_events::Event)]) {
        let last = taskpods_projections::generate::publish(&self.js, &self.names, events, 512)
            .await
            .expect("events appended");
        let until = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let lag = taskpods_projections::lag(&self.js, &self.names)
                .await
                .expect("lag");
            if lag.applied_seq >= last {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "projector behind: {lag:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes `lines` lines of output for `task` in the agent's chunk format, then the end marker.
    pub async fn write_output(&self, task: TaskId, lines: usize) {
        let mut text = String::new();
        let mut seq = 0u64;
        let mut acks = Vec::new();
        for i in 1..=lines {
            text.push_str(&format!(
                "line {i}: the quick brown fox jumps over the lazy dog\n"
            ));
            if text.len() >= 32 << 10 || i == lines {
                acks.push(
                    self.chunk(task, seq, "stdout", std::mem::take(&mut text))
                        .await,
                );
                seq += 1;
            }
        }
        acks.push(self.chunk(task, seq, "end", String::new()).await);
        for ack in acks {
            ack.await.expect("output stored");
        }
    }

    async fn chunk(
        &self,
        task: TaskId,
        seq: u64,
        kind: &str,
        text: String,
    ) -> async_nats::jetstream::context::PublishAckFuture {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{task}:log:{seq}").as_str());
        headers.insert("Taskpods-Log-Seq", seq.to_string().as_str());
        headers.insert("Taskpods-Log-Kind", kind);
        self.js
            .publish_with_headers(self.names.log(task), headers, text.into())
            .await
            .expect("publish")
    }
}

impl Drop for ViewsOnly {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The events of a synthetic task that runs from `at` (accepted, scheduled, started, running, a
/// progress report) and, with `end`, ends one second later that way.
pub fn synthetic_task(
    task: TaskId,
    spec: taskpods_events::TaskSpec,
    at: chrono::DateTime<chrono::Utc>,
    end: Option<taskpods_events::EventBody>,
) -> Vec<(u64, taskpods_events::Event)> {
    use taskpods_events::{Event, EventBody};
    let ms = chrono::TimeDelta::milliseconds;
    let mut bodies = vec![
        (
            ms(0),
            EventBody::Accepted {
                spec,
                deadline: at + chrono::TimeDelta::hours(2),
            },
        ),
        (
            ms(100),
            EventBody::Scheduled {
                job: task.job_name(),
            },
        ),
        (
            ms(200),
            EventBody::Started {
                pod: format!("{}-pod", task.job_name()),
                node: Some("node-a".into()),
            },
        ),
        (ms(300), EventBody::Running),
        (
            ms(400),
            EventBody::Progress {
                message: "working".into(),
                percent: Some(40.0),
            },
        ),
    ];
    if let Some(end) = end {
        bodies.push((ms(1000), end));
    }
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, (offset, body))| (i as u64, Event::new(task, i as u64, at + offset, body)))
        .collect()
}
