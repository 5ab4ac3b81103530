//! The RabbitMQ side of syncfleet: connecting, the queue topology, and
//! publishing so that a publish returns only once the broker has the
//! message.
//!
//! Topology, for prefix `P`:
//!
//! ```text
//! producer ─▶ P.work (direct) ─▶ P.work (quorum queue) ─▶ workers
//!                 ▲                    │ redelivered past the delivery
//!                 │ TTL expired        │ limit (a poison message)
//!   worker ─▶ P.delay (direct) ─▶ P.delay.N (quorum, one per attempt N)
//!                                      ▼
//!   worker ─▶ P.dead (fanout) ─▶ P.dead (quorum queue)  ◀─ syncfleet dead-letters
//! ```
//!
//! - [`topology`]: the names and their declaration.
//! - [`headers`]: what a message carries besides the job: its attempt
//!   number, and on a dead letter the error, attempts and timestamps.
//! - [`publish`]: confirmed publishing, reconnecting when the broker went
//!   away.
//! - [`management`]: queue depths from the management API.
//! - `tls`: the broker's TLS, from the files an `amqps://` URL names.
//!
//! Quorum queues are replicated and durable; messages are persistent and
//! confirmed; the broker's own dead-lettering is at-least-once.

pub mod headers;
pub mod management;
pub mod publish;
mod tls;
pub mod topology;

use std::time::Duration;

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use syncfleet_core::config::BrokerConfig;

pub use headers::{DeadLetter, Meta};
pub use publish::Publisher;
pub use topology::{DELIVERY_LIMIT, DepthGauges, OUTAGE_QUEUE, Topology};

/// A broker operation that failed. Every variant is worth retrying later:
/// the broker or the network is the problem, not the job.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused message {0} (publisher confirm was a nack)")]
    Nacked(String),
    #[error("the broker could not route message {0}: is the topology declared?")]
    Unroutable(String),
    #[error("the broker did not confirm published messages within {0:?}")]
    ConfirmTimeout(Duration),
    #[error(
        "the broker did not answer within {0:?} (a memory or disk alarm blocks publishers, or it is unreachable)"
    )]
    Stalled(Duration),
}

/// Whether lapin reads `url` as an AMQP URL (a port, a `heartbeat`, …),
/// or what is wrong with it, without its password.
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<lapin::uri::AMQPUri>().map(|_| ()).map_err(|e| {
        format!(
            "expected amqp[s]://user:password@host:port/vhost?option=value, \
                 with a numeric port and option values: {}",
            syncfleet_core::secret::redact(&e)
        )
    })
}

/// Connects to the broker within the configured timeout. Errors name the
/// broker without its password. The connection is named `PREFIX/ROLE` (for
/// example `syncfleet/worker`) so operators can tell deployments apart.
pub async fn connect(config: &BrokerConfig, name: &str) -> Result<Connection, BrokerError> {
    let url = config.url.redacted();
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("{}/{name}", config.prefix)));
    let failed = |detail: String| BrokerError::Connect {
        url: url.clone(),
        detail,
    };
    let builder = DefaultConnectionBuilder::new()
        .map_err(|e| failed(e.to_string()))?
        .with_uri_str(config.url.expose().to_string())
        .with_properties(properties)
        .with_tls_config(tls::amqp(&config.tls).map_err(failed)?);
    match tokio::time::timeout(config.connect_timeout, builder.connect()).await {
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
