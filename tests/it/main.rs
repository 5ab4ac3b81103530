//! Integration tests against the real PostgreSQL and RabbitMQ.
//!
//! One test binary (one link, shared helpers). Every test makes its own
//! source and destination databases and its own broker prefix through
//! [`helpers::TestEnv`], and removes them when it ends, pass or fail, so
//! tests run in parallel and in any order. Server addresses come from
//! `SYNCFLEET_TEST_PG_URL` and `SYNCFLEET_TEST_AMQP_URL` (defaults: the
//! local servers). Set `TEST_LOG=1` to see the components' logs.

mod bad_input;
mod chaos;
mod demo;
mod helpers;
mod incremental;
mod operations;
mod pipeline;
mod planning;
mod protection;
mod reliability;
mod replica;
mod tls;
mod types;
