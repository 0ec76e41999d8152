//! Authorization as deployed: nats-server in operator mode trusting `taskpods auth init` material. Each
//! identity can do its work, and what it must not do is refused by the server itself.

use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use taskpods_auth::{DEFAULT_MAX_PAYLOAD, Signer};
use taskpods_events::{Names, TaskId};
use taskpods_harness::NatsServer;
use tokio::sync::mpsc;

/// A connection that records the server's error messages (permission violations arrive that way).
async fn connect_recording(
    server: &NatsServer,
    creds: &str,
    inbox_prefix: Option<String>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut options = async_nats::ConnectOptions::with_credentials(creds)
        .expect("credentials")
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        });
    if let Some(prefix) = inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    let client = options.connect(server.url()).await.expect("connect");
    (client, rx)
}

/// Waits for the server's permission error naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, action: &str, subject: &str) {
    let wanted = format!("permissions violation for {action} to \"{subject}\"").to_lowercase();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(error)) if error.to_lowercase().contains(&wanted) => return,
            Ok(Some(other)) => eprintln!("server said: {other}"),
            _ => panic!("the server did not refuse: {wanted}"),
        }
    }
}

fn signer(server: &NatsServer) -> Signer {
    Signer::load(
        &server
            .auth_dir()
            .join(taskpods_auth::material::files::TASK_SIGNER),
    )
    .expect("signer")
}

#[tokio::test]
async fn a_minted_task_user_works_on_its_own_subjects_and_is_refused_elsewhere() {
    let server = NatsServer::start_secured();
    server.wait_for_jetstream().await;
    let names = Names::new("taskpods").expect("prefix");
    let admin = jetstream::new(server.connect().await);
    admin
        .create_stream(jetstream::stream::Config {
            name: names.log_stream(),
            subjects: vec![names.logs_all()],
            ..Default::default()
        })
        .await
        .expect("stream");

    let task = TaskId::mint();
    let other = TaskId::mint();
    let creds = signer(&server)
        .mint_task(
            task,
            &names,
            DEFAULT_MAX_PAYLOAD,
            Utc::now() + chrono::TimeDelta::minutes(5),
        )
        .expect("mint");
    let (client, mut errors) = connect_recording(
        &server,
        &creds.to_file(),
        Some(taskpods_auth::task_inbox_prefix(task)),
    )
    .await;
    let js = jetstream::new(client.clone());
    js.publish(names.log(task), "own output".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    client
        .publish(names.log(other), "forged".into())
        .await
        .expect("sent");
    refused(&mut errors, "publish", &names.log(other)).await;
    let _sub = client.subscribe("_INBOX.>").await.expect("sent");
    refused(&mut errors, "subscription", "_INBOX.>").await;
    let info = admin
        .get_stream(names.log_stream())
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(info, 1, "only the task's own output is stored");
}

#[tokio::test]
async fn an_expired_task_user_is_refused_at_connect() {
    let server = NatsServer::start_secured();
    let names = Names::new("taskpods").expect("prefix");
    let creds = signer(&server)
        .mint_task(
            TaskId::mint(),
            &names,
            DEFAULT_MAX_PAYLOAD,
            Utc::now() - chrono::TimeDelta::seconds(5),
        )
        .expect("mint");
    let refused = async_nats::ConnectOptions::with_credentials(&creds.to_file())
        .expect("credentials")
        .connect(server.url())
        .await
        .expect_err("an expired user must not connect");
    assert!(
        refused.to_string().to_lowercase().contains("authorization"),
        "{refused}"
    );
}
