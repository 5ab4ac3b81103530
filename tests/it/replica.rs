//! Reads from a standby (`source.replica_url`), against a private primary
//! and its streaming standbys: a job is read only once the standby has
//! replayed the changes it was made after, and describes its stream
//! only then; and never from a standby behind the one its stream's last
//! job read.

use std::sync::Arc;
use std::time::Duration;

use syncfleet_chaos::postgres::PrivatePostgres;
use syncfleet_core::Config;
use syncfleet_core::job::{Job, NO_RUN, Selection};

use crate::helpers::{Fleet, TestEnv, connect};

/// Row `id`'s value, if the table and the row are there.
async fn value(client: &tokio_postgres::Client, id: i32) -> Option<String> {
    client
        .query_opt("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reading_a_standby_waits_until_it_has_the_changes_its_job_was_made_after() {
    let env = TestEnv::new().await;
    let (primary, standby) = tokio::task::block_in_place(|| {
        let primary = PrivatePostgres::start(&env.dir).unwrap();
        let standby = PrivatePostgres::standby_of(&primary, &env.dir).unwrap();
        (primary, standby)
    });
    let on_primary = connect(&primary.url("postgres")).await;
    let on_standby = connect(&standby.url("postgres")).await;
    on_primary
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'old' FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    env.eventually("the standby to have the table", 30, || async {
        value(&on_standby, 42).await.as_deref() == Some("old")
    })
    .await;
    env.migrate().await;
    let text = env
        .config_text_with(
            &format!("replica_url = \"{}\"\n", standby.url("postgres")),
            "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 50\n",
        )
        .replace(&env.source_url, &primary.url("postgres"));
    let config = Arc::new(Config::load(&env.write("replica.toml", &text)).unwrap());
    let fleet = Fleet::start(&config, 1);
    let first = env.plan(&config).await;
    env.wait(first.run_id).await;
    assert_eq!(value(&env.dest, 42).await.as_deref(), Some("old"));

    // The standby stops replaying; the primary changes a row, then a run
    // is planned on the primary.
    on_standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    on_primary
        .batch_execute("UPDATE items SET v = 'new' WHERE id = 42")
        .await
        .unwrap();
    let second = env.plan(&config).await;
    env.delivered().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(value(&on_standby, 42).await.as_deref(), Some("old"));
    let status: String = env
        .dest
        .query_one(
            "SELECT status FROM syncfleet.runs WHERE id = $1",
            &[&second.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "running",
        "the run finished from a standby that lacks the change"
    );

    on_standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    env.wait(second.run_id).await;
    assert_eq!(value(&env.dest, 42).await.as_deref(), Some("new"));

    // A column added (on both sides) while the standby lags: the run's
    // jobs describe the stream only once the standby has it.
    on_standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    on_primary
        .batch_execute("ALTER TABLE items ADD COLUMN w text DEFAULT 'w'")
        .await
        .unwrap();
    env.dest
        .batch_execute("ALTER TABLE items ADD COLUMN w text")
        .await
        .unwrap();
    let third = env.plan(&config).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    on_standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    env.wait(third.run_id).await;
    let w: Option<String> = env
        .dest
        .query_one("SELECT w FROM items WHERE id = 42", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(w.as_deref(), Some("w"), "the new column was copied");
    fleet.stop().await;
}

/// Behind a load balancer over several standbys, a job can reach a standby
/// that has replayed less than the one an earlier job of the same rows
/// read. Here the two standbys are two workers' `replica_url`s: a job made
/// before a change, delivered late (after a retry's delay, say), reaches
/// the standby without the change after a run has copied the change from
/// the other. It waits for its standby to catch up rather than putting the
/// old row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_reads_a_standby_behind_the_one_its_streams_last_job_read() {
    late_job_through_a_lagging_standby(false).await;
}

/// The same when the earlier job's read reached the primary (a reader
/// endpoint may route there): how far it read is the primary's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_reads_a_standby_behind_the_primary_its_streams_last_job_read() {
    late_job_through_a_lagging_standby(true).await;
}

async fn late_job_through_a_lagging_standby(first_read_on_the_primary: bool) {
    let env = TestEnv::new().await;
    let (primary, ahead, behind) = tokio::task::block_in_place(|| {
        let primary = PrivatePostgres::start(&env.dir).unwrap();
        let ahead = (!first_read_on_the_primary)
            .then(|| PrivatePostgres::standby_of(&primary, &env.dir.join("ahead")).unwrap());
        let behind = PrivatePostgres::standby_of(&primary, &env.dir.join("behind")).unwrap();
        (primary, ahead, behind)
    });
    let on_primary = connect(&primary.url("postgres")).await;
    let on_behind = connect(&behind.url("postgres")).await;
    on_primary
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'old' FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    let made_at: String = on_primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // Paused past where the late job was made, so that only how far the
    // run read can hold it back.
    env.eventually("the lagging standby to replay the table", 30, || async {
        on_behind
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&made_at],
            )
            .await
            .is_ok_and(|r| r.get::<_, Option<bool>>(0) == Some(true))
    })
    .await;
    on_behind
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    on_primary
        .batch_execute("UPDATE items SET v = 'new' WHERE id = 42")
        .await
        .unwrap();
    env.migrate().await;
    let config_for = |standby: &PrivatePostgres, file: &str| {
        let text = env
            .config_text_with(
                &format!("replica_url = \"{}\"\n", standby.url("postgres")),
                "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 50\ndeadline = \"4s\"\n",
            )
            .replace(&env.source_url, &primary.url("postgres"))
            // A standby's lag uses up no attempt: one would dead-letter it.
            .replace("[jobs]\n", "[jobs]\nmax_attempts = 1\n");
        Arc::new(Config::load(&env.write(file, &text)).unwrap())
    };
    let (through_ahead, through_behind) = (
        config_for(ahead.as_ref().unwrap_or(&primary), "ahead.toml"),
        config_for(&behind, "behind.toml"),
    );

    // A run through the standby (or the primary) that has the change.
    let fleet = Fleet::start(&through_ahead, 1);
    let run = env.plan(&through_ahead).await;
    env.wait(run.run_id).await;
    fleet.stop().await;
    assert_eq!(value(&env.dest, 42).await.as_deref(), Some("new"));
    env.dest
        .batch_execute("UPDATE items SET v = 'changed here' WHERE id = 43")
        .await
        .unwrap();

    // The late job, for rows 42 and 43, through the standby that has
    // replayed as far as the job was made, not as far as the run read.
    let late = Job::selection(
        NO_RUN,
        "items",
        1,
        Selection {
            columns: vec!["id".into()],
            values: vec![vec!["42".into()], vec!["43".into()]],
        },
    )
    .at(Some(made_at.parse().unwrap()));
    env.publish_raw(&late.encode(), &late.id()).await;
    let fleet = Fleet::start(&through_behind, 1);
    env.delivered().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        value(&env.dest, 42).await.as_deref(),
        Some("new"),
        "a job read a standby behind the run's and put the old row back"
    );
    assert_eq!(
        value(&env.dest, 43).await.as_deref(),
        Some("changed here"),
        "the late job ran without its standby catching up"
    );
    on_behind
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    env.eventually(
        "the late job done once its standby caught up",
        60,
        || async { value(&env.dest, 43).await.as_deref() == Some("old") },
    )
    .await;
    assert_eq!(value(&env.dest, 42).await.as_deref(), Some("new"));
    assert_eq!(env.dead_letters().await, 0);
    fleet.stop().await;
}
