//! The RabbitMQ side of syncfleet: connecting, the queue topology, and
//! publishing jobs so that a publish returns only once the broker has them.
//!
//! Topology, for prefix `P`:
//!
//! ```text
//! producer ──▶ P.work (direct exchange) ──▶ P.work (quorum queue) ──▶ workers
//!                                               │ rejected, or redelivered
//!                                               │ past the delivery limit
//!                                               ▼
//!                     P.dead (fanout exchange) ──▶ P.dead (quorum queue)
//! ```
//!
//! Quorum queues are replicated and durable; messages are persistent and
//! confirmed; dead-lettering is at-least-once, so a job is never dropped on
//! its way to the dead-letter queue.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use syncfleet_core::config::BrokerConfig;
use syncfleet_core::job::Job;

/// A broker operation that failed. Every variant is worth retrying later:
/// the broker or the network is the problem, not the job.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused job {0} (publisher confirm was a nack)")]
    Nacked(String),
    #[error("the broker could not route job {0}: is the topology declared?")]
    Unroutable(String),
    #[error("the broker did not confirm published jobs within {0:?}")]
    ConfirmTimeout(Duration),
}

/// Redeliveries before the broker dead-letters a job by itself. It catches
/// messages that crash their worker every time (poison messages); ordinary
/// failures are handled by the worker long before.
pub const DELIVERY_LIMIT: i64 = 20;

/// The names of everything syncfleet declares under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn queues(&self) -> Vec<String> {
        vec![self.work_queue(), self.dead_queue()]
    }

    pub fn exchanges(&self) -> Vec<String> {
        vec![self.work_exchange(), self.dead_exchange()]
    }

    /// Declares exchanges, queues and bindings. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.dead_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.work_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;

        let queue_options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(self.dead_queue().into(), queue_options, dead_args)
            .await?;
        channel
            .queue_bind(
                self.dead_queue().into(),
                self.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        channel
            .queue_declare(
                self.work_queue().into(),
                queue_options,
                self.work_queue_args(),
            )
            .await?;
        channel
            .queue_bind(
                self.work_queue().into(),
                self.work_exchange().into(),
                self.work_queue().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    fn work_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_exchange()),
        );
        // At-least-once dead-lettering needs reject-publish overflow.
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args
    }

    /// Ready messages and consumers of a queue, by a passive declare.
    pub async fn depth(&self, channel: &Channel, queue: &str) -> Result<(u32, u32), BrokerError> {
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((q.message_count(), q.consumer_count()))
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Connects to the broker within the configured timeout. Errors name the
/// broker without its password.
pub async fn connect(config: &BrokerConfig, name: &str) -> Result<Connection, BrokerError> {
    let url = config.url.redacted();
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("syncfleet-{name}")));
    match tokio::time::timeout(
        config.connect_timeout,
        Connection::connect(config.url.expose(), properties),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(BrokerError::Connect {
            url,
            detail: syncfleet_core::secret::redact(&e.to_string()),
        }),
        Err(_) => Err(BrokerError::Connect {
            url,
            detail: format!("no answer within {:?}", config.connect_timeout),
        }),
    }
}

/// Publishes jobs as persistent messages and waits for the broker's
/// confirms: once [`Publisher::publish`] returns, every job is stored in
/// the work queue.
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

/// How long to wait for the broker to confirm one chunk of publishes.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

impl Publisher {
    /// Opens a confirm-mode channel and declares the topology.
    pub async fn open(connection: &Connection, topology: Topology) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, topology })
    }

    /// Publishes all jobs, then awaits all their confirms: pipelined, so a
    /// chunk costs about one round trip, not one per job.
    pub async fn publish(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(job.id().into());
            let confirm = self
                .channel
                .basic_publish(
                    self.topology.work_exchange().into(),
                    self.topology.work_queue().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &job.encode(),
                    properties,
                )
                .await?;
            pending.push((job.id(), confirm));
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

    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

impl Topology {
    /// Deletes every queue and exchange under the prefix (tests, demo reset).
    pub async fn delete(&self, channel: &Channel) -> Result<(), BrokerError> {
        for q in self.queues() {
            channel
                .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                .await?;
        }
        for e in self.exchanges() {
            channel
                .exchange_delete(e.into(), lapin::options::ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}
