//! Reliability: retries, deadlines, dead letters, drain and reconnects,
//! against the real broker and databases.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use syncfleet_broker::Topology;
use syncfleet_core::Config;
use syncfleet_core::job::{JOB_VERSION, Job, KeyRange, NO_RUN, Selection};
use syncfleet_db::control;
use syncfleet_producer::RunPlan;

use crate::helpers::{Fleet, TestEnv};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);
     INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 30) i;";

/// Moves every run's and batch's progress a day back: quiet since.
const A_DAY_AGO: &str = "UPDATE syncfleet.runs SET created_at = created_at - interval '1 day', \
     planned_at = planned_at - interval '1 day', finished_at = finished_at - interval '1 day'; \
     UPDATE syncfleet.batches SET finished_at = finished_at - interval '1 day'";

async fn run_status(env: &TestEnv, run_id: i64) -> control::RunSummary {
    control::run(&env.dest, run_id).await.unwrap().unwrap()
}

/// Plans a run of `config` and works it with one worker until a job of it
/// is dead-lettered.
async fn run_until_one_dead_letter(env: &TestEnv, config: &Arc<Config>) -> RunPlan {
    let fleet = Fleet::start(config, 1);
    let plan = env.plan(config).await;
    env.eventually("the dead letter", 60, || async {
        env.dead_letters().await == 1
    })
    .await;
    fleet.stop().await;
    plan
}

/// `items`, and a stream over it whose reads pass `slow_gate(id)`: once
/// `slow_flag` holds a row, the gate sleeps `seconds` on the rows where
/// `condition` (on `id`) holds. `stream_extra` goes in the stream's table.
async fn items_behind_a_slow_gate(
    env: &TestEnv,
    condition: &str,
    seconds: u32,
    stream_extra: &str,
) -> Arc<Config> {
    env.source
        .batch_execute(&format!(
            "{ITEMS}
             CREATE TABLE slow_flag (on_ boolean);
             CREATE FUNCTION slow_gate(id int) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
             BEGIN
               IF ({condition}) AND EXISTS (SELECT 1 FROM slow_flag) THEN PERFORM pg_sleep({seconds}); END IF;
               RETURN true;
             END $$;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    env.config(&format!(
        "[[stream]]\nname = \"items\"\nquery = \"SELECT id, v FROM items WHERE slow_gate(id)\"\n\
         key = [\"id\"]\nbatch_size = 100\n{stream_extra}"
    ))
}

/// Makes the destination's first `n` writes to `items` fail with SQLSTATE
/// `code`, counted by the sequence `failures` (a sequence is not rolled
/// back with the failed transaction).
async fn fail_first_writes(env: &TestEnv, n: i64, code: &str, message: &str) {
    env.dest
        .batch_execute(&format!(
            "CREATE SEQUENCE failures;
             CREATE FUNCTION failing() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF nextval('failures') <= {n} THEN
                 RAISE EXCEPTION '{message}' USING ERRCODE = '{code}';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER failing BEFORE INSERT ON items FOR EACH STATEMENT EXECUTE FUNCTION failing();"
        ))
        .await
        .unwrap();
}

/// Writes to `items` so far that [`fail_first_writes`] saw (refused or not).
async fn writes_seen(env: &TestEnv) -> i64 {
    env.dest
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM failures",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn batch_attempts(env: &TestEnv, run_id: i64) -> Vec<(i64, String, i32)> {
    env.dest
        .query(
            "SELECT batch_no, status, attempts FROM syncfleet.batches WHERE run_id = $1 ORDER BY batch_no",
            &[&run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_is_retried_until_it_succeeds() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    let plan = env.plan(&config).await;
    // The destination fails its first five writes with a serialization
    // failure: four tries in the worker, then a delayed retry through the
    // broker.
    fail_first_writes(&env, 5, "40001", "injected conflict").await;
    let fleet = Fleet::start(&config, 1);
    env.wait(plan.run_id).await;
    fleet.stop().await;
    assert_eq!(
        batch_attempts(&env, plan.run_id).await,
        vec![(1, "done".to_string(), 2)],
        "one failed delivery recorded, then success on the second"
    );
    assert_eq!(writes_seen(&env).await, 6);
    env.assert_same_rows("SELECT * FROM items").await;
    assert_eq!(env.dead_letters().await, 0);
}

/// A destination that cannot take writes for a while (switched over, its old
/// primary now a standby) is an outage: jobs wait for it without using up
/// attempts, rather than being dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_destination_is_waited_for_like_an_outage() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    let plan = env.plan(&config).await;
    fail_first_writes(&env, 10, "25006", "injected: read-only").await;
    let fleet = Fleet::start(&config, 1);
    env.wait(plan.run_id).await;
    fleet.stop().await;
    assert_eq!(
        batch_attempts(&env, plan.run_id).await,
        vec![(1, "done".to_string(), 1)],
        "no attempt used up"
    );
    env.assert_same_rows("SELECT * FROM items").await;
    assert_eq!(env.dead_letters().await, 0);
}

/// A job waiting out an outage waits in the outage's own delay queue, not
/// behind retries of its attempt's (a message expires only at a queue's
/// head), and not in one made for whatever attempt its header holds (set
/// by hand here, far past the last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_out_an_outage_waits_in_the_outage_delay_queue() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\n");
    env.sync(&config, 1).await;
    env.dest
        .batch_execute("DELETE FROM items WHERE id <= 2")
        .await
        .unwrap();
    fail_first_writes(&env, 5, "25006", "injected: read-only").await;
    let job = Job::selection(
        NO_RUN,
        "items",
        1,
        Selection {
            columns: vec!["id".into()],
            values: vec![vec!["1".into()], vec!["2".into()]],
        },
    );
    let connection = lapin::Connection::connect(&crate::helpers::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let topology = Topology::new(&env.name);
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-syncfleet-attempt".into(),
        lapin::types::AMQPValue::LongLongInt(1000),
    );
    channel
        .basic_publish(
            topology.work_exchange().into(),
            topology.work_queue().into(),
            Default::default(),
            &job.encode(),
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    env.eventually("the job, once the destination takes writes", 60, || async {
        TestEnv::rows(&env.source, "SELECT * FROM items").await
            == TestEnv::rows(&env.dest, "SELECT * FROM items").await
    })
    .await;
    fleet.stop().await;
    assert_eq!(env.dead_letters().await, 0);
    let outage = topology.delay_queue(syncfleet_broker::OUTAGE_QUEUE);
    assert!(topology.depth(&channel, &outage).await.is_ok());
    let mut made = Vec::new();
    for attempt in [1, config.jobs.retry.max_attempts, 1000] {
        let channel = connection.create_channel().await.unwrap();
        let queue = topology.delay_queue(attempt);
        if topology.depth(&channel, &queue).await.is_ok() {
            made.push(queue);
        }
    }
    let _ = connection.close(200, "".into()).await;
    assert!(made.is_empty(), "{made:?}");
}

/// A value of a unique index (not the key's) that moves from a row of one
/// batch to a row of another: the batch that writes the new row first
/// conflicts with the old row, which the other batch has not rewritten
/// yet. Retried, it succeeds once that batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_value_moving_between_batches_is_retried_not_failed() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE);
             INSERT INTO people SELECT i, 'p' || i FROM generate_series(1, 2000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // Batches of 1,000 rows run alone, never in one transaction together.
    env.config("[[stream]]\nname = \"people\"\ntable = \"people\"\nbatch_size = 1000\n");
    let config = env.patient();
    env.sync(&config, 1).await;
    env.dest
        .batch_execute("CREATE UNIQUE INDEX people_email ON people (email)")
        .await
        .unwrap();
    env.source
        .batch_execute(
            "UPDATE people SET email = 'moved' WHERE id = 1;
             UPDATE people SET email = 'p1' WHERE id = 1500;",
        )
        .await
        .unwrap();
    // The first batch waits behind a lock on its row, so the second
    // writes first.
    let mut holder = crate::helpers::connect(&env.dest_url).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("SELECT * FROM people WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let plan = env.plan(&config).await;
    let fleet = Fleet::start(&config, 1);
    env.eventually("the second batch's failed attempt recorded", 60, || async {
        batch_attempts(&env, plan.run_id)
            .await
            .iter()
            .any(|(b, _, attempts)| *b == 2 && *attempts >= 1)
    })
    .await;
    hold.rollback().await.unwrap();
    env.wait(plan.run_id).await;
    fleet.stop().await;
    env.assert_same_rows("SELECT * FROM people").await;
    assert_eq!(env.dead_letters().await, 0);
}

/// A job that fails past half its deadline, where a retry in the worker
/// could only be handed back untried for want of time to take a read
/// slot: its error counts, attempt after attempt, until it is
/// dead-lettered, rather than the job going round the queue for ever as
/// the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_late_in_its_deadline_uses_up_its_attempts() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\ndeadline = \"2s\"\n",
    );
    let plan = env.plan(&config).await;
    env.dest
        .batch_execute(
            "CREATE FUNCTION late() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               PERFORM pg_sleep(1.3);
               RAISE EXCEPTION 'injected: late conflict' USING ERRCODE = '40001';
             END $$;
             CREATE TRIGGER late BEFORE INSERT ON items FOR EACH STATEMENT EXECUTE FUNCTION late();",
        )
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    env.eventually("the job dead-lettered", 60, || async {
        env.dead_letters().await == 1
    })
    .await;
    fleet.stop().await;
    let batches = batch_attempts(&env, plan.run_id).await;
    assert_eq!(batches, vec![(1, "failed".to_string(), 3)], "{batches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_dead_lettered_at_once_and_can_be_replayed() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let path = env.dir.join("syncfleet.toml");
    env.dest
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, CONSTRAINT no_v17 CHECK (v <> 'v17'))",
        )
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    let plan = env.plan(&config).await;
    let run_id = plan.run_id;
    env.eventually("the run to fail", 60, || async {
        run_status(&env, run_id).await.status == "failed"
    })
    .await;
    env.eventually("the dead letter", 30, || async {
        env.dead_letters().await == 1
    })
    .await;
    let run = run_status(&env, run_id).await;
    assert!(
        run.error
            .as_deref()
            .unwrap_or("")
            .contains("items batch 2 failed")
            && run.error.as_deref().unwrap_or("").contains("no_v17"),
        "{run:?}"
    );
    let batches = batch_attempts(&env, run_id).await;
    assert!(
        batches.contains(&(2, "failed".to_string(), 1)),
        "dead-lettered on the first attempt: {batches:?}"
    );

    let status = env.cli(&path, &["status", &run_id.to_string()]).await;
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("failed batches:") && stdout.contains("items batch 2 after 1 attempt(s)"),
        "{stdout}"
    );
    let list = env.cli(&path, &["dead-letters", "list"]).await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{stdout}");
    let id = format!("{run_id}:items:2");
    assert!(
        stdout.contains(&id) && stdout.contains("permanent") && stdout.contains("no_v17"),
        "{stdout}"
    );
    assert_eq!(
        env.dead_letters().await,
        1,
        "listing leaves the dead letters in place"
    );

    // Fix the cause, replay: the run completes.
    env.dest
        .batch_execute("ALTER TABLE items DROP CONSTRAINT no_v17")
        .await
        .unwrap();
    let replay = env.cli(&path, &["dead-letters", "replay", &id]).await;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    env.wait(run_id).await;
    fleet.stop().await;
    assert_eq!(env.dead_letters().await, 0);
    env.assert_same_rows("SELECT * FROM items").await;
    let unknown = env
        .cli(&path, &["dead-letters", "replay", "1:nope:1"])
        .await;
    assert_eq!(unknown.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_job_in_a_shared_transaction_fails_alone() {
    // Jobs queued before the worker starts arrive together, and small ones
    // share a destination transaction. One that cannot be written rolls its
    // group back; the worker then runs the group's jobs one by one, so only
    // that job is dead-lettered.
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    env.dest
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, CONSTRAINT no_v17 CHECK (v <> 'v17'))",
        )
        .await
        .unwrap();
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    let fleet = Fleet::start(&config, 1);
    env.eventually("the run to fail", 60, || async {
        run_status(&env, run_id).await.status == "failed"
    })
    .await;
    env.eventually("every other batch", 60, || async {
        batch_attempts(&env, run_id)
            .await
            .iter()
            .all(|(_, status, _)| status != "pending")
    })
    .await;
    fleet.stop().await;
    let batches = batch_attempts(&env, run_id).await;
    let failed: Vec<_> = batches.iter().filter(|(_, s, _)| s != "done").collect();
    assert_eq!(failed, [&(2, "failed".to_string(), 1)], "{batches:?}");
    assert_eq!(env.dead_letters().await, 1);
    assert_eq!(
        TestEnv::rows(
            &env.source,
            "SELECT * FROM items WHERE id NOT BETWEEN 11 AND 20"
        )
        .await,
        TestEnv::rows(&env.dest, "SELECT * FROM items").await
    );
    // The jobs did share transactions: batches committed together share
    // their transaction's start time.
    let (done, transactions): (i64, i64) = {
        let r = env
            .dest
            .query_one(
                "SELECT count(*), count(DISTINCT started_at) FROM syncfleet.batches \
                 WHERE run_id = $1 AND status = 'done'",
                &[&run_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        transactions < done / 2,
        "{transactions} transactions for {done} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_describing_a_stream_is_not_the_streams_fault() {
    // Describing a stream is its first query; a server going down under it
    // must make the job wait for the server (counting the lost connection),
    // not dead-letter it at once as a bad stream.
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\n");
    let doomed = crate::helpers::connect(&env.source_url).await;
    let pid: i32 = doomed
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    env.source
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let error = syncfleet_db::StreamShape::describe(&doomed, config.stream("items").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        error.class(),
        syncfleet_db::ErrorClass::Disconnected,
        "{error}"
    );
}

/// A job that breaks its own connection each time it runs (here a trigger
/// that ends its session; in life, say, a row whose statement crashes the
/// server) is waited for like an outage only a few times, then
/// dead-lettered: not retried forever. The run's other batches are copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_breaks_its_connection_every_time_is_dead_lettered() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    env.dest
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             CREATE FUNCTION hang_up() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.id = 15 THEN
                 PERFORM pg_terminate_backend(pg_backend_pid());
                 PERFORM pg_sleep(5);
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER hang_up BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION hang_up();",
        )
        .await
        .unwrap();
    let plan = run_until_one_dead_letter(&env, &config).await;
    let statuses: Vec<(i64, String)> = batch_attempts(&env, plan.run_id)
        .await
        .into_iter()
        .map(|(batch, status, _)| (batch, status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (1, "done".to_string()),
            (2, "failed".to_string()),
            (3, "done".to_string()),
            (4, "done".to_string())
        ]
    );
    let copied = TestEnv::rows(&env.dest, "SELECT id FROM items").await;
    assert_eq!(copied.len(), 20, "{copied:?}");
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        stdout.contains("connection lost every time")
            && stdout.contains("broke under this job 3 times"),
        "{stdout}"
    );
    assert_eq!(run_status(&env, plan.run_id).await.status, "failed");
}

/// A run's batch reads row 1, the app changes it again and an event job
/// carries the change while the batch is still reading: the batch must not
/// commit its older read over the event's newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_not_undone_by_an_older_read_that_commits_after_it() {
    let env = TestEnv::new().await;
    let config = items_behind_a_slow_gate(&env, "id = 30", 3, "").await;
    env.sync(&config, 1).await;
    let plan = env.plan(&config).await;
    env.source
        .batch_execute(
            "UPDATE items SET v = 'read by the run' WHERE id = 1;
             INSERT INTO slow_flag VALUES (true)",
        )
        .await
        .unwrap();
    // Up to three jobs at once: the event's runs beside the batch.
    let fleet = Fleet::start(&config, 1);
    let sleeping = "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                    AND wait_event = 'PgSleep'";
    env.eventually("the batch's read to reach its slow row", 30, || async {
        env.source.query_opt(sleeping, &[]).await.unwrap().is_some()
    })
    .await;
    env.source
        .batch_execute("UPDATE items SET v = 'changed since' WHERE id = 1")
        .await
        .unwrap();
    let event = Job {
        v: JOB_VERSION,
        run_id: NO_RUN,
        stream: "items".into(),
        batch: 0,
        range: KeyRange::default(),
        select: Some(Selection {
            columns: vec!["id".into()],
            values: vec![vec!["1".into()]],
        }),
        source_lsn: None,
    };
    env.publish_raw(&serde_json::to_vec(&event).unwrap(), "event-1")
        .await;
    env.wait(plan.run_id).await;
    env.eventually("the event's job to be done", 30, || async {
        env.queue_depth().await == 0
    })
    .await;
    fleet.stop().await;
    let v: String = env
        .dest
        .query_one("SELECT v FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "changed since");
}

/// A source that ends sessions left idle in a transaction for a second, and
/// a destination whose merge takes two: the batch still commits, since the
/// source's transaction ends when its rows are read, not after the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_merge_does_not_keep_the_source_idle_in_its_transaction() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(&format!(
            "{ITEMS}
             ALTER DATABASE \"{}_src\" SET idle_in_transaction_session_timeout = '1s';",
            env.name
        ))
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    env.sync(&config, 1).await;
    env.source
        .batch_execute("UPDATE items SET v = v || '!' WHERE id <= 3")
        .await
        .unwrap();
    env.dest
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.id = 1 THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION slow();",
        )
        .await
        .unwrap();
    let run_id = env.sync(&config, 1).await;
    env.assert_same_rows("SELECT * FROM items").await;
    let attempts = batch_attempts(&env, run_id).await;
    assert_eq!(attempts, [(1, "done".to_string(), 1)]);

    // The same for a range the source no longer has rows in: the
    // destination's delete takes two seconds.
    env.source.batch_execute("DELETE FROM items").await.unwrap();
    env.dest
        .batch_execute(
            "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF OLD.id = 1 THEN PERFORM pg_sleep(2); END IF; RETURN OLD; END $$;
             CREATE TRIGGER slow_delete BEFORE DELETE ON items FOR EACH ROW EXECUTE FUNCTION slow_delete();",
        )
        .await
        .unwrap();
    let run_id = env.sync(&config, 1).await;
    assert!(
        TestEnv::rows(&env.dest, "SELECT * FROM items")
            .await
            .is_empty()
    );
    let attempts = batch_attempts(&env, run_id).await;
    assert_eq!(attempts, [(1, "done".to_string(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_exhausted_end_in_the_dead_letter_queue() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    env.dest
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             CREATE FUNCTION always() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'always busy' USING ERRCODE = '55P03'; END $$;
             CREATE TRIGGER always BEFORE INSERT ON items FOR EACH STATEMENT EXECUTE FUNCTION always();",
        )
        .await
        .unwrap();
    let plan = run_until_one_dead_letter(&env, &config).await;
    assert_eq!(
        batch_attempts(&env, plan.run_id).await,
        vec![(1, "failed".to_string(), 3)],
        "three attempts (SYNC_MAX_RETRIES default), then dead"
    );
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        stdout.contains("attempts exhausted") && stdout.contains("always busy"),
        "{stdout}"
    );
    assert_eq!(run_status(&env, plan.run_id).await.status, "failed");

    // Once the cause is gone, resuming the run re-publishes its failed
    // batch and the run completes.
    env.dest
        .batch_execute("DROP TRIGGER always ON items")
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    let out = env
        .cli(
            &env.dir.join("syncfleet.toml"),
            &["sync", "--resume", &plan.run_id.to_string(), "--wait"],
        )
        .await;
    fleet.stop().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("published 1 job(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run_status(&env, plan.run_id).await.status, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancels_the_query_on_the_server_and_retries_the_job() {
    let env = TestEnv::new().await;
    items_behind_a_slow_gate(&env, "true", 60, "deadline = \"2s\"\n").await;
    let config = env.patient();
    let plan = env.plan(&config).await;
    env.source
        .batch_execute("INSERT INTO slow_flag VALUES (true)")
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);

    let active = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                  AND state = 'active' AND query LIKE 'COPY (SELECT%slow_gate%'";
    env.eventually("the slow query to start", 30, || async {
        env.source.query_opt(active, &[]).await.unwrap().is_some()
    })
    .await;
    let pid: i32 = env.source.query_one(active, &[]).await.unwrap().get(0);
    // The query would sleep 60 s; the 2 s deadline cancels it on the server.
    env.eventually("the server to stop running the query", 15, || async {
        env.source
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&pid],
            )
            .await
            .unwrap()
            .is_none()
    })
    .await;
    let retried = control::run(&env.dest, plan.run_id).await.unwrap().unwrap();
    assert_ne!(retried.status, "succeeded");

    env.source
        .batch_execute("DELETE FROM slow_flag")
        .await
        .unwrap();
    env.wait(plan.run_id).await;
    fleet.stop().await;
    let batches = batch_attempts(&env, plan.run_id).await;
    assert_eq!(batches.len(), 1);
    assert!(batches[0].2 >= 2, "retried after the deadline: {batches:?}");
    env.assert_same_rows("SELECT * FROM items").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let fleet = Fleet::start(&config, 1);
    env.publish_raw(b"this is not json", "garbage-1").await;
    env.publish_raw(
        br#"{"v": 99, "run_id": 1, "stream": "items", "batch": 1, "range": {}}"#,
        "future-1",
    )
    .await;
    env.eventually("two dead letters", 30, || async {
        env.dead_letters().await == 2
    })
    .await;
    // The same worker still executes real jobs.
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    fleet.stop().await;
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(stdout.contains("malformed"), "{stdout}");
    assert!(stdout.contains("not a syncfleet job"), "{stdout}");
    assert!(stdout.contains("version 99 is not supported"), "{stdout}");
    // Replayed by its id, a letter that is not a job says so, and stays.
    let replay = env
        .cli(
            &env.dir.join("syncfleet.toml"),
            &["dead-letters", "replay", "garbage-1"],
        )
        .await;
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(replay.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("dead letter garbage-1 cannot be replayed: it is not a job"),
        "{stderr}"
    );
    let purge = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "purge"])
        .await;
    assert!(String::from_utf8_lossy(&purge.stdout).contains("purged 2"));
    assert_eq!(env.dead_letters().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_the_delivery_limit() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let _config = env.config("");
    env.publish_raw(
        br#"{"v": 1, "run_id": 1, "stream": "s", "batch": 1, "range": {}}"#,
        "poison-1",
    )
    .await;
    // A worker that dies holding the job, again and again: the message is
    // taken and its channel closes without a settle.
    let connection = lapin::Connection::connect(&crate::helpers::amqp_url(), Default::default())
        .await
        .unwrap();
    let queue = Topology::new(&env.name).work_queue();
    let mut deliveries = 0;
    // Bounded in time, not in tries: a loaded broker may take a while to
    // put a message back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let channel = connection.create_channel().await.unwrap();
        let got = channel
            .basic_get(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        if got.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if env.dead_letters().await == 1 {
                break;
            }
            continue;
        }
        deliveries += 1;
        channel.close(200, "crash".into()).await.unwrap();
    }
    let _ = connection.close(200, "".into()).await;
    assert_eq!(env.dead_letters().await, 1);
    assert_eq!(env.queue_depth().await, 0);
    assert_eq!(deliveries, syncfleet_broker::DELIVERY_LIMIT + 1);
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        stdout.contains("poison-1") && stdout.contains("delivery_limit"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_job_in_flight_and_exits_zero() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(&format!(
            "{ITEMS}
             CREATE FUNCTION take_a_while() RETURNS boolean LANGUAGE plpgsql STABLE AS
             $$ BEGIN PERFORM pg_sleep(3); RETURN true; END $$;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"items\"\nquery = \"SELECT id, v FROM items WHERE take_a_while()\"\n\
         key = [\"id\"]\nbatch_size = 100\n",
    );
    let plan = env.plan(&config).await;
    let mut worker = crate::helpers::syncfleet()
        .arg("--config")
        .arg(env.dir.join("syncfleet.toml"))
        .arg("worker")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.eventually("the job to start", 30, || async {
        env.source
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'active' AND query LIKE 'COPY (SELECT%take_a_while%'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let run = control::run(&env.dest, plan.run_id).await.unwrap().unwrap();
    assert_eq!(
        run.status, "succeeded",
        "the in-flight job finished during the drain"
    );
    assert_eq!(
        env.queue_depth().await,
        0,
        "and it was acked, not handed back"
    );
}

/// Runs rabbitmqctl (the tests run where the broker runs, as root).
fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets a queue-length policy on this test's work queue.
fn work_queue_length(env: &TestEnv, policy: &str, definition: &str) {
    let pattern = format!("^{}\\.work$", env.name);
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        policy,
        &pattern,
        definition,
    ]);
}

/// Waits until the broker shows `policy` on this test's work queue: a
/// policy reaches an existing queue asynchronously.
async fn policy_in_force(env: &TestEnv, policy: &str) {
    let queue = Topology::new(&env.name).work_queue();
    env.eventually("the policy to reach the work queue", 30, || async {
        rabbitmqctl(&["-q", "list_queues", "name", "policy"])
            .lines()
            .any(|l| l.split('\t').eq([queue.as_str(), policy]))
    })
    .await;
}

/// Clears a broker policy when dropped.
struct ClearPolicy(String);

impl Drop for ClearPolicy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

/// How many connections a broker user has.
fn connections_of(user: &str) -> usize {
    rabbitmqctl(&["list_connections", "user", "-q"])
        .lines()
        .filter(|l| l.trim() == user)
        .count()
}

/// A broker user of the test's own, deleted when dropped: closing "its"
/// connections touches no other test.
struct BrokerUser(String);

impl BrokerUser {
    fn new(env: &TestEnv) -> Self {
        let user = env.name.clone();
        rabbitmqctl(&["add_user", &user, "pw"]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
        BrokerUser(user)
    }

    /// `syncfleet.toml` rewritten to connect as this user, loaded.
    fn config(&self, env: &TestEnv) -> Arc<Config> {
        let path = env.dir.join("syncfleet.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("amqp://guest:guest@", &format!("amqp://{}:pw@", self.0));
        Arc::new(Config::load(&env.write("syncfleet.toml", &text)).unwrap())
    }

    fn close_connections(&self) {
        rabbitmqctl(&[
            "close_all_user_connections",
            &self.0,
            "test: the broker drops the worker",
        ]);
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_the_broker_closes_its_connection() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let broker = BrokerUser::new(&env);
    let user = broker.0.clone();
    env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 5\n");
    let config = broker.config(&env);

    let fleet = Fleet::start(&config, 1);
    env.eventually("the worker to connect", 30, || async {
        connections_of(&user) >= 2
    })
    .await;
    broker.close_connections();
    env.eventually("the worker to reconnect", 30, || async {
        connections_of(&user) >= 1
    })
    .await;
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    fleet.stop().await;
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A job whose connection to the broker is lost while it runs is put back
/// by the broker, and its next delivery settles it: the copy that was
/// running records and publishes nothing in its stead (here, its batch's
/// failure and its dead letter), which would make two of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_off_from_the_broker_leaves_its_settling_to_its_next_delivery() {
    let env = TestEnv::new().await;
    // The read of row 1 waits for an advisory lock the test holds, so that
    // the connection is lost while the job runs; every write is refused
    // for good.
    env.source
        .batch_execute(&format!(
            "{ITEMS}
             CREATE FUNCTION held_gate(id int) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
             BEGIN
               IF id = 1 THEN
                 PERFORM pg_advisory_lock_shared(4242);
                 PERFORM pg_advisory_unlock_shared(4242);
               END IF;
               RETURN true;
             END $$;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    env.config(
        "[[stream]]\nname = \"items\"\nquery = \"SELECT id, v FROM items WHERE held_gate(id)\"\n\
         key = [\"id\"]\nbatch_size = 100\n",
    );
    let broker = BrokerUser::new(&env);
    let config = broker.config(&env);
    let plan = env.plan(&config).await;
    fail_first_writes(&env, 1000, "42501", "injected: permission denied").await;
    let gate = crate::helpers::connect(&env.source_url).await;
    gate.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    env.eventually("the job to wait at the gate", 60, || async {
        crate::helpers::lock_waiters(&env.source, "COPY (SELECT%held_gate%").await == 1
    })
    .await;
    broker.close_connections();
    // Put back by the broker and delivered again to the reconnected
    // worker, the job waits for the batch's write lock the first copy holds.
    env.eventually(
        "the job's next delivery to wait for the first",
        60,
        || async { crate::helpers::lock_waiters(&env.dest, "%pg_advisory_xact_lock%").await == 1 },
    )
    .await;
    gate.batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    // Both copies wrote (and were refused), and the second was settled.
    env.eventually("both copies to be refused", 60, || async {
        writes_seen(&env).await >= 2 && env.dead_letters().await >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.stop().await;
    assert_eq!(env.dead_letters().await, 1, "one dead letter per failure");
    let batches = batch_attempts(&env, plan.run_id).await;
    assert_eq!(
        batches,
        [(1, "failed".to_string(), 1)],
        "one failure recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_halfway_is_resumed_with_exactly_the_missing_batches() {
    let env = TestEnv::new().await;
    // 1,251 batches, published by the planner a chunk at a time. A
    // max-length policy makes the broker refuse publishes part way through.
    env.source
        .batch_execute("CREATE TABLE big (id int PRIMARY KEY); INSERT INTO big SELECT generate_series(1, 2500);")
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"big\"\ntable = \"big\"\nbatch_size = 2\n");
    let path = env.dir.join("syncfleet.toml");
    let policy = format!("{}-full", env.name);
    work_queue_length(&env, &policy, r#"{"max-length": 1100}"#);
    let cleared = ClearPolicy(policy.clone());
    // Declare the queue so the policy is in force before planning.
    env.publish_raw(b"x", "placeholder").await;
    let purge = env.cli(&path, &["dead-letters", "purge"]).await;
    assert!(purge.status.success());
    env.purge_work_queue().await;
    policy_in_force(&env, &policy).await;

    let out = env.cli(&path, &["sync"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let run_id: i64 = env
        .dest
        .query_one("SELECT max(id) FROM syncfleet.runs", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        stderr.contains(&format!("sync --resume {run_id}")),
        "{stderr}"
    );
    drop(cleared);

    // Workers drain what the broker took; those batches are done. (Not
    // "the queue is empty": jobs a worker had taken but not started go
    // back to the queue when it stops, and the next fleet would finish
    // them while the resume is counted.)
    let fleet = Fleet::start(&config, 2);
    env.eventually("the accepted jobs to be done", 60, || async {
        let left: i64 = env
            .dest
            .query_one(
                "SELECT count(*) FROM syncfleet.batches WHERE run_id = $1 \
                 AND published_at IS NOT NULL AND status <> 'done'",
                &[&run_id],
            )
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    fleet.stop().await;
    // Counted, and resumed, with no worker running: jobs whose publish was
    // confirmed in a chunk the broker also refused part of are still in
    // the queue, unmarked, and a worker finishing one between the count
    // and the resume would make the resume publish one fewer.
    let not_done: i64 = env
        .dest
        .query_one(
            "SELECT 1251 - count(*) FROM syncfleet.batches WHERE run_id = $1 AND status = 'done'",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(not_done > 0 && not_done < 1251, "{not_done}");

    let out = env
        .cli(&path, &["sync", "--resume", &run_id.to_string()])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "resumed run {run_id}: published {not_done} job(s)"
        )),
        "exactly the batches not done: {not_done}\n{stderr}"
    );
    let fleet = Fleet::start(&config, 2);
    env.wait(run_id).await;
    fleet.stop().await;
    let verify = env.cli(&path, &["verify"]).await;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// A job delivered again after its batch succeeded, and failing for good
/// this time, leaves its batch done and its run going; a batch not yet
/// done that fails for good fails its run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_a_done_batch_leaves_it_and_its_run_alone() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    env.dest
        .execute(
            "UPDATE syncfleet.batches SET status = 'done' WHERE run_id = $1 AND batch_no = 1",
            &[&run_id],
        )
        .await
        .unwrap();
    let mut client = crate::helpers::connect(&env.dest_url).await;

    control::fail_batch(
        &mut client,
        run_id,
        "items",
        1,
        "boom",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    assert_eq!(run_status(&env, run_id).await.status, "running");
    assert_eq!(batch_attempts(&env, run_id).await[0].1, "done");

    control::fail_batch(
        &mut client,
        run_id,
        "items",
        2,
        "boom",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    assert_eq!(run_status(&env, run_id).await.status, "failed");
    assert_eq!(batch_attempts(&env, run_id).await[1].1, "failed");
}

/// A job that fails while the control schema is locked (a migration, a
/// `VACUUM FULL`) is parked for its retry within seconds, not held by its
/// worker for as long as the lock lasts: recording the failed attempt gives
/// up, as the attempt itself did at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_while_the_control_schema_is_locked_is_parked_not_held() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\ndeadline = \"2s\"\n",
    );
    let config = env.patient();
    let plan = env.plan(&config).await;
    let locker = crate::helpers::connect(&env.dest_url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE syncfleet.batches IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let recording =
        || crate::helpers::lock_waiters(&env.dest, "UPDATE syncfleet.batches SET attempts%");
    let fleet = Fleet::start(&config, 1);
    env.eventually(
        "a failed attempt's record to wait for the lock",
        60,
        || async { recording().await > 0 },
    )
    .await;
    env.eventually("the record to give up", 60, || async {
        recording().await == 0
    })
    .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    env.wait(plan.run_id).await;
    fleet.stop().await;
}

/// A job failing for good while the control schema is locked waits, as in
/// an outage, until its failure can be recorded: dead-lettered unrecorded,
/// its batch would stay pending and its run `running` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_for_good_while_the_control_schema_is_locked_waits_to_be_recorded() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    let plan = env.plan(&config).await;
    // Its one job can only fail: its table is gone.
    env.source.batch_execute("DROP TABLE items").await.unwrap();
    let locker = crate::helpers::connect(&env.dest_url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE syncfleet.batches IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let failing =
        || crate::helpers::lock_waiters(&env.dest, "UPDATE syncfleet.batches SET status%");
    let fleet = Fleet::start(&config, 1);
    for what in [
        "the failure's record to wait",
        "the job to come back and wait again",
    ] {
        env.eventually(what, 60, || async { failing().await > 0 })
            .await;
        env.eventually("the record to give up", 60, || async {
            failing().await == 0
        })
        .await;
    }
    assert_eq!(env.dead_letters().await, 0, "dead-lettered unrecorded");
    locker.batch_execute("ROLLBACK").await.unwrap();
    env.eventually("the job's dead letter", 60, || async {
        env.dead_letters().await == 1
    })
    .await;
    fleet.stop().await;
    assert_eq!(run_status(&env, plan.run_id).await.status, "failed");
}

/// A job still running when its worker's shutdown grace ends is aborted,
/// and what it left running on the servers is cancelled: a statement still
/// waiting there would hold the job's locks against the worker its
/// delivery goes to next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_aborted_at_shutdown_leaves_no_statement_behind() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let text = env
        .config_text("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n")
        .replace("shutdown_grace = \"20s\"", "shutdown_grace = \"1s\"");
    let config = Arc::new(syncfleet_core::Config::load(&env.write("grace.toml", &text)).unwrap());
    env.sync(&config, 1).await;
    // The next run's job waits for a lock on the destination's table.
    let plan = env.plan(&config).await;
    let locker = crate::helpers::connect(&env.dest_url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let waiting = || crate::helpers::lock_waiters(&env.dest, "%");
    let fleet = Fleet::start(&config, 1);
    env.eventually("the job to wait for the lock", 60, || async {
        waiting().await > 0
    })
    .await;
    fleet.stop().await;
    env.eventually("the job's statement to be cancelled", 30, || async {
        waiting().await == 0
    })
    .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    // The job, back in the broker, runs to the end with the next worker.
    let fleet = Fleet::start(&config, 1);
    env.wait(plan.run_id).await;
    fleet.stop().await;
}

/// A job whose batch an earlier attempt already committed (one cut off by
/// its deadline after its commit, say), and that then fails for good, is
/// acked, not dead-lettered: its work is done, and its run stays succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_once_its_batch_is_done_is_acked_not_dead_lettered() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let fleet = Fleet::start(&config, 1);
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    // A batch's job once more, when it can only fail: every write to its
    // table is refused.
    fail_first_writes(&env, 1000, "42501", "injected: permission denied").await;
    let job = env.jobs(plan.run_id, "items").await.remove(0);
    env.publish_raw(&job.encode(), &job.id()).await;
    env.eventually("the job to fail", 60, || async {
        writes_seen(&env).await > 0
    })
    .await;
    // Stopping lets the job end, and puts it back in the queue if unsettled.
    fleet.stop().await;
    assert_eq!(env.queue_depth().await, 0, "the job was not settled");
    assert_eq!(env.dead_letters().await, 0, "done work was dead-lettered");
    let topology = Topology::new(&env.name);
    for queue in [0, 1].map(|n| topology.delay_queue(n)) {
        assert_eq!(
            env.depth_of(&queue).await,
            0,
            "parked in {queue}, not acked"
        );
    }
    assert_eq!(run_status(&env, plan.run_id).await.status, "succeeded");
}

/// A worker whose prefetch (sized for a stream of tiny batches) brought it
/// more large jobs than it can run hands back those that waited longer
/// than their deadline, and an idle worker takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_hands_back_the_jobs_it_cannot_get_to_in_time() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE tiny (id int PRIMARY KEY, v text);
             INSERT INTO tiny SELECT i, 'v' || i FROM generate_series(1, 10) i;
             CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 6000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // Each slow job sleeps a second on the source; they may wait 3 s.
    let text = env
        .config_text(
            "[[stream]]\nname = \"tiny\"\ntable = \"tiny\"\nbatch_size = 10\n\
             [[stream]]\nname = \"slow\"\n\
             query = \"SELECT id, v FROM items WHERE id > (SELECT -1 FROM pg_sleep(1))\"\n\
             key = [\"id\"]\nbatch_size = 1000\ndeadline = \"3s\"\ndestination_table = \"items\"\n",
        )
        .replace("concurrency = 3", "concurrency = 1");
    let config =
        std::sync::Arc::new(syncfleet_core::Config::load(&env.write("hoard.toml", &text)).unwrap());
    let run_id = env.plan(&config).await.run_id;
    // The first worker's one slot is held by the tiny job (its table
    // locked on the destination) until the second has taken a slow job:
    // however long the second takes to start, the first cannot run them.
    let mut locker = crate::helpers::connect(&env.dest_url).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE tiny IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let first = Fleet::start(&config, 1);
    // The second starts idle once the first holds every job.
    env.eventually("the first worker to take every job", 60, || async {
        env.queue_depth().await == 0 && env.work_consumers().await == 1
    })
    .await;
    let second = Fleet::start(&config, 1);
    env.eventually("the second worker to finish a slow job", 60, || async {
        env.dest
            .query_one(
                "SELECT count(*) FROM syncfleet.batches \
                 WHERE run_id = $1 AND stream = 'slow' AND status = 'done'",
                &[&run_id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    lock.rollback().await.unwrap();
    env.wait(run_id).await;
    second.stop().await;
    first.stop().await;

    let workers: i64 = env
        .dest
        .query_one(
            "SELECT count(DISTINCT worker) FROM syncfleet.batches \
             WHERE run_id = $1 AND stream = 'slow'",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 2, "the slow jobs stayed with the first worker");
    env.assert_same_rows("SELECT * FROM items").await;
    assert_eq!(env.dead_letters().await, 0);
}

/// A batch failed by one copy of its job (out of attempts, say, while a
/// redelivered copy runs elsewhere) and then done by the other leaves its
/// run succeeded, not failed with nothing left to do; a run failed while
/// planning stays failed, whatever its recorded batches do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_done_after_all_finishes_its_run() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let executor = syncfleet_worker::Executor::connect(config.clone())
        .await
        .unwrap();
    let mut client = crate::helpers::connect(&env.dest_url).await;
    for planned in [true, false] {
        let plan = env.plan(&config).await;
        if !planned {
            env.dest
                .execute(
                    "UPDATE syncfleet.run_streams SET batches_planned = NULL WHERE run_id = $1",
                    &[&plan.run_id],
                )
                .await
                .unwrap();
        }
        control::fail_batch(
            &mut client,
            plan.run_id,
            "items",
            1,
            "injected",
            control::SETTLE_WITHIN,
        )
        .await
        .unwrap();
        assert_eq!(run_status(&env, plan.run_id).await.status, "failed");
        for job in env.jobs(plan.run_id, "items").await {
            executor.execute(&job).await.unwrap();
        }
        let run = run_status(&env, plan.run_id).await;
        match planned {
            true => assert_eq!((run.status.as_str(), run.error), ("succeeded", None)),
            false => assert_eq!(run.status, "failed", "{run:?}"),
        }
    }
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A quiet run with nothing left whose finish was lost (a worker's finish
/// check failing after its last commit, or the planner's last mark) is
/// finished when next looked at, not failed as abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_run_with_nothing_left_is_finished_not_abandoned() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let executor = syncfleet_worker::Executor::connect(config.clone())
        .await
        .unwrap();
    for mark in ["running", "planning"] {
        let plan = env.plan(&config).await;
        for job in env.jobs(plan.run_id, "items").await {
            executor.execute(&job).await.unwrap();
        }
        env.dest
            .execute(
                "UPDATE syncfleet.runs SET status = $2, finished_at = NULL, \
                 planned_at = CASE WHEN $2 = 'planning' THEN NULL ELSE planned_at END WHERE id = $1",
                &[&plan.run_id, &mark],
            )
            .await
            .unwrap();
        env.dest.batch_execute(A_DAY_AGO).await.unwrap();
        let busy = control::stream_busy(&env.dest, "items", Duration::from_secs(60))
            .await
            .unwrap();
        let run = run_status(&env, plan.run_id).await;
        assert!(!busy);
        assert_eq!(
            (run.status.as_str(), run.error),
            ("succeeded", None),
            "{mark}"
        );
    }
}

/// A run failed by one dead-lettered batch, while its other jobs are still
/// in the broker, keeps its stream busy: a new run's jobs would not be
/// ordered against them. Without progress for a while, it no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_with_jobs_still_out_keeps_its_stream_busy() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    let mut client = crate::helpers::connect(&env.dest_url).await;
    control::fail_batch(
        &mut client,
        run_id,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    assert_eq!(run_status(&env, run_id).await.status, "failed");
    let busy = |stale_after| control::stream_busy(&env.dest, "items", stale_after);
    assert!(busy(Duration::from_secs(3600)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!busy(Duration::from_millis(10)).await.unwrap());
}

/// A stream has one run going at a time, however a run would start: a
/// `sync` by hand, `sync --resume` of an older run and a replay of its dead
/// job are refused (exit 5) while another run of the stream is going, since
/// the jobs of two runs are not ordered against each other, and go through
/// once it has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_has_one_run_going_at_a_time() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    env.dest
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, CONSTRAINT no_v17 CHECK (v <> 'v17'))",
        )
        .await
        .unwrap();
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let path = env.dir.join("syncfleet.toml");
    // The first run fails with one batch dead-lettered; the rest are done.
    let fleet = Fleet::start(&config, 1);
    let first = env.plan(&config).await.run_id;
    env.eventually("the first run to fail", 60, || async {
        run_status(&env, first).await.status == "failed"
    })
    .await;
    env.eventually("its other batches to be done", 60, || async {
        let pending: i64 = env
            .dest
            .query_one(
                "SELECT count(*) FROM syncfleet.batches WHERE status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        pending == 0 && env.dead_letters().await == 1
    })
    .await;
    fleet.stop().await;
    assert_eq!(env.dead_letters().await, 1);

    let sync = env.cli(&path, &["sync"]).await;
    let stdout = String::from_utf8_lossy(&sync.stdout);
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let second: i64 = stdout.trim().parse().unwrap();

    // No worker runs the second: everything else waits for it.
    let going = format!("stream 'items' has run {second} still going");
    let refused = |out: std::process::Output| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(5), "{text}");
        assert!(text.contains(&going), "{text}");
    };
    refused(env.cli(&path, &["sync"]).await);
    refused(
        env.cli(&path, &["sync", "--resume", &first.to_string()])
            .await,
    );
    refused(env.cli(&path, &["dead-letters", "replay", "--all"]).await);
    assert_eq!(env.dead_letters().await, 1, "the job stays dead");
    assert_eq!(run_status(&env, first).await.status, "failed");

    env.dest
        .batch_execute("ALTER TABLE items DROP CONSTRAINT no_v17")
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    env.wait(second).await;
    let replay = env.cli(&path, &["dead-letters", "replay", "--all"]).await;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stdout)
    );
    env.wait(first).await;
    fleet.stop().await;
    assert_eq!(env.dead_letters().await, 0);
    env.assert_same_rows("SELECT * FROM items").await;
}

/// An incremental `sync` over several streams starts the runs it can and
/// exits 5 for a stream whose run is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_sync_starts_the_streams_that_have_no_run_going() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.source
        .batch_execute("CREATE TABLE other (id int PRIMARY KEY); INSERT INTO other VALUES (1);")
        .await
        .unwrap();
    env.migrate().await;
    env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\n\
         [[stream]]\nname = \"other\"\ntable = \"other\"\n",
    );
    let path = env.dir.join("syncfleet.toml");
    let first = env.cli(&path, &["sync", "--stream", "items"]).await;
    assert!(first.status.success());
    let items: i64 = String::from_utf8_lossy(&first.stdout)
        .trim()
        .parse()
        .unwrap();

    let out = env.cli(&path, &["sync", "--incremental"]).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(&format!("stream 'items' has run {items} still going")),
        "{stderr}"
    );
    let other: i64 = stdout.trim().parse().unwrap();
    let streams: Vec<String> = env
        .dest
        .query(
            "SELECT stream FROM syncfleet.run_streams WHERE run_id = $1",
            &[&other],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(streams, vec!["other".to_string()]);
}

/// Re-opening a run (a replay, a resume) is not refused by the run itself
/// while it still goes, and makes it go again however long it had been
/// quiet: a run re-opened after a quiet day must not count as abandoned at
/// once, or the next tick would start a run beside its jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_run_holds_its_stream_however_quiet_it_was() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    let mut client = crate::helpers::connect(&env.dest_url).await;
    control::fail_batch(
        &mut client,
        run_id,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    let hour = Duration::from_secs(3600);
    async fn going(client: &tokio_postgres::Client) -> Vec<i64> {
        let hour = Duration::from_secs(3600);
        let going = control::runs_going(client, &["items"], None, hour).await;
        going.unwrap().iter().map(|g| g.run_id).collect()
    }
    // Failed with its other jobs still out: it goes, and its own replay
    // is not refused for it.
    assert_eq!(going(&client).await, vec![run_id]);
    let reopened = control::reopen(&mut client, &env.name, run_id, Some(("items", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));

    // A day later, failed again and quiet since.
    control::fail_batch(
        &mut client,
        run_id,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    client
        .batch_execute(
            "UPDATE syncfleet.runs SET created_at = created_at - interval '1 day', \
               planned_at = planned_at - interval '1 day', finished_at = finished_at - interval '1 day', \
               reopened_at = reopened_at - interval '1 day'; \
             UPDATE syncfleet.batches SET finished_at = finished_at - interval '1 day'",
        )
        .await
        .unwrap();
    assert_eq!(going(&client).await, Vec::<i64>::new());
    let reopened = control::reopen(&mut client, &env.name, run_id, Some(("items", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));
    assert_eq!(going(&client).await, vec![run_id], "re-opened, it goes");
    assert_eq!(run_status(&env, run_id).await.status, "running");
}

/// A run whose batch was dead-lettered while it was still being planned
/// is planned all the same: re-opened, it runs (and can finish) instead of
/// waiting for a planner that has long finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_failed_while_planning_runs_once_reopened() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let mut client = crate::helpers::connect(&env.dest_url).await;
    let hour = Duration::from_secs(3600);
    let run_id = new_run(&env, &mut client, &["items"]).await;
    control::fail_batch(
        &mut client,
        run_id,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    control::mark_planned(&client, run_id).await.unwrap();
    assert_eq!(run_status(&env, run_id).await.status, "failed");
    let reopened = control::reopen(&mut client, &env.name, run_id, Some(("items", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));
    assert_eq!(run_status(&env, run_id).await.status, "running");
}

/// Two producers creating a run of one stream at the same moment: one
/// does, the other finds it going. The check and the insert are one
/// transaction under the stream's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_created_at_once_for_one_stream_make_one_run() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(crate::helpers::connect(&env.dest_url).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let racers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let start = start.clone();
            let prefix = env.name.clone();
            tokio::spawn(async move {
                start.wait().await;
                control::create_run_of(
                    &mut client,
                    &prefix,
                    "full",
                    &["race"],
                    Duration::from_secs(3600),
                )
                .await
                .unwrap()
                .is_ok()
            })
        })
        .collect();
    let mut created = 0;
    for racer in racers {
        created += usize::from(racer.await.unwrap());
    }
    assert_eq!(created, 1);
}

/// A run whose jobs were lost (here the work queue is purged; in life, the
/// broker dead-letters a job at its delivery limit) makes no progress, is
/// abandoned, and `sync --resume` publishes its pending batches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_publishes_again_the_jobs_of_an_abandoned_run() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    assert_eq!(env.purge_work_queue().await, 4);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let busy = control::stream_busy(&env.dest, "items", Duration::from_millis(10))
        .await
        .unwrap();
    assert!(!busy);
    assert!(
        run_status(&env, run_id)
            .await
            .error
            .unwrap_or_default()
            .contains("abandoned")
    );

    // A resume that stops after re-opening the run (here: its jobs cannot
    // be marked published) fails the run again, as planning does, rather
    // than leave it holding its stream until abandoned once more.
    env.dest
        .batch_execute(
            "CREATE FUNCTION unmarkable() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'injected: cannot mark'; END $$;
             CREATE TRIGGER unmarkable BEFORE UPDATE OF published_at ON syncfleet.batches
             FOR EACH ROW WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION unmarkable();",
        )
        .await
        .unwrap();
    let path = env.dir.join("syncfleet.toml");
    let out = env
        .cli(&path, &["sync", "--resume", &run_id.to_string()])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let run = run_status(&env, run_id).await;
    assert_eq!(run.status, "failed", "{run:?}");
    assert!(
        run.error
            .unwrap_or_default()
            .contains("injected: cannot mark"),
        "{stderr}"
    );
    env.dest
        .batch_execute("DROP TRIGGER unmarkable ON syncfleet.batches")
        .await
        .unwrap();
    // Its jobs reached the broker before the marking failed. They are lost
    // too, else workers could finish the batches (they are the run's own)
    // before the next resume looks for unfinished ones.
    assert_eq!(env.purge_work_queue().await, 4);

    let fleet = Fleet::start(&config, 1);
    let out = env
        .cli(&path, &["sync", "--resume", &run_id.to_string(), "--wait"])
        .await;
    fleet.stop().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("published 4 job(s)"), "{stderr}");
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A stale run's jobs still in the broker (here: workers down for a day)
/// are dropped once a newer run of the stream has started: they would run
/// beside its jobs, unordered against them. Their batches can still be
/// resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_runs_jobs_are_dropped_once_a_newer_run_holds_the_stream() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let path = env.dir.join("syncfleet.toml");
    let first = env.plan(&config).await.run_id;
    assert_eq!(env.queue_depth().await, 4);
    // Failed by one batch (a dead letter, say) with three jobs still out,
    // then quiet for a day.
    let mut client = crate::helpers::connect(&env.dest_url).await;
    control::fail_batch(
        &mut client,
        first,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    env.dest.batch_execute(A_DAY_AGO).await.unwrap();
    let sync = env.cli(&path, &["sync"]).await;
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let second: i64 = String::from_utf8_lossy(&sync.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(env.queue_depth().await, 8, "both runs' jobs are queued");
    // A planner of the first run still alive, marking jobs it published
    // after the claim, leaves them unpublished: they will be dropped.
    control::mark_published(&client, first, "items", &[2, 3, 4])
        .await
        .unwrap();

    // The first run's jobs come first; each has started by the time the
    // second run is done and the queue is empty, and the stop drains them.
    let fleet = Fleet::start(&config, 1);
    env.wait(second).await;
    env.eventually("the queue to empty", 30, || async {
        env.queue_depth().await == 0
    })
    .await;
    fleet.stop().await;
    assert_eq!(env.queue_depth().await, 0);
    let mut expected = vec![(1, "failed".to_string(), 1)];
    expected.extend((2..=4).map(|b| (b, "pending".to_string(), 0)));
    assert_eq!(
        batch_attempts(&env, first).await,
        expected,
        "the stale run's jobs wrote nothing"
    );
    assert_eq!(run_status(&env, second).await.status, "succeeded");

    // Its batches were all unpublished by the new run's claim: a resume
    // publishes them all, not just the failed one.
    let fleet = Fleet::start(&config, 1);
    let out = env
        .cli(&path, &["sync", "--resume", &first.to_string(), "--wait"])
        .await;
    fleet.stop().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("published 4 job(s)"), "{stderr}");
    assert_eq!(run_status(&env, first).await.status, "succeeded");
    env.assert_same_rows("SELECT * FROM items").await;
}

/// The stream's holder is the run that claimed it last, by starting or by
/// being re-opened; a claim waits for every job of the stream still in a
/// transaction, and jobs that lock after it see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_claims_its_stream_after_the_jobs_in_flight_commit() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let hour = Duration::from_secs(3600);
    let mut client = crate::helpers::connect(&env.dest_url).await;
    let first = new_run(&env, &mut client, &["items"]).await;
    control::mark_planned(&client, first).await.unwrap();
    client
        .batch_execute("UPDATE syncfleet.runs SET created_at = created_at - interval '1 day', planned_at = planned_at - interval '1 day'")
        .await
        .unwrap();

    // A job of the first run, in its transaction: locked, checked, reading.
    let in_flight = crate::helpers::connect(&env.dest_url).await;
    in_flight.batch_execute("BEGIN").await.unwrap();
    assert!(!lock_and_check(&in_flight, &env.name, first).await);

    let mut creator = crate::helpers::connect(&env.dest_url).await;
    let prefix = env.name.clone();
    let creating = tokio::spawn(async move {
        control::create_run_of(&mut creator, &prefix, "full", &["items"], hour).await
    });
    env.eventually("the new run to wait for the job's lock", 30, || async {
        lock_waits(&client).await == ["advisory"]
    })
    .await;
    assert!(!creating.is_finished());
    in_flight.batch_execute("COMMIT").await.unwrap();
    let second = creating.await.unwrap().unwrap().unwrap();

    // From now on, the first run's jobs drop out and the second's go on.
    assert!(superseded(&client, &env.name, first).await);
    assert!(!superseded(&client, &env.name, second).await);

    // The holder re-opened (a replay of its batch) does not wait for its
    // own jobs in flight: it claims nothing.
    control::insert_batches(&client, second, "items", &[(1, KeyRange::default())])
        .await
        .unwrap();
    control::mark_planned(&client, second).await.unwrap();
    in_flight.batch_execute("BEGIN").await.unwrap();
    assert!(!lock_and_check(&in_flight, &env.name, second).await);
    control::fail_batch(
        &mut client,
        second,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    let reopened = control::reopen(&mut client, &env.name, second, Some(("items", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));
    in_flight.batch_execute("COMMIT").await.unwrap();
    assert!(!superseded(&client, &env.name, second).await);

    // Once the second is over, re-opening the first (a replay of its
    // batch) makes it the holder again.
    control::fail_batch(
        &mut client,
        first,
        "items",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    client
        .batch_execute(&format!(
            "UPDATE syncfleet.batches SET status = 'done' WHERE run_id = {second}; \
             UPDATE syncfleet.runs SET status = 'succeeded', finished_at = now() WHERE id = {second}"
        ))
        .await
        .unwrap();
    let reopened = control::reopen(&mut client, &env.name, first, Some(("items", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));
    assert!(!superseded(&client, &env.name, first).await);
    assert!(superseded(&client, &env.name, second).await);
}

/// What a job of `run_id` (stream `items`) does first in its transaction:
/// takes its write locks, then asks whether its run still holds the stream.
async fn lock_and_check(client: &tokio_postgres::Client, prefix: &str, run_id: i64) -> bool {
    let job = Job {
        v: JOB_VERSION,
        run_id,
        stream: "items".into(),
        batch: 1,
        range: KeyRange::default(),
        select: None,
        source_lsn: None,
    };
    let (names, exclusive) = control::write_locks(prefix, [&job]);
    client
        .execute(control::LOCK_WRITES, &[&names, &exclusive])
        .await
        .unwrap();
    !client
        .query(control::SUPERSEDED, &[&vec![run_id], &vec!["items"]])
        .await
        .unwrap()
        .is_empty()
}

/// [`lock_and_check`] in a transaction of its own.
async fn superseded(client: &tokio_postgres::Client, prefix: &str, run_id: i64) -> bool {
    client.batch_execute("BEGIN").await.unwrap();
    let superseded = lock_and_check(client, prefix, run_id).await;
    client.batch_execute("COMMIT").await.unwrap();
    superseded
}

/// Failing a batch takes its run's row before the batch's, the order the
/// abandoning check takes them in: the other way round, the two deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_a_batch_locks_its_run_before_the_batch() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let mut client = crate::helpers::connect(&env.dest_url).await;
    let run_id = new_run(&env, &mut client, &["items"]).await;
    // What the abandoning check holds first.
    let holder = crate::helpers::connect(&env.dest_url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM syncfleet.runs WHERE id = $1 FOR UPDATE",
            &[&run_id],
        )
        .await
        .unwrap();
    let failing = tokio::spawn(async move {
        // Within a minute: the lock below is let go of well before.
        let within = Duration::from_secs(60);
        control::fail_batch(&mut client, run_id, "items", 1, "dead-lettered", within).await
    });
    env.eventually("fail_batch to wait for the run's row", 30, || async {
        lock_waits(&env.dest).await == ["transactionid"]
    })
    .await;
    // Waiting there, it holds no batch yet.
    let batch = env
        .dest
        .query(
            "SELECT 1 FROM syncfleet.batches WHERE run_id = $1 FOR UPDATE NOWAIT",
            &[&run_id],
        )
        .await;
    assert!(batch.is_ok(), "{batch:?}");
    holder.batch_execute("COMMIT").await.unwrap();
    failing.await.unwrap().unwrap();
    assert_eq!(run_status(&env, run_id).await.status, "failed");
}

/// A run re-opened for one of its streams (a replay of its batch there)
/// does not take back another stream that a newer run has claimed since:
/// its jobs there are dropped, and it must not keep that stream's runs
/// from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reopened_for_one_stream_holds_no_other() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let hour = Duration::from_secs(3600);
    let mut client = crate::helpers::connect(&env.dest_url).await;
    let first = new_run(&env, &mut client, &["x", "y"]).await;
    control::mark_planned(&client, first).await.unwrap();
    control::fail_batch(
        &mut client,
        first,
        "x",
        1,
        "dead-lettered",
        control::SETTLE_WITHIN,
    )
    .await
    .unwrap();
    client.batch_execute(A_DAY_AGO).await.unwrap();
    let second = control::create_run_of(&mut client, &env.name, "full", &["y"], hour)
        .await
        .unwrap()
        .unwrap();
    client
        .execute(
            "UPDATE syncfleet.runs SET status = 'succeeded', finished_at = now() WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    let reopened = control::reopen(&mut client, &env.name, first, Some(("x", 1)), hour)
        .await
        .unwrap();
    assert_eq!(reopened, Ok(1));
    let going = |stream: &'static str| {
        let client = &client;
        async move {
            control::runs_going(client, &[stream], None, hour)
                .await
                .unwrap()
                .iter()
                .map(|g| g.run_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(going("x").await, vec![first]);
    assert_eq!(going("y").await, Vec::<i64>::new());
    let third = control::create_run_of(&mut client, &env.name, "full", &["y"], hour).await;
    assert!(third.unwrap().is_ok());
}

/// A full run of `streams`, each one batch over its whole key range.
async fn new_run(env: &TestEnv, client: &mut tokio_postgres::Client, streams: &[&str]) -> i64 {
    let hour = Duration::from_secs(3600);
    let run_id = control::create_run_of(client, &env.name, "full", streams, hour)
        .await
        .unwrap()
        .unwrap();
    for stream in streams {
        control::insert_batches(&*client, run_id, stream, &[(1, KeyRange::default())])
            .await
            .unwrap();
    }
    run_id
}

/// What the sessions on this database are waiting for, of locks.
async fn lock_waits(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT wait_event FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every session syncfleet opens asks the server to probe its peer, so
/// that a worker cut off mid-job does not leave its locks held for the
/// kernel's two hours; a URL that sets its own keepalives keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_probes_a_session_whose_worker_may_be_gone() {
    use syncfleet_db::{Pool, Role};
    let env = TestEnv::new().await;
    let config = env.config("");
    let settings = |pool: Pool| async move {
        let client = pool.get().await.unwrap();
        let mut shown = Vec::new();
        for name in ["idle", "interval", "count"] {
            let row = client
                .query_one(&format!("SHOW tcp_keepalives_{name}"), &[])
                .await
                .unwrap();
            shown.push(row.get::<_, String>(0));
        }
        shown
    };
    for role in [Role::Source, Role::Destination] {
        let db = match role {
            Role::Source => &config.source,
            Role::Destination => &config.destination,
        };
        let pool = Pool::connect(role, db).await.unwrap();
        assert_eq!(settings(pool).await, ["30", "10", "3"]);
    }
    let own = env.config_text("").replace(
        &format!("{}\"", env.dest_url),
        &format!("{}?options=-c%20tcp_keepalives_idle%3D99\"", env.dest_url),
    );
    let own = Config::load(&env.write("own.toml", &own)).unwrap();
    let pool = Pool::connect(Role::Destination, &own.destination)
        .await
        .unwrap();
    assert_eq!(settings(pool).await[0], "99");
}

/// A producer stopped while it plans fails the run it was planning, and
/// only that: a run another process (a `sync` by hand) started in the
/// meantime is not its to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_producer_fails_only_the_run_it_created() {
    use syncfleet_db::{Pool, Role};
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n");
    let path = env.dir.join("syncfleet.toml");
    let before = control::last_run_id(&env.dest).await.unwrap();
    let sync = env.cli(&path, &["sync"]).await;
    assert!(sync.status.success());
    let by_hand: i64 = String::from_utf8_lossy(&sync.stdout)
        .trim()
        .parse()
        .unwrap();
    // As if it were still planning.
    env.dest
        .execute(
            "UPDATE syncfleet.runs SET status = 'planning', planned_at = NULL WHERE id = $1",
            &[&by_hand],
        )
        .await
        .unwrap();
    let creator: Option<String> = env
        .dest
        .query_one(
            "SELECT created_by FROM syncfleet.runs WHERE id = $1",
            &[&by_hand],
        )
        .await
        .unwrap()
        .get(0);
    let creator = creator.expect("the run names its creator");
    assert_ne!(creator, syncfleet_db::pool::process_name());

    let pool = Pool::connect(Role::Destination, &config.destination)
        .await
        .unwrap();
    let fail = || async {
        control::fail_planning_runs(&**pool.get().await.unwrap(), "items", before, "stopped")
            .await
            .unwrap()
    };
    assert_eq!(fail().await, Vec::<i64>::new());
    assert_eq!(run_status(&env, by_hand).await.status, "planning");

    env.dest
        .execute(
            "UPDATE syncfleet.runs SET status = 'succeeded' WHERE id = $1",
            &[&by_hand],
        )
        .await
        .unwrap();
    let hour = Duration::from_secs(3600);
    let mine = control::create_run_of(
        &mut pool.get().await.unwrap(),
        &env.name,
        "full",
        &["items"],
        hour,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(fail().await, vec![mine]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_jobs_cannot_be_published_wait_unacked_and_arrive_later() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config(
        "[producer]\ninterval = \"1h\"\nevent_window = \"100ms\"\n\
         [[stream]]\nname = \"items\"\ntable = \"items\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let producer = crate::helpers::Producer::start(&config);
    let counters = producer.counters.clone();
    env.eventually("the first scheduled run", 60, || async {
        env.dest
            .query_one(
                "SELECT count(*) FROM syncfleet.runs WHERE status = 'succeeded'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) >= 1)
            .unwrap_or(false)
    })
    .await;
    // The broker refuses every job: the work queue is full at length 0
    // once it holds one message, which no worker takes meanwhile.
    fleet.stop().await;
    let policy = format!("{}-refuse", env.name);
    work_queue_length(&env, &policy, r#"{"max-length": 0}"#);
    let cleared = ClearPolicy(policy);
    policy_in_force(&env, &cleared.0).await;
    env.publish_raw(b"x", "placeholder").await;

    env.source
        .batch_execute("UPDATE items SET v = 'changed' WHERE id = 7")
        .await
        .unwrap();
    env.publish_event("items", r#"{"table": "items", "op": "upsert", "ids": [7]}"#)
        .await;
    env.eventually("flushes to fail and be tried again", 30, || async {
        counters.event_flushes_failed.load(Ordering::Relaxed) >= 2
    })
    .await;
    // Raised rather than cleared: a quorum queue of RabbitMQ 3.10 goes on
    // refusing publishes after its length policy is cleared.
    work_queue_length(&env, &cleared.0, r#"{"max-length": 100000}"#);
    let fleet = Fleet::start(&config, 1);
    env.eventually("the change to arrive", 60, || async {
        TestEnv::rows(&env.dest, "SELECT v FROM items WHERE id = 7").await == ["(changed)"]
    })
    .await;
    producer.stop().await;
    fleet.stop().await;
    drop(cleared);
    // Held by the producer between tries, the event never went back to
    // the queue: each trip there would have been a delivery (and on a
    // quorum queue with a delivery limit, a step towards the dead letters).
    assert_eq!(counters.events_received.load(Ordering::Relaxed), 1);
    assert_eq!(
        env.depth_of(&Topology::new(&env.name).events_queue()).await,
        0
    );
}
