//! The engine's replies to this client's commands, on one wildcard subscription per client.
//!
//! Subscribing an inbox per command costs the server a subscription and an unsubscription (and a change
//! of its interest graph) for every launch and cancel. Instead the client subscribes once, lazily, to
//! `<inbox>.*` (under the connection's inbox prefix, so the permissions a Brain has for its inbox still
//! cover it), and each command asks for its reply at `<inbox>.<n>`. One task hands each reply to the
//! command waiting for it; a reply nobody waits for (its command timed out) is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::Message;
use futures::StreamExt;
use tokio::sync::{OnceCell, oneshot};

/// Commands waiting for their reply, by the last token of their reply subject.
type Waiting = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Message>>>>>;

/// The shared reply subscription of one client (and its clones).
#[derive(Debug)]
pub(crate) struct Replies {
    nats: async_nats::Client,
    inbox: OnceCell<Inbox>,
}

/// The subscription, once made.
#[derive(Debug)]
struct Inbox {
    /// `<inbox prefix>.<unique>`; replies come to `<prefix>.<n>`.
    prefix: String,
    next: AtomicU64,
    /// `None` once the subscription ended (the connection was closed): no reply can come any more.
    waiting: Waiting,
    /// The task that hands replies out; aborting it drops (unsubscribes) the subscription.
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// A command's place in line for its reply; leaving it (reply taken, timeout, cancelled) frees it.
pub(crate) struct Pending {
    /// Where the engine is asked to reply.
    pub subject: String,
    id: u64,
    waiting: Waiting,
    reply: oneshot::Receiver<Message>,
}

impl Pending {
    /// The reply, or `None` when the subscription ended first.
    pub async fn reply(&mut self) -> Option<Message> {
        (&mut self.reply).await.ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(waiting) = lock(&self.waiting).as_mut() {
            waiting.remove(&self.id);
        }
    }
}

fn lock(
    waiting: &Waiting,
) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Message>>>> {
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Replies {
    pub(crate) fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            inbox: OnceCell::new(),
        }
    }

    /// A new reply subject, registered before the command that names it is published (the
    /// subscription itself is made by the first command: the server has it before any command of this
    /// connection). `None` when the subscription has ended.
    pub(crate) async fn pending(&self) -> Result<Option<Pending>, async_nats::SubscribeError> {
        let inbox = self.inbox.get_or_try_init(|| self.subscribe()).await?;
        let id = inbox.next.fetch_add(1, Ordering::Relaxed);
        let (tx, reply) = oneshot::channel();
        match lock(&inbox.waiting).as_mut() {
            Some(waiting) => waiting.insert(id, tx),
            None => return Ok(None),
        };
        Ok(Some(Pending {
            subject: format!("{}.{id}", inbox.prefix),
            id,
            waiting: inbox.waiting.clone(),
            reply,
        }))
    }

    async fn subscribe(&self) -> Result<Inbox, async_nats::SubscribeError> {
        let prefix = self.nats.new_inbox();
        let mut replies = self.nats.subscribe(format!("{prefix}.*")).await?;
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let dispatcher = tokio::spawn({
            let (waiting, prefix) = (waiting.clone(), prefix.clone());
            async move {
                while let Some(message) = replies.next().await {
                    let id = message
                        .subject
                        .as_str()
                        .strip_prefix(prefix.as_str())
                        .and_then(|rest| rest.strip_prefix('.'))
                        .and_then(|id| id.parse::<u64>().ok());
                    let waiter = id.and_then(|id| lock(&waiting).as_mut()?.remove(&id));
                    if let Some(waiter) = waiter {
                        // The command may have given up meanwhile; then the reply is not wanted.
                        let _ = waiter.send(message);
                    }
                }
                // The connection was closed: whoever waits learns it now, later commands at once.
                lock(&waiting).take();
            }
        });
        Ok(Inbox {
            prefix,
            next: AtomicU64::new(0),
            waiting,
            dispatcher,
        })
    }
}
