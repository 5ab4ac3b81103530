//! Exchange and queue names under one prefix, and their declaration.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::BrokerError;
use crate::management::Management;

/// Redeliveries before the broker dead-letters a job by itself. It catches
/// messages that kill their worker every time (poison messages): ordinary
/// failures are settled by the worker long before.
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

    /// The fleet's name: every exchange and queue starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// Also the routing key of work messages.
    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub fn delay_exchange(&self) -> String {
        format!("{}.delay", self.prefix)
    }

    /// Where a job waits after failing attempt `attempt`, or, as "attempt"
    /// [`OUTAGE_QUEUE`], a job waiting out an outage (which uses up no
    /// attempt, whatever number its header holds). A message expires only
    /// at a queue's head, so each queue holds delays of one schedule: a
    /// job parked for half a second while a database restarts must not
    /// wait behind a retry's minute, and the number of queues does not
    /// grow with the attempt numbers that jobs' headers carry.
    pub fn delay_queue(&self, attempt: u32) -> String {
        format!("{}.delay.{attempt}", self.prefix)
    }

    /// Where upstream services publish change events (topic, any routing key).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn events_queue(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The queues `status` reports on.
    pub fn queues(&self) -> Vec<String> {
        vec![self.work_queue(), self.events_queue(), self.dead_queue()]
    }

    /// Declares exchanges, the work and dead-letter queues, and their
    /// bindings. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (self.dead_exchange(), ExchangeKind::Fanout),
            (self.work_exchange(), ExchangeKind::Direct),
            (self.delay_exchange(), ExchangeKind::Direct),
            (self.events_exchange(), ExchangeKind::Topic),
        ] {
            channel
                .exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        let dead_args = quorum(None);
        self.queue(
            channel,
            &self.dead_queue(),
            dead_args,
            &self.dead_exchange(),
            "",
        )
        .await?;
        // Events: any routing key (the README suggests the table name).
        let events_args = quorum(Some(&self.dead_exchange()));
        self.queue(
            channel,
            &self.events_queue(),
            events_args,
            &self.events_exchange(),
            "#",
        )
        .await?;
        let mut work_args = quorum(Some(&self.dead_exchange()));
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        self.queue(
            channel,
            &self.work_queue(),
            work_args,
            &self.work_exchange(),
            &self.work_queue(),
        )
        .await
    }

    /// Declares the delay queue for `attempt`: each message carries its own
    /// expiration, and when it expires the broker moves it back to the work
    /// queue. A quorum queue with at-least-once dead-lettering, so that the
    /// move survives a broker restart. A classic queue dead-letters at most
    /// once, and drops a job that expires while the node stops or before
    /// the work queue is back: 106 of 200 jobs in a test that restarts the
    /// node while they wait (`jobs_waiting_for_a_retry_survive_a_broker_restart`),
    /// where these drop none.
    pub async fn declare_delay(&self, channel: &Channel, attempt: u32) -> Result<(), BrokerError> {
        let mut args = quorum(Some(&self.work_exchange()));
        args.insert("x-dead-letter-routing-key".into(), text(&self.work_queue()));
        self.queue(
            channel,
            &self.delay_queue(attempt),
            args,
            &self.delay_exchange(),
            &attempt.to_string(),
        )
        .await
    }

    async fn queue(
        &self,
        channel: &Channel,
        name: &str,
        args: FieldTable,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel.queue_declare(name.into(), options, args).await?;
        channel
            .queue_bind(
                name.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Ready messages and consumers of a queue, by a passive declare (which
    /// closes the channel if the queue does not exist).
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

    /// [`Topology::depth`] of each of the fleet's queues, `None` for one not
    /// declared yet; each on a channel of its own, since a passive declare
    /// of a missing queue closes its channel.
    pub async fn depths(
        &self,
        connection: &lapin::Connection,
    ) -> Result<Vec<(String, Option<(u32, u32)>)>, BrokerError> {
        let mut depths = Vec::new();
        for queue in self.queues() {
            let channel = connection.create_channel().await?;
            let depth = self.depth(&channel, &queue).await.ok();
            if depth.is_some() {
                let _ = channel.close(200, "".into()).await;
            }
            depths.push((queue, depth));
        }
        Ok(depths)
    }

    /// Sets the queue gauges of the work, events and dead-letter queues
    /// from the management API: ready, unacked and consumers. Every queue's
    /// counts, or none set and the first error.
    async fn report_from_management(
        &self,
        management: &Management,
        vhost: &str,
    ) -> Result<(), String> {
        use syncfleet_core::metrics as m;
        let mut counts = Vec::new();
        for queue in self.queues() {
            let c = management
                .queue_counts(vhost, &queue)
                .await
                .map_err(|e| format!("queue {queue}: {e}"))?;
            counts.push((queue, c));
        }
        for (queue, c) in counts {
            for (state, value) in [("ready", c.ready), ("unacked", c.unacked)] {
                metrics::gauge!(m::QUEUE_MESSAGES, "queue" => queue.clone(), "state" => state)
                    .set(value as f64);
            }
            metrics::gauge!(m::QUEUE_CONSUMERS, "queue" => queue).set(c.consumers as f64);
        }
        Ok(())
    }

    /// The same without the management API: ready and consumers, by a
    /// passive declare.
    async fn report_from_declares(&self, connection: &lapin::Connection) {
        use syncfleet_core::metrics as m;
        let Ok(depths) = self.depths(connection).await else {
            return;
        };
        for (queue, depth) in depths {
            if let Some((ready, consumers)) = depth {
                metrics::gauge!(m::QUEUE_MESSAGES, "queue" => queue.clone(), "state" => "ready")
                    .set(f64::from(ready));
                metrics::gauge!(m::QUEUE_CONSUMERS, "queue" => queue).set(f64::from(consumers));
            }
        }
    }

    /// Deletes every queue (delay queues up to `max_attempts`) and exchange
    /// under the prefix: tests and the demo's reset.
    pub async fn delete(&self, channel: &Channel, max_attempts: u32) -> Result<(), BrokerError> {
        let delays = (OUTAGE_QUEUE..=max_attempts).map(|a| self.delay_queue(a));
        for q in self.queues().into_iter().chain(delays) {
            channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        for e in [
            self.work_exchange(),
            self.delay_exchange(),
            self.events_exchange(),
            self.dead_exchange(),
        ] {
            channel
                .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// The delay queue of jobs waiting out an outage: `P.delay.0`, below every
/// attempt.
pub const OUTAGE_QUEUE: u32 = 0;

/// A quorum queue's arguments, dead-lettering at least once to
/// `dead_letter_to` when there is one (which needs reject-publish
/// overflow).
fn quorum(dead_letter_to: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    if let Some(exchange) = dead_letter_to {
        args.insert("x-dead-letter-exchange".into(), text(exchange));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
    }
    args
}

pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Reports the queue gauges every few seconds: from the management API
/// when its URL is configured (ready and unacked), else, or while it does
/// not answer, by passive declares over a connection of its own, opened
/// again when it is lost. A management API that stopped answering (a
/// password changed, its statistics off) must not freeze the gauges the
/// alerts read.
pub struct DepthGauges {
    topology: Topology,
    connection: Option<lapin::Connection>,
    /// Made at the first report and again after one that got no queue's
    /// counts: loading the system's CAs for HTTPS at every report would
    /// cost milliseconds each time, and renewed TLS files are read once
    /// the old ones stop working.
    management: Option<Management>,
    /// Whether the management API failed last time (warned once per
    /// streak, not every 5 s).
    failing: bool,
}

impl DepthGauges {
    pub fn new(topology: Topology) -> Self {
        Self {
            topology,
            connection: None,
            management: None,
            failing: false,
        }
    }

    /// Sets the queue gauges: from the management API when its URL is
    /// configured and it answers, else by passive declares.
    pub async fn report(&mut self, config: &syncfleet_core::config::BrokerConfig) {
        if let Some(url) = &config.management_url {
            match self.report_managed(url, config).await {
                Ok(()) => {
                    if std::mem::take(&mut self.failing) {
                        tracing::info!("queue gauges from the management API again");
                    }
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!(
                            error = %e,
                            "no queue counts from the management API; reporting ready messages \
                             and consumers by passive declares until it answers"
                        );
                    }
                    self.management = None;
                }
            }
        }
        if self
            .connection
            .as_ref()
            .is_none_or(|c| !c.status().connected())
        {
            self.connection = crate::connect(config, "gauges").await.ok();
        }
        if let Some(c) = &self.connection {
            self.topology.report_from_declares(c).await;
        }
    }

    async fn report_managed(
        &mut self,
        url: &syncfleet_core::secret::SecretUrl,
        config: &syncfleet_core::config::BrokerConfig,
    ) -> Result<(), String> {
        if self.management.is_none() {
            self.management = Some(Management::new(url, &config.tls)?);
        }
        let management = self.management.as_ref().expect("made above");
        let vhost = crate::management::vhost(config.url.expose());
        self.topology
            .report_from_management(management, &vhost)
            .await
    }

    pub async fn close(self) {
        if let Some(c) = self.connection {
            let _ = c.close(200, "stopping".into()).await;
        }
    }
}
