//! What hostile code inside a task does with credentials it found: run inside a task pod (the node
//! simulator gives pods this file as `/usr/local/bin/taskpods-nats-attack`), it connects with the given
//! credentials and tries every attack on another task and on the engine's state, then its own work.
//!
//! Usage: `taskpods-nats-attack URL CREDS_FILE OWN_TASK OTHER_TASK`. One line per attempt:
//! `REFUSED <publish|subscription> <subject> :: <the server's error>` when the server sends its permission
//! error within 5 s, else `NOT-REFUSED <subject>`; then `OWN-WORK stored` (or `OWN-WORK failed: …`) for a
//! progress report of its own task, published through JetStream and acknowledged. Exits 0 once all ran.

use std::time::Duration;

use taskpods_events::{AgentReport, Names, TaskId};
use tokio::sync::mpsc;

/// Waits for the server's permission error for `action` on `subject`.
async fn refusal(
    errors: &mut mpsc::UnboundedReceiver<String>,
    action: &str,
    subject: &str,
) -> Option<String> {
    let wanted = format!("permissions violation for {action} to \"{subject}\"").to_lowercase();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(error)) if error.to_lowercase().contains(&wanted) => return Some(error),
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

fn report(action: &str, subject: &str, refused: Option<String>) {
    match refused {
        Some(error) => println!("REFUSED {action} {subject} :: {error}"),
        None => println!("NOT-REFUSED {subject}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, creds, mine, theirs] = args.as_slice() else {
        return Err("usage: taskpods-nats-attack URL CREDS_FILE OWN_TASK OTHER_TASK".into());
    };
    let (mine, theirs): (TaskId, TaskId) = (mine.parse()?, theirs.parse()?);
    let names = Names::default();
    let (tx, mut errors) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_credentials_file(creds)
        .await?
        .custom_inbox_prefix(taskpods_events::subject::task_inbox_prefix(mine))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url.as_str())
        .await?;

    // Read another task's instructions, and listen to every reply.
    let hello = names.agent_hello(theirs);
    client
        .publish_with_reply(hello.clone(), "_INBOX_x.y", "".into())
        .await?;
    report(
        "publish",
        &hello,
        refusal(&mut errors, "publish", &hello).await,
    );
    let _all = client.subscribe("_INBOX.>").await?;
    report(
        "subscription",
        "_INBOX.>",
        refusal(&mut errors, "subscription", "_INBOX.>").await,
    );
    for subject in taskpods_integration::attacked_subjects(&names, theirs) {
        client.publish(subject.clone(), "x".into()).await?;
        report(
            "publish",
            &subject,
            refusal(&mut errors, "publish", &subject).await,
        );
    }

    // Its own work: a progress report of its own, stored (acknowledged on its own inbox).
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{mine}:progress:own-work"));
    let payload = taskpods_events::codec::to_msgpack(&AgentReport::Progress {
        message: "own work".into(),
        percent: Some(50.0),
    })?;
    let stored = match js
        .publish_with_headers(
            names.agent_report(mine, "progress"),
            headers,
            payload.into(),
        )
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => println!("OWN-WORK stored"),
        Err(e) => println!("OWN-WORK failed: {e}"),
    }
    client.flush().await?;
    Ok(())
}
