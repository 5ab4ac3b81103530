//! Confirmed publishing that survives a broker restart.
//!
//! A publish returns `Ok` only after the broker confirmed every message, so
//! the caller may then ack, record or forget. When the connection is gone,
//! the publisher reconnects with backoff (for a bounded time), declares the
//! topology again and publishes the whole chunk again: a message confirmed
//! before the failure may be stored twice, which is harmless because
//! executing a job is idempotent.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use syncfleet_core::backoff::RetryPolicy;
use syncfleet_core::config::BrokerConfig;
use syncfleet_core::job::Job;
use tokio::sync::Mutex;

use crate::headers::Meta;
use crate::topology::OUTAGE_QUEUE;
use crate::{BrokerError, Topology, connect};

/// How long to wait for the broker to confirm one chunk of publishes.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to keep reconnecting before a publish gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(90);
/// Bound on the broker's other answers: opening a channel, declaring,
/// writing to a socket the broker has stopped reading (a memory or disk
/// alarm blocks publishers), closing.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_BACKOFF: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(5),
    max_attempts: u32::MAX,
};

/// One message to publish.
struct Outgoing {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

struct Session {
    connection: Connection,
    /// A confirm-mode channel.
    channel: Channel,
    /// Delay queues declared on this connection.
    delay_queues: HashSet<u32>,
}

/// Publishes to the work, delay and dead-letter exchanges.
pub struct Publisher {
    config: BrokerConfig,
    name: String,
    topology: Topology,
    session: Mutex<Option<Session>>,
}

impl Publisher {
    /// Connects and declares the topology. This first connection fails
    /// fast, so a wrong URL is reported at once; later failures reconnect.
    pub async fn connect(config: &BrokerConfig, name: &str) -> Result<Self, BrokerError> {
        let publisher = Self {
            config: config.clone(),
            name: name.to_string(),
            topology: Topology::new(&config.prefix),
            session: Mutex::new(None),
        };
        *publisher.session.lock().await = Some(publisher.open().await?);
        Ok(publisher)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    async fn open(&self) -> Result<Session, BrokerError> {
        let connection = connect(&self.config, &self.name).await?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Session {
            connection,
            channel,
            delay_queues: HashSet::new(),
        })
    }

    /// Publishes jobs to the work queue as first attempts.
    pub async fn publish_jobs(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        self.publish_jobs_as(jobs, FieldTable::default()).await
    }

    /// Publishes jobs to the work queue with `headers` (the halves of a
    /// split job, as its attempt).
    pub async fn publish_jobs_as(
        &self,
        jobs: &[Job],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let messages = jobs
            .iter()
            .map(|job| Outgoing {
                exchange: self.topology.work_exchange(),
                routing_key: self.topology.work_queue(),
                body: job.encode(),
                properties: properties(&job.id(), headers.clone()),
            })
            .collect();
        self.send(messages, None).await
    }

    /// Re-publishes a job body to the work queue with `headers` (a replay).
    pub async fn publish_work(
        &self,
        body: &[u8],
        message_id: &str,
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let message = Outgoing {
            exchange: self.topology.work_exchange(),
            routing_key: self.topology.work_queue(),
            body: body.to_vec(),
            properties: properties(message_id, headers),
        };
        self.send(vec![message], None).await
    }

    /// Re-publishes an upstream event to the events exchange (a replay).
    pub async fn publish_event(&self, body: &[u8], message_id: &str) -> Result<(), BrokerError> {
        let message = Outgoing {
            exchange: self.topology.events_exchange(),
            routing_key: "replay".into(),
            body: body.to_vec(),
            properties: properties(message_id, FieldTable::default()),
        };
        self.send(vec![message], None).await
    }

    /// Parks a job that failed attempt `meta.attempt` for `delay`, after
    /// which the broker moves it back to the work queue: as the next
    /// attempt, or as the same one again when `counts` is false (the job
    /// never got a fair try, say because a database was down), from the
    /// outage's own delay queue (see [`Topology::delay_queue`]).
    pub async fn publish_retry(
        &self,
        body: &[u8],
        message_id: &str,
        meta: Meta,
        delay: Duration,
        counts: bool,
    ) -> Result<(), BrokerError> {
        let now = crate::headers::now_ms();
        let (headers, queue) = match counts {
            true => (meta.next(now), meta.attempt),
            false => (meta.again(now), OUTAGE_QUEUE),
        };
        let message = Outgoing {
            exchange: self.topology.delay_exchange(),
            routing_key: queue.to_string(),
            body: body.to_vec(),
            // The broker reads the expiration as whole milliseconds; at
            // least 1 so that zero does not mean "never expires".
            properties: properties(message_id, headers)
                .with_expiration(delay.as_millis().max(1).to_string().into()),
        };
        self.send(vec![message], Some(queue)).await
    }

    /// Sends a message to the dead-letter queue with `headers` saying why.
    pub async fn publish_dead(
        &self,
        body: &[u8],
        message_id: &str,
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let message = Outgoing {
            exchange: self.topology.dead_exchange(),
            routing_key: String::new(),
            body: body.to_vec(),
            properties: properties(message_id, headers),
        };
        self.send(vec![message], None).await
    }

    /// Publishes and awaits every confirm, reconnecting (bounded) on failure.
    async fn send(
        &self,
        messages: Vec<Outgoing>,
        delay_queue: Option<u32>,
    ) -> Result<(), BrokerError> {
        let mut session = self.session.lock().await;
        let started = Instant::now();
        let mut failures = 0u32;
        // Connecting has its own timeout, confirms theirs: this bounds the
        // whole attempt, so that a stalled step ends in a reconnect too.
        let attempt_timeout = self.config.connect_timeout + CONFIRM_TIMEOUT + ANSWER_TIMEOUT;
        loop {
            let attempt = async {
                if session.is_none() {
                    *session = Some(self.open().await?);
                    tracing::info!(publisher = %self.name, "broker connection restored");
                }
                let s = session.as_mut().expect("session was just opened");
                if let Some(attempt) = delay_queue
                    && s.delay_queues.insert(attempt)
                {
                    self.topology.declare_delay(&s.channel, attempt).await?;
                }
                publish_all(&s.channel, &messages).await
            };
            let result = tokio::time::timeout(attempt_timeout, attempt)
                .await
                .unwrap_or(Err(BrokerError::Stalled(attempt_timeout)));
            match result {
                Ok(()) => return Ok(()),
                // A nack is the broker, up and well, refusing the message
                // (a full queue, say): reconnecting would not change that.
                Err(e @ BrokerError::Nacked(_)) => return Err(e),
                Err(e) if started.elapsed() >= RECONNECT_FOR => {
                    // Not kept for the next caller to find broken.
                    if let Some(old) = session.take() {
                        close_within(&old.connection, "giving up").await;
                    }
                    return Err(e);
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(publisher = %self.name, error = %e, "publish failed; reconnecting to the broker");
                    }
                    failures += 1;
                    if let Some(old) = session.take() {
                        close_within(&old.connection, "reconnecting").await;
                    }
                    tokio::time::sleep(RECONNECT_BACKOFF.delay(failures)).await;
                }
            }
        }
    }

    /// Closes the connection (best effort).
    pub async fn close(&self) {
        if let Some(s) = self.session.lock().await.take() {
            close_within(&s.connection, "closing").await;
        }
    }
}

/// Closes a connection, waiting for the broker's close-ok at most
/// [`ANSWER_TIMEOUT`]: a blocked or vanished broker may never send it.
async fn close_within(connection: &Connection, why: &str) {
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, connection.close(200, why.into())).await;
}

fn properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_headers(headers)
}

/// Publishes every message, then awaits their confirms: pipelined, so a
/// chunk costs about one round trip, not one per message.
async fn publish_all(channel: &Channel, messages: &[Outgoing]) -> Result<(), BrokerError> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let confirm = channel
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.body,
                m.properties.clone(),
            )
            .await?;
        let id = m
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        pending.push((id, confirm));
    }
    let confirm_all = async {
        for (id, confirm) in pending {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => return Err(BrokerError::Unroutable(id)),
                Confirmation::Nack(_) | Confirmation::NotRequested => {
                    return Err(BrokerError::Nacked(id));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, confirm_all)
        .await
        .unwrap_or(Err(BrokerError::ConfirmTimeout(CONFIRM_TIMEOUT)))
}
