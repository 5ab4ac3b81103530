//! Incremental runs, the producer service, and upstream events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use syncfleet_core::Config;

use crate::helpers::{Fleet, Producer, TestEnv};

const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
     INSERT INTO items SELECT i, 'v' || i, timestamptz '2024-01-01' - i * interval '1 hour'
     FROM generate_series(1, 20) i;";

/// The ids each batch of a run selected.
async fn selected(env: &TestEnv, run_id: i64) -> Vec<String> {
    let mut ids: Vec<String> = env
        .dest
        .query(
            "SELECT jsonb_array_elements(selection->'values')->>0 FROM syncfleet.batches WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort_by_key(|i| i.parse::<i64>().unwrap_or(0));
    ids
}

async fn incremental(env: &TestEnv, config: &Arc<Config>) -> i64 {
    let plan = env.plan_incremental(config).await;
    env.wait(plan.run_id).await;
    plan.run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_runs_pick_up_inserts_and_updates_and_nothing_else() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 3\n\
         cursor = \"updated_at\"\ncursor_overlap = \"0s\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let first = incremental(&env, &config).await;
    assert_eq!(
        selected(&env, first).await.len(),
        20,
        "no watermark yet: every row"
    );
    env.assert_same_rows("SELECT * FROM items").await;

    env.source
        .batch_execute(
            "INSERT INTO items VALUES (21, 'new', now()), (22, 'new', now());
             UPDATE items SET v = 'changed', updated_at = now() WHERE id IN (5, 17);
             DELETE FROM items WHERE id = 9;",
        )
        .await
        .unwrap();
    let second = incremental(&env, &config).await;
    assert_eq!(selected(&env, second).await, vec!["5", "17", "21", "22"]);
    // A delete is not visible to an incremental run: the full run settles it.
    let nine: i64 = env
        .dest
        .query_one("SELECT count(*) FROM items WHERE id = 9", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nine, 1);
    let third = incremental(&env, &config).await;
    assert!(
        selected(&env, third).await.is_empty(),
        "nothing changed since"
    );
    env.sync(&config, 0).await;
    fleet.stop().await;
    env.assert_same_rows("SELECT * FROM items").await;
}

/// An incremental run that finds nothing new (a version counter, say, of a
/// quiet table) leaves the watermark where it was but marks it current, so
/// its age, which the stale-watermark alert watches, says the stream is
/// up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_streams_watermark_is_marked_current_by_each_run() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, version bigint NOT NULL);
             INSERT INTO items SELECT i, 'v' || i, i FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config =
        env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\ncursor = \"version\"\n");
    let fleet = Fleet::start(&config, 1);
    let watermark = || async {
        let row = env
            .dest
            .query_one(
                "SELECT cursor_value, updated_at FROM syncfleet.watermarks WHERE stream = 'items'",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, std::time::SystemTime>(1),
        )
    };
    incremental(&env, &config).await;
    let (first, first_at) = watermark().await;
    incremental(&env, &config).await;
    let (second, second_at) = watermark().await;
    fleet.stop().await;
    assert_eq!(first, second, "nothing new: the watermark stays");
    assert!(second_at > first_at, "and is marked current");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_cursor_values_across_batches_are_not_skipped() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL);
             INSERT INTO items SELECT i, 'v' || i, timestamptz '2024-06-01' FROM generate_series(1, 7) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 2\n\
         cursor = \"updated_at\"\ncursor_overlap = \"0s\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let first = incremental(&env, &config).await;
    assert_eq!(selected(&env, first).await.len(), 7);
    // Same cursor value as the watermark, keys on both sides of it.
    env.source
        .batch_execute(
            "UPDATE items SET v = 'again' WHERE id = 3;
             INSERT INTO items VALUES (8, 'same stamp', timestamptz '2024-06-01'), (9, 'same stamp', timestamptz '2024-06-01');",
        )
        .await
        .unwrap();
    let second = incremental(&env, &config).await;
    fleet.stop().await;
    assert_eq!(selected(&env, second).await, vec!["8", "9"]);
    let dest = TestEnv::rows(&env.dest, "SELECT id FROM items").await;
    assert_eq!(dest.len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_is_picked_up_by_the_next_run() {
    a_row_committed_late(None).await;
}

/// The same look-back for a cursor whose type is a domain over a timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_is_picked_up_under_a_domain_cursor() {
    a_row_committed_late(Some(
        "CREATE DOMAIN stamp AS timestamptz; ALTER TABLE items ALTER COLUMN updated_at TYPE stamp",
    ))
    .await;
}

async fn a_row_committed_late(alter: Option<&str>) {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    if let Some(alter) = alter {
        env.source.batch_execute(alter).await.unwrap();
    }
    env.migrate().await;
    // The default overlap (60 s) is what catches the late row.
    let config = env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 5\ncursor = \"updated_at\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    incremental(&env, &config).await;

    // A long transaction stamps row 1 now, but commits only later.
    let slow = crate::helpers::connect(&env.source_url).await;
    slow.batch_execute("BEGIN; UPDATE items SET v = 'late', updated_at = now() WHERE id = 1")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile a quick one moves the watermark past that stamp.
    env.source
        .batch_execute("UPDATE items SET v = 'quick', updated_at = now() WHERE id = 2")
        .await
        .unwrap();
    let during = incremental(&env, &config).await;
    assert!(selected(&env, during).await.contains(&"2".to_string()));
    slow.batch_execute("COMMIT").await.unwrap();
    let after = incremental(&env, &config).await;
    fleet.stop().await;
    assert!(selected(&env, after).await.contains(&"1".to_string()));
    let v: String = env
        .dest
        .query_one("SELECT v FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "late");
}

const APP: &str = "CREATE TABLE users (id int PRIMARY KEY, first_name text, email text);
     CREATE TABLE user_profiles (id int PRIMARY KEY, user_id int REFERENCES users, bio text);
     INSERT INTO users SELECT i, 'name' || i, 'u' || i || '@example.com' FROM generate_series(1, 10) i;
     INSERT INTO user_profiles SELECT i, i, 'bio' || i FROM generate_series(1, 10) i;";

const APP_STREAMS: &str = "[producer]\ninterval = \"1h\"\nstagger = \"0s\"\nevent_window = \"100ms\"\n\
     [[stream]]\nname = \"users\"\ntable = \"users\"\n\
     [[stream]]\nname = \"user_profiles\"\n\
     query = \"SELECT p.id, p.user_id, p.bio, u.first_name, u.email FROM user_profiles p JOIN users u ON u.id = p.user_id -- ends in a comment\"\n\
     key = [\"id\"]\n[stream.events]\nuser_profiles = \"id\"\nusers = \"user_id\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_any_publisher_reach_the_destination() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let config = env.config(APP_STREAMS);
    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    let counters = producer.counters.clone();
    // The producer's first scheduled runs fill both tabs.
    env.eventually("the first runs", 60, || async {
        env.dest
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'succeeded') FROM syncfleet.runs",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) >= 2)
            .unwrap_or(false)
    })
    .await;

    // A sign-up, a rename (which the joined tab must show) and a deletion.
    env.source
        .batch_execute(
            "INSERT INTO users VALUES (11, 'new', 'u11@example.com');
             INSERT INTO user_profiles VALUES (11, 11, 'hello');
             UPDATE users SET first_name = 'renamed' WHERE id = 3;
             DELETE FROM user_profiles WHERE id = 7; DELETE FROM users WHERE id = 7;",
        )
        .await
        .unwrap();
    // First, an event whose one id is a list of 30,000 numbers: its dead
    // letter says so without quoting it whole (the headers of a message
    // must fit in one frame of the broker's), and holds up nothing after it.
    let huge = (1..30_000).map(|i| i.to_string()).collect::<Vec<_>>();
    let huge = format!(
        r#"{{"table": "users", "op": "upsert", "ids": [[{}]]}}"#,
        huge.join(",")
    );
    env.publish_event("users", &huge).await;
    for (key, body) in [
        (
            "users",
            r#"{"table": "users", "op": "upsert", "ids": [11, 3]}"#,
        ),
        (
            "user_profiles",
            r#"{"table": "user_profiles", "op": "upsert", "ids": [11]}"#,
        ),
        ("users", r#"{"table": "users", "op": "delete", "ids": [7]}"#),
        (
            "user_profiles",
            r#"{"table": "user_profiles", "op": "delete", "ids": [7]}"#,
        ),
        (
            "orders",
            r#"{"table": "orders", "op": "upsert", "ids": [1]}"#,
        ),
        ("x", "{not json"),
        // Coalesced with the ids above, an id the server cannot cast would
        // fail their job: it is dead-lettered with its event instead.
        (
            "users",
            r#"{"table": "users", "op": "upsert", "ids": ["abc"]}"#,
        ),
    ] {
        env.publish_event(key, body).await;
    }

    let profiles = "SELECT p.id, p.user_id, p.bio, u.first_name, u.email FROM user_profiles p JOIN users u ON u.id = p.user_id";
    env.eventually("the events to reach both tabs", 60, || async {
        TestEnv::rows(&env.source, profiles).await
            == TestEnv::rows(
                &env.dest,
                "SELECT id, user_id, bio, first_name, email FROM user_profiles",
            )
            .await
            && TestEnv::rows(&env.source, "SELECT * FROM users").await
                == TestEnv::rows(&env.dest, "SELECT * FROM users").await
    })
    .await;
    env.eventually("the malformed events' dead letters", 30, || async {
        env.dead_letters().await == 3
    })
    .await;
    producer.stop().await;
    fleet.stop().await;
    assert_eq!(
        counters.events_dropped.load(Ordering::Relaxed),
        1,
        "orders: no stream reads it"
    );
    assert_eq!(counters.events_dead.load(Ordering::Relaxed), 3);
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        stdout.contains("malformed event") && stdout.contains("not JSON"),
        "{stdout}"
    );
    assert!(
        stdout.contains("'abc' is not a valid value of column id of stream 'users'"),
        "{stdout}"
    );
    assert!(stdout.contains("bytes cut)"), "{stdout}");
}

/// Ids of a type the producer cannot check (a date) share one job when
/// their events come in one window; so do rows the destination refuses. A
/// worker splits such a job until only the values at fault fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_in_an_event_job_fails_only_itself() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE readings (day date PRIMARY KEY, value int);
             INSERT INTO readings SELECT '2026-01-01'::date + i, i FROM generate_series(0, 2) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[producer]\ninterval = \"1h\"\nstagger = \"0s\"\nevent_window = \"200ms\"\n\
         [[stream]]\nname = \"readings\"\ntable = \"readings\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    let readings = "SELECT * FROM readings ORDER BY day";
    env.eventually("the first run", 60, || async {
        env.dest
            .query_one(
                "SELECT count(*) FROM syncfleet.runs WHERE status = 'succeeded'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    assert_eq!(TestEnv::rows(&env.dest, readings).await.len(), 3);
    env.dest
        .batch_execute(
            "ALTER TABLE readings ADD CONSTRAINT small CHECK (value < 100);
             CREATE UNIQUE INDEX one_day_a_value ON readings (value);",
        )
        .await
        .unwrap();
    env.source
        .batch_execute(
            "UPDATE readings SET value = 10 WHERE day = '2026-01-01';
             INSERT INTO readings VALUES ('2026-01-04', 4), ('2026-01-05', 500), ('2026-01-06', 1);",
        )
        .await
        .unwrap();
    // One event, so one job: a day that does not exist, a row the
    // destination's check refuses, one its unique index refuses (a
    // constraint of the data, not a race to retry), and two good rows.
    env.publish_event(
        "readings",
        r#"{"table": "readings", "op": "upsert", "ids": ["2026-01-01", "2026-01-04", "2026-01-05", "2026-01-06", "2026-13-45"]}"#,
    )
    .await;
    env.eventually(
        "the good rows, and a dead letter for each bad value",
        60,
        || async {
            env.dead_letters().await == 3
                && TestEnv::rows(&env.dest, readings).await
                    == TestEnv::rows(
                        &env.source,
                        "SELECT * FROM readings WHERE value < 100 AND day <> '2026-01-06' ORDER BY day",
                    )
                    .await
        },
    )
    .await;
    producer.stop().await;
    fleet.stop().await;
    let list = env
        .cli(&env.dir.join("syncfleet.toml"), &["dead-letters", "list"])
        .await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(
        stdout.contains("date/time field value out of range: \"2026-13-45\"")
            && stdout.contains("violates check constraint \"small\"")
            && stdout.contains("violates unique constraint \"one_day_a_value\""),
        "{stdout}"
    );
    // The unique conflict was retried first (another batch may have been
    // moving the value), the others not.
    assert!(stdout.contains("3 dead letter(s)"), "{stdout}");
    let permanent = stdout.lines().filter(|l| l.contains(" permanent ")).count();
    assert_eq!(permanent, 2, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("one_day_a_value") && l.contains("attempts exhausted")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_take_events_holds_up_no_other_and_its_events_replay_once_fixed() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    // The second stream's scheduled runs come only after an hour: from the
    // first, its tab changes through events alone.
    let streams = APP_STREAMS.replace("stagger = \"0s\"", "stagger = \"1h\"");
    let fixed = env.config(&streams);
    env.sync(&fixed, 1).await;
    // A typo: the profiles' stream has no column uid.
    let typo = env.config(&streams.replace("users = \"user_id\"", "users = \"uid\""));
    let fleet = Fleet::start(&fixed, 1);
    let producer = Producer::start(&typo);
    let counters = producer.counters.clone();
    // The users stream's first scheduled run, before the changes.
    env.eventually("the users stream's first run", 60, || async {
        env.dest
            .query_one(
                "SELECT count(*) FROM syncfleet.runs r JOIN syncfleet.run_streams s ON s.run_id = r.id
                 WHERE s.stream = 'users' AND r.status = 'succeeded'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) >= 2)
            .unwrap_or(false)
    })
    .await;

    env.source
        .batch_execute(
            "INSERT INTO users VALUES (11, 'new', 'u11@example.com');
             INSERT INTO user_profiles VALUES (11, 11, 'hello');
             UPDATE users SET first_name = 'renamed' WHERE id = 3;",
        )
        .await
        .unwrap();
    env.publish_event(
        "users",
        r#"{"table": "users", "op": "upsert", "ids": [11, 3]}"#,
    )
    .await;
    env.publish_event(
        "user_profiles",
        r#"{"table": "user_profiles", "op": "upsert", "ids": [11]}"#,
    )
    .await;
    // The users stream still takes its events; the profiles' stream's
    // events (and a copy of the users event it shares) wait as dead letters.
    env.eventually("the users event to reach its stream", 60, || async {
        TestEnv::rows(&env.source, "SELECT * FROM users").await
            == TestEnv::rows(&env.dest, "SELECT * FROM users").await
    })
    .await;
    env.eventually("the unroutable events' dead letters", 30, || async {
        env.dead_letters().await == 2
    })
    .await;
    assert_eq!(counters.events_dead.load(Ordering::Relaxed), 2);
    let profile: i64 = env
        .dest
        .query_one("SELECT count(*) FROM user_profiles WHERE id = 11", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(profile, 0, "the broken stream took no event");
    let config_file = env.dir.join("syncfleet.toml");
    let list = env.cli(&config_file, &["dead-letters", "list"]).await;
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert_eq!(stdout.matches("unroutable event").count(), 2, "{stdout}");
    assert!(
        stdout.contains("stream 'user_profiles' cannot take events")
            && stdout.contains("events.users: column 'uid' is not among the stream's columns"),
        "{stdout}"
    );
    producer.stop().await;

    // Fixed, the events are replayed to the producer, which routes them.
    let producer = Producer::start(&fixed);
    let replay = env
        .cli(&config_file, &["dead-letters", "replay", "--all"])
        .await;
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{stdout}");
    assert!(stdout.contains("2 event(s) replayed"), "{stdout}");
    let profiles = "SELECT p.id, p.user_id, p.bio, u.first_name, u.email FROM user_profiles p JOIN users u ON u.id = p.user_id";
    env.eventually("the replayed events to reach the profiles", 60, || async {
        TestEnv::rows(&env.source, profiles).await
            == TestEnv::rows(
                &env.dest,
                "SELECT id, user_id, bio, first_name, email FROM user_profiles",
            )
            .await
    })
    .await;
    assert_eq!(env.dead_letters().await, 0);
    producer.stop().await;
    fleet.stop().await;
}

/// A stream the source cannot describe for now (an app's migration holds
/// its table past the statement timeout) is no broken stream: the event
/// consumer starts again later, and the stream's events are not
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_source_error_does_not_make_a_stream_unroutable() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let streams = APP_STREAMS.replace(
        "interval = \"1h\"",
        "interval = \"1h\"\nfull_interval = \"1h\"",
    );
    // The first sync without the short timeout, which a loaded machine's
    // planning could run into.
    let plain = env.config_text(&streams);
    env.sync(
        &Arc::new(Config::load(&env.write("plain.toml", &plain)).unwrap()),
        1,
    )
    .await;
    let text = env.config_text_with("statement_timeout = \"500ms\"\n", &streams);
    let config = Arc::new(Config::load(&env.write("syncfleet.toml", &text)).unwrap());
    let migration = crate::helpers::connect(&env.source_url).await;
    migration
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    // The leader tries to describe the streams, waits for the lock, and is
    // cancelled by the statement timeout (nothing else frees the lock).
    let waiting = || crate::helpers::lock_waiters(&env.source, "%");
    env.eventually("the producer to wait for the lock", 60, || async {
        waiting().await > 0
    })
    .await;
    env.eventually("the statement timeout to cancel it", 60, || async {
        waiting().await == 0
    })
    .await;
    migration
        .batch_execute("UPDATE users SET first_name = 'renamed' WHERE id = 3; COMMIT")
        .await
        .unwrap();
    env.publish_event("users", r#"{"table": "users", "op": "upsert", "ids": [3]}"#)
        .await;
    env.eventually("the event's change to arrive", 60, || async {
        TestEnv::rows(&env.dest, "SELECT first_name FROM users WHERE id = 3").await == ["(renamed)"]
    })
    .await;
    assert_eq!(env.dead_letters().await, 0);
    producer.stop().await;
    fleet.stop().await;
}

/// A leader whose tick queues behind a lock on the control schema (an
/// operator's `LOCK TABLE syncfleet.runs`, a migration) still stops when
/// told: each statement of its tick is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stops_while_the_control_schema_is_locked() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let config = env.config(APP_STREAMS);
    let locker = crate::helpers::connect(&env.dest_url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE syncfleet.runs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let producer = Producer::start(&config);
    env.eventually("the leader's tick to wait for the lock", 60, || async {
        crate::helpers::lock_waiters(&env.dest, "WITH abandoned AS%").await > 0
    })
    .await;
    tokio::time::timeout(Duration::from_secs(60), producer.stop())
        .await
        .expect("the producer to stop while the lock is held");
    locker.batch_execute("ROLLBACK").await.unwrap();
}

/// The kind of the first run a newly started leader plans.
async fn first_scheduled_run(env: &TestEnv, config: &Arc<Config>) -> String {
    let before = syncfleet_db::control::last_run_id(&env.dest).await.unwrap();
    let fleet = Fleet::start(config, 1);
    let producer = Producer::start(config);
    let counters = producer.counters.clone();
    env.eventually("a scheduled run", 60, || async {
        counters.runs_started.load(Ordering::Relaxed) >= 1
    })
    .await;
    producer.stop().await;
    let (id, kind): (i64, String) = {
        let row = env
            .dest
            .query_one(
                "SELECT id, kind FROM syncfleet.runs WHERE id > $1 ORDER BY id LIMIT 1",
                &[&before],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // Finished before the fleet stops: left running, it would keep its
    // stream busy, and the next leader's first tick would find no run due.
    env.wait(id).await;
    fleet.stop().await;
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_keeps_the_full_run_schedule() {
    let env = TestEnv::new().await;
    env.source.batch_execute(ITEMS).await.unwrap();
    env.migrate().await;
    let config = env.config(
        "[producer]\ninterval = \"1h\"\nfull_interval = \"1h\"\nstagger = \"0s\"\n\
         [[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\ncursor = \"updated_at\"\n",
    );
    env.sync(&config, 1).await;
    // The last full run was ten minutes ago: the full run is not due yet.
    env.dest
        .batch_execute("UPDATE syncfleet.runs SET created_at = now() - interval '10 minutes'")
        .await
        .unwrap();
    assert_eq!(first_scheduled_run(&env, &config).await, "incremental");
    // Two hours ago: it is overdue, however recently the leader started.
    env.dest
        .batch_execute(
            "UPDATE syncfleet.runs SET created_at = now() - interval '2 hours' WHERE kind = 'full'",
        )
        .await
        .unwrap();
    assert_eq!(first_scheduled_run(&env, &config).await, "full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_is_skipped_while_the_previous_run_is_going() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 40) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // Each batch reads for 0.5 s; runs take about 4 s; ticks every second.
    let config = env.config(
        "[producer]\ninterval = \"1s\"\nstagger = \"0s\"\n\
         [[stream]]\nname = \"items\"\nquery = \"SELECT id, v FROM items WHERE id > (SELECT -1 FROM pg_sleep(0.5))\"\n\
         key = [\"id\"]\nbatch_size = 5\n",
    );
    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    let counters = producer.counters.clone();
    env.eventually("two runs and a skipped tick", 90, || async {
        counters.ticks_skipped.load(Ordering::Relaxed) >= 1
            && counters.runs_started.load(Ordering::Relaxed) >= 2
    })
    .await;
    producer.stop().await;
    fleet.stop().await;
    // No two runs of the stream were ever unfinished at once.
    let overlapping: i64 = env
        .dest
        .query_one(
            "SELECT count(*) FROM syncfleet.runs a JOIN syncfleet.runs b ON a.id < b.id \
             WHERE b.created_at < coalesce(a.finished_at, 'infinity')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlapping, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_producer_takes_over_when_the_leader_dies() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    env.config(APP_STREAMS);
    let path = env.dir.join("syncfleet.toml");
    let spawn = || {
        crate::helpers::syncfleet()
            .arg("--config")
            .arg(&path)
            .arg("producer")
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut producers = vec![spawn(), spawn()];
    let leader = || async {
        env.dest
            .query_opt(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() \
                 AND a.application_name LIKE 'syncfleet-leader-%'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    env.eventually("a leader", 30, || async { leader().await.is_some() })
        .await;
    let first = leader().await.unwrap();
    let pid: u32 = first
        .trim_start_matches("syncfleet-leader-")
        .parse()
        .unwrap();
    let index = producers
        .iter()
        .position(|p| p.id() == Some(pid))
        .expect("a producer leads");
    producers[index].start_kill().unwrap();
    let _ = producers[index].wait().await;
    env.eventually("the standby to lead", 60, || async {
        leader().await.is_some_and(|l| l != first)
    })
    .await;
    for p in &mut producers {
        let _ = p.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_moves_between_joined_ids_is_neither_duplicated_nor_lost() {
    use syncfleet_core::job::{Job, NO_RUN, Selection};
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let config = env.config(APP_STREAMS);
    env.sync(&config, 1).await;
    // Profile 1 moves from user 1 to user 2; the users event for 2 comes
    // first, then the one for 1.
    env.source
        .batch_execute("UPDATE user_profiles SET user_id = 2 WHERE id = 1")
        .await
        .unwrap();
    let executor = syncfleet_worker::Executor::connect(config.clone())
        .await
        .unwrap();
    let by_user = |id: &str| {
        Job::selection(
            NO_RUN,
            "user_profiles",
            0,
            Selection {
                columns: vec!["user_id".into()],
                values: vec![vec![id.into()]],
            },
        )
    };
    executor.execute(&by_user("2")).await.unwrap();
    executor.execute(&by_user("1")).await.unwrap();
    let profile: (i32, String) = env
        .dest
        .query_one(
            "SELECT user_id, first_name FROM user_profiles WHERE id = 1",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(profile, (2, "name2".to_string()), "moved, not lost");
    let rows = "SELECT id, user_id, bio, first_name, email FROM user_profiles";
    assert_eq!(
        TestEnv::rows(&env.dest, rows).await.len(),
        10,
        "nothing duplicated or deleted"
    );
}

/// A query stream whose key comes out NULL for some row cannot address
/// that row by key: planning a full or an incremental run of it fails,
/// naming the stream and the column, rather than panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_key_fails_planning_by_name() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO items (id, v) SELECT i, 'v' || i FROM generate_series(1, 20) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"holes\"\nquery = \"SELECT nullif(id, 7) AS id, v, updated_at FROM items\"\n\
         key = [\"id\"]\nbatch_size = 5\ncursor = \"updated_at\"\ndestination_table = \"holes\"\n",
    );
    for plan in [
        env.try_plan(&config).await,
        env.try_plan_incremental(&config).await,
    ] {
        let error = plan.expect_err("a NULL key planned").to_string();
        assert!(
            error.contains("holes") && error.contains("key column 'id' has NULL values"),
            "{error}"
        );
    }
}

/// `sync --incremental --wait` starts one run per stream, prints each id,
/// and fails if any of them failed, not only the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_sync_fails_if_any_streams_run_failed() {
    let env = TestEnv::new().await;
    let tables = "CREATE TABLE bad (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE good (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());";
    env.source.batch_execute(tables).await.unwrap();
    env.source
        .batch_execute(
            "INSERT INTO bad (id, v) SELECT i, 'v' || i FROM generate_series(1, 10) i;
             INSERT INTO good (id, v) SELECT i, 'v' || i FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    // The destination refuses one of bad's rows, for good.
    env.dest.batch_execute(tables).await.unwrap();
    env.dest
        .batch_execute("ALTER TABLE bad ADD CONSTRAINT no_v3 CHECK (v <> 'v3')")
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"bad\"\ntable = \"bad\"\ncursor = \"updated_at\"\n\
         [[stream]]\nname = \"good\"\ntable = \"good\"\ncursor = \"updated_at\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let out = env
        .cli(
            &env.dir.join("syncfleet.toml"),
            &["sync", "--incremental", "--wait"],
        )
        .await;
    fleet.stop().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert_eq!(stdout.lines().count(), 2, "one run id per stream: {stdout}");
    env.assert_same_rows("SELECT * FROM good").await;
    // Watching a run that failed exits as waiting for it does.
    let mut watched = Vec::new();
    for id in stdout.lines() {
        let path = env.dir.join("syncfleet.toml");
        let out = env.cli(&path, &["status", "--watch", id.trim()]).await;
        watched.push(out.status.code());
    }
    assert!(
        watched.contains(&Some(3)) && watched.contains(&Some(0)),
        "{watched:?}"
    );
}

/// An event whose ids fit one stream's columns and not another's reaches
/// the stream they fit, and a copy goes to the dead letters for the other;
/// a table of the same name in another schema gets none of its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_reaches_the_streams_its_ids_fit_and_its_own_schemas() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL, v text);
             INSERT INTO t SELECT i, 'n' || i, 'v' || i FROM generate_series(1, 20) i;
             CREATE SCHEMA other;
             CREATE TABLE other.t (id int PRIMARY KEY, v text);
             INSERT INTO other.t SELECT i, 'v' || i FROM generate_series(1, 20) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[producer]\ninterval = \"1h\"\nstagger = \"0s\"\nevent_window = \"100ms\"\n\
         [[stream]]\nname = \"by_id\"\ntable = \"public.t\"\n\
         [[stream]]\nname = \"by_name\"\nquery = \"SELECT id, name, v FROM t\"\nkey = [\"id\"]\n\
         [stream.events]\nt = \"name\"\n\
         [[stream]]\nname = \"other_t\"\ntable = \"other.t\"\n",
    );
    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    // The leader's first scheduled runs, one a stream, then none for an
    // hour: only the events can bring the changes below.
    env.eventually("the first scheduled runs to finish", 60, || async {
        let (done, going): (i64, i64) = {
            let r = env
                .dest
                .query_one(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'), \
                            count(*) FILTER (WHERE status IN ('planning', 'running')) FROM syncfleet.runs",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        done >= 3 && going == 0
    })
    .await;
    env.source
        .batch_execute("UPDATE t SET v = 'changed' WHERE id = 5; UPDATE other.t SET v = 'changed' WHERE id = 5")
        .await
        .unwrap();
    // "n5" is no id of `by_id` (an int), but a name of `by_name`.
    env.publish_event(
        "t",
        r#"{"table": "public.t", "op": "upsert", "ids": ["n5"]}"#,
    )
    .await;
    env.eventually("the change to reach the stream by name", 60, || async {
        TestEnv::rows(&env.dest, "SELECT v FROM by_name WHERE id = 5").await == ["(changed)"]
    })
    .await;
    env.eventually(
        "a copy for the stream by id in the dead letters",
        30,
        || async { env.dead_letters().await == 1 },
    )
    .await;
    // An event naming `public.t` by id: `other.t` is another table.
    env.publish_event("t", r#"{"table": "public.t", "op": "upsert", "ids": [5]}"#)
        .await;
    env.eventually("the change to reach the stream by id", 60, || async {
        TestEnv::rows(&env.dest, "SELECT v FROM by_id WHERE id = 5").await == ["(changed)"]
    })
    .await;
    // Any job of that flush for `other_t` went out with the one for
    // `by_id`: delivered, and ended by the fleet's stop.
    producer.stop().await;
    env.delivered().await;
    fleet.stop().await;
    assert_eq!(
        TestEnv::rows(&env.dest, "SELECT v FROM other_t WHERE id = 5").await,
        ["(v5)"],
        "other.t took an event of public.t"
    );
}
