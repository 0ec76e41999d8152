//! Random task histories for tests and benchmarks: each history is what `decide` produces for a random
//! sequence of inputs (so it is a valid log), and [`publish`] appends them to the event stream the way
//! the event store does (`Nats-Msg-Id`, `Taskpods-Kind`), many publishes in flight, tasks interleaved.
//!
//! Deterministic for a seed (a small xorshift generator: no dependency, same histories on every machine).

use async_nats::jetstream;
use chrono::{DateTime, TimeDelta, Utc};
use taskpods_events::codec;
use taskpods_events::{
    CancelTask, Event, FailureReason, Input, Mode, Names, Problem, Resources, Task, TaskId,
    TaskOutcome, TaskSpec, decide, evolve, stamp,
};

/// A tiny deterministic random generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; seed 0 is replaced by a fixed non-zero value.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A launch spec for generated tasks.
pub fn spec(i: u64) -> TaskSpec {
    TaskSpec {
        image: format!("ghcr.io/example/toolbox-{}:1", i % 3),
        toolbox: Some(format!("toolbox-{}", i % 3)),
        mode: Mode::Script,
        instructions: "echo hello".into(),
        env: Default::default(),
        secret_env: Default::default(),
        timeout_secs: 600,
        resources: Resources {
            cpu_request_millis: 250,
            cpu_limit_millis: 1000,
            memory_request_bytes: 256 << 20,
            memory_limit_bytes: 512 << 20,
        },
        labels: [("suite".to_owned(), "generated".to_owned())].into(),
        requester: Some("brain-test".into()),
        idempotency_key: None,
        inputs: Vec::new(),
        files: Default::default(),
    }
}

fn outcome(rng: &mut Rng, exit_code: i32) -> TaskOutcome {
    TaskOutcome {
        exit_code,
        duration_ms: rng.below(60_000),
        stdout_bytes: rng.below(1 << 20),
        stderr_bytes: rng.below(4096),
        output_truncated: rng.chance(5),
        result: rng
            .chance(30)
            .then(|| serde_json::json!({"answer": rng.below(100)})),
        output_tail: rng
            .chance(50)
            .then(|| format!("line {}\n", rng.below(1000))),
        ..TaskOutcome::default()
    }
}

fn random_input(rng: &mut Rng, task: TaskId, now: DateTime<Utc>, live: &Task) -> Input {
    match rng.below(100) {
        0..=14 => Input::JobCreated {
            job: task.job_name(),
        },
        15..=29 => Input::PodBound {
            job: task.job_name(),
            pod: format!("{}-pod", task.job_name()),
            node: rng.chance(50).then(|| "node-a".to_owned()),
        },
        30..=44 => Input::AgentHello,
        45..=59 => Input::AgentProgress {
            message: format!("step {}", rng.below(10)),
            percent: rng.chance(70).then(|| (rng.below(101)) as f32),
        },
        60..=71 => {
            let code = if rng.chance(70) {
                0
            } else {
                1 + rng.below(3) as i32
            };
            Input::AgentResult(outcome(rng, code))
        }
        72..=75 => Input::Cancel(CancelTask {
            task_id: task.0,
            reason: Some("no longer needed".into()),
            requester: Some("brain-test".into()),
        }),
        76..=79 => Input::BackendFailed {
            reason: [
                FailureReason::OomKilled,
                FailureReason::Evicted,
                FailureReason::ImagePull,
                FailureReason::DeadlineExceeded,
            ][rng.below(4) as usize],
            message: Some("the backend said so".into()),
        },
        80..=82 => Input::PodExited {
            exit_code: rng.below(3) as i32,
        },
        83..=85 => Input::JobGone,
        86..=88 => Input::DeadlineReached {
            now: live.deadline.unwrap_or(now) + TimeDelta::seconds(1),
        },
        89..=91 => Input::HeartbeatLost,
        92..=94 => Input::StartupTimedOut {
            reason: FailureReason::Unschedulable,
            message: None,
        },
        _ => Input::Reaped,
    }
}

/// One random valid history of up to about `max_steps` inputs, starting at `start`.
pub fn history(rng: &mut Rng, task: TaskId, start: DateTime<Utc>, max_steps: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let mut live = Task::default();
    let mut now = start;
    let launch = if rng.chance(5) {
        Err(vec![Problem {
            field: "image".into(),
            message: "not an allowed toolbox".into(),
        }])
    } else {
        Ok(spec(rng.below(1000)))
    };
    let mut inputs = vec![Input::Launch {
        spec: launch,
        at: now,
    }];
    let steps = 1 + rng.below(max_steps.max(1));
    for _ in 0..steps {
        inputs.push(random_input(rng, task, now, &live));
    }
    for input in inputs {
        now += TimeDelta::milliseconds(1 + rng.below(2000) as i64);
        let Ok(bodies) = decide(&live, &input) else {
            continue;
        };
        for e in stamp(task, &live, now, bodies) {
            live = evolve(live, &e);
            events.push(e);
        }
    }
    // Most finished tasks get reaped, as the executor does.
    if live.state.is_terminal()
        && !live.reaped
        && rng.chance(70)
        && let Ok(bodies) = decide(&live, &Input::Reaped)
    {
        now += TimeDelta::milliseconds(500);
        events.extend(stamp(task, &live, now, bodies));
    }
    events
}

/// `count` random histories with ids derived from `seed`, all starting near `start`.
pub fn histories(seed: u64, count: u64, start: DateTime<Utc>, max_steps: u64) -> Vec<Vec<Event>> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| {
            let task = TaskId::from_idempotency_key(&format!("generated-{seed}-{i}"));
            let offset = TimeDelta::milliseconds(rng.below(60_000) as i64);
            history(&mut rng, task, start + offset, max_steps)
        })
        .collect()
}

/// Interleaves histories the way concurrent tasks write: a random task's next event each time, each
/// task's own events in order. Returns `(position, event)` pairs.
pub fn interleave(rng: &mut Rng, histories: &[Vec<Event>]) -> Vec<(u64, Event)> {
    let mut cursors: Vec<usize> = vec![0; histories.len()];
    let mut live: Vec<usize> = (0..histories.len())
        .filter(|&i| !histories[i].is_empty())
        .collect();
    let mut out = Vec::with_capacity(histories.iter().map(Vec::len).sum());
    while !live.is_empty() {
        let pick = rng.below(live.len() as u64) as usize;
        let i = live[pick];
        out.push((cursors[i] as u64, histories[i][cursors[i]].clone()));
        cursors[i] += 1;
        if cursors[i] == histories[i].len() {
            live.swap_remove(pick);
        }
    }
    out
}

/// Appends `events` in order, `window` publishes in flight; returns the last stream sequence.
pub async fn publish(
    js: &jetstream::Context,
    names: &Names,
    events: &[(u64, Event)],
    window: usize,
) -> Result<u64, async_nats::Error> {
    let mut last = 0;
    for chunk in events.chunks(window.max(1)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (position, event) in chunk {
            let payload = codec::encode_event(event)?;
            acks.push(
                js.publish_with_headers(
                    names.events(event.task),
                    crate::log::headers(event, *position),
                    payload.into(),
                )
                .await?,
            );
        }
        for ack in acks {
            last = last.max(ack.await?.sequence);
        }
    }
    Ok(last)
}

/// The payload a newer engine would write for an event of a kind this build does not know (`kind`, with
/// fields of its own), for tests of forward compatibility.
pub fn future_event(
    task: TaskId,
    position: u64,
    at: DateTime<Utc>,
    kind: &str,
) -> Result<Vec<u8>, codec::CodecError> {
    #[derive(serde::Serialize)]
    struct Future<'a, I> {
        v: u16,
        id: I,
        task: TaskId,
        at: DateTime<Utc>,
        kind: &'a str,
        volume: &'a str,
        bytes: u64,
    }
    codec::to_msgpack(&Future {
        v: 2,
        id: task.event_id(position),
        task,
        at,
        kind,
        volume: "vol-1",
        bytes: 42,
    })
}

/// Reads the event stream from sequence 1 to `last` with an ordered consumer, doing nothing with the
/// messages: the raw read every projection figure is compared with. Returns how many were read.
pub async fn read_raw(
    js: &jetstream::Context,
    names: &Names,
    last: u64,
) -> Result<u64, async_nats::Error> {
    let stream = js.get_stream(names.event_stream()).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: names.events_all(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = 0u64;
    while let Some(m) = futures::StreamExt::next(&mut messages).await {
        let m = m?;
        read += 1;
        if m.info()?.stream_sequence >= last {
            break;
        }
    }
    Ok(read)
}
