//! The chaos harness, short form: the same scenario as `just chaos` on
//! fewer rows. A private RabbitMQ node is restarted, so the shared broker
//! and the other tests are not disturbed.

use std::time::Duration;

use crate::helpers::pg_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_and_doubles_nothing() {
    let options = syncfleet_chaos::Options {
        syncfleet: env!("CARGO_BIN_EXE_syncfleet").into(),
        pg_url: pg_url(),
        rows: 30_000,
        workers: 3,
        kill_every: Duration::from_secs(1),
        terminate_at: 0.15,
        restart_at: 0.4,
        batch_size: 50,
        timeout: Duration::from_secs(300),
        name: format!("sfchaos_test_{}", std::process::id()),
    };
    let report = syncfleet_chaos::run(&options).await.unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!((report.lost, report.duplicated), (0, 0));
}

/// A PostgreSQL restart in the middle of a run: the jobs wait for the
/// server without using up attempts, the pools drop dead connections, and
/// the run completes with nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_postgres_restart() {
    use crate::helpers::{Fleet, TestEnv, amqp_url, connect};

    let env = TestEnv::new().await; // for its broker prefix and cleanup
    let pg =
        tokio::task::block_in_place(|| syncfleet_chaos::postgres::PrivatePostgres::start(&env.dir))
            .unwrap();
    let admin = connect(&pg.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    admin
        .batch_execute("CREATE DATABASE reporting")
        .await
        .unwrap();
    connect(&pg.url("app"))
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, md5(i::text) FROM generate_series(1, 20000) i;",
        )
        .await
        .unwrap();
    let mut reporting = connect(&pg.url("reporting")).await;
    syncfleet_db::control::migrate(&mut reporting)
        .await
        .unwrap();
    let text = format!(
        "[source]\nurl = \"{}\"\nconnect_timeout = \"2s\"\nmax_rows_per_second = 4000\n[destination]\nurl = \"{}\"\nconnect_timeout = \"2s\"\n\
         [broker]\nurl = \"{}\"\nprefix = \"{}\"\n[jobs]\nretry_initial = \"100ms\"\nretry_max = \"500ms\"\n\
         [[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 25\n",
        pg.url("app"),
        pg.url("reporting"),
        amqp_url(),
        env.name
    );
    let config = std::sync::Arc::new(
        syncfleet_core::Config::load(&env.write("restart.toml", &text)).unwrap(),
    );
    let fleet = Fleet::start(&config, 2);
    let plan = env.plan(&config).await;

    let done = |client: tokio_postgres::Client| async move {
        client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'done') FROM syncfleet.batches WHERE run_id = $1",
                &[&plan.run_id],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    env.eventually("a tenth of the run", 60, || async {
        done(connect(&pg.url("reporting")).await).await > 80
    })
    .await;
    // Still going when the database goes down, or the test proves nothing.
    let before = done(connect(&pg.url("reporting")).await).await;
    let total: i64 = plan.batches.iter().map(|(_, n)| n).sum();
    assert!(
        before < total,
        "the run was done before the outage: {before} of {total}"
    );
    drop(reporting);
    tokio::task::block_in_place(|| {
        pg.down().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        pg.up().unwrap();
    });
    env.eventually("the run to succeed", 120, || async {
        let c = connect(&pg.url("reporting")).await;
        c.query_one(
            "SELECT status FROM syncfleet.runs WHERE id = $1",
            &[&plan.run_id],
        )
        .await
        .map(|r| r.get::<_, String>(0) == "succeeded")
        .unwrap_or(false)
    })
    .await;
    fleet.stop().await;
    assert_eq!(
        TestEnv::rows(&connect(&pg.url("app")).await, "SELECT * FROM items").await,
        TestEnv::rows(&connect(&pg.url("reporting")).await, "SELECT * FROM items").await
    );
    assert_eq!(env.dead_letters().await, 0);
}

/// Jobs parked for a retry survive a broker restart, and reach the work
/// queue even when their delay ran out while the node was stopping or
/// starting (a classic delay queue dead-letters at most once, and dropped
/// 106 of the 200 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_retry_survive_a_broker_restart() {
    use std::collections::HashSet;

    use futures_util::StreamExt;
    use syncfleet_broker::{Meta, Publisher, Topology};

    use crate::helpers::{TestEnv, amqp_url};

    const JOBS: u64 = 200;
    let env = TestEnv::new().await; // for its prefix and directory
    let broker = tokio::task::block_in_place(|| {
        syncfleet_chaos::broker::PrivateBroker::start(&env.dir, &format!("{}_delay", env.name))
    })
    .unwrap();
    let text = env.config_text("").replace(&amqp_url(), &broker.url());
    let config = syncfleet_core::Config::load(&env.write("delay.toml", &text)).unwrap();
    let publisher = Publisher::connect(&config.broker, "test").await.unwrap();
    // Delays from 1 s to 5 s: the first expire before the restart, the
    // rest while the node stops and boots.
    for i in 0..JOBS {
        let delay = Duration::from_millis(1000 + i * 20);
        publisher
            .publish_retry(b"{}", &format!("job-{i}"), Meta::first(), delay, true)
            .await
            .unwrap();
    }
    publisher.close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| broker.restart()).unwrap();

    // Every job comes back into the work queue, as its second attempt.
    let connection = lapin::Connection::connect(&broker.url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(&env.name);
    let mut consumer = channel
        .basic_consume(
            topology.work_queue().as_str().into(),
            "test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen = HashSet::new();
    while seen.len() < JOBS as usize {
        // The last delays end about 5 s after publishing.
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
        else {
            break;
        };
        let delivery = delivery.unwrap();
        assert_eq!(Meta::from_properties(&delivery.properties).attempt, 2);
        let id = delivery.properties.message_id().as_ref().unwrap();
        seen.insert(id.to_string());
    }
    let _ = connection.close(200, "".into()).await;
    assert_eq!(seen.len(), JOBS as usize, "jobs lost in the restart");
}

/// A batch that fails for good while the destination is down cannot be
/// recorded as failed there: it waits for the destination like any job,
/// and is recorded and dead-lettered once it is back, so its run ends
/// `failed` instead of staying `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_while_the_destination_is_down_is_recorded_once_it_is_back() {
    use syncfleet_broker::Topology;

    use crate::helpers::{Fleet, TestEnv, amqp_url, connect};

    let env = TestEnv::new().await;
    let pg =
        tokio::task::block_in_place(|| syncfleet_chaos::postgres::PrivatePostgres::start(&env.dir))
            .unwrap();
    connect(&pg.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE reporting")
        .await
        .unwrap();
    syncfleet_db::control::migrate(&mut connect(&pg.url("reporting")).await)
        .await
        .unwrap();
    env.source
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 20);")
        .await
        .unwrap();
    let text = env
        .config_text("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n")
        .replace(&env.dest_url, &pg.url("reporting"));
    let config =
        std::sync::Arc::new(syncfleet_core::Config::load(&env.write("down.toml", &text)).unwrap());
    let plan = env.plan(&config).await;

    // Hold the run's jobs back until the destination is down.
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(&env.name);
    let mut held = Vec::new();
    while let Some(m) = channel
        .basic_get(
            topology.work_queue().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let id = m.properties.message_id().as_ref().unwrap().to_string();
        held.push((m.delivery.data, id));
    }
    let _ = connection.close(200, "".into()).await;
    assert_eq!(held.len() as i64, plan.batches[0].1);
    let fleet = Fleet::start(&config, 1);
    env.eventually("the worker to consume", 30, || async {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let consumers = topology
            .depth(&channel, &topology.work_queue())
            .await
            .map_or(0, |(_, consumers)| consumers);
        let _ = connection.close(200, "".into()).await;
        consumers > 0
    })
    .await;

    // Every job now fails for good (its table is gone) while the
    // destination, which records that, is down.
    env.source.batch_execute("DROP TABLE items").await.unwrap();
    tokio::task::block_in_place(|| pg.down()).unwrap();
    for (body, id) in &held {
        env.publish_raw(body, id).await;
    }
    env.delivered().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.dead_letters().await, 0, "dead-lettered unrecorded");

    tokio::task::block_in_place(|| pg.up()).unwrap();
    env.eventually("the run to be failed", 60, || async {
        let reporting = connect(&pg.url("reporting")).await;
        syncfleet_db::control::run(&reporting, plan.run_id)
            .await
            .unwrap()
            .is_some_and(|r| r.status == "failed")
    })
    .await;
    env.eventually("every job dead-lettered", 30, || async {
        env.dead_letters().await as usize == held.len()
    })
    .await;
    fleet.stop().await;
}
