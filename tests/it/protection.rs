//! Source protection: the fleet-wide ceiling on source reads, the
//! fleet-wide rows/s limit and the adaptive throttle, against the real
//! databases.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use syncfleet_core::Config;
use syncfleet_core::shutdown::Shutdown;
use syncfleet_db::ceiling::Slots;
use syncfleet_db::sql::Pace;
use syncfleet_db::{Pool, Role, ceiling};
use syncfleet_worker::throttle::{MIN_LEVEL, ReadGate, resume_fleet_level, run_probe};

use crate::helpers::{Fleet, TestEnv, connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_never_runs_more_source_reads_than_its_ceiling() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 400) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // Each batch's read takes 300 ms (a sleep evaluated once per query).
    let text = env.config_text_with(
        "max_concurrent_reads = 2\n[source.throttle]\nenabled = false\n",
        "[[stream]]\nname = \"items\"\n\
         query = \"SELECT id, v FROM items WHERE id > (SELECT -1 FROM pg_sleep(0.3))\"\n\
         key = [\"id\"]\nbatch_size = 20\n",
    );
    let config = Arc::new(Config::load(&env.write("ceiling.toml", &text)).unwrap());
    let plan = env.plan(&config).await;

    // Watch the source from the side while three workers of three jobs
    // each (nine reads could run at once) work through 21 batches.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, url) = (stop.clone(), env.source_url.clone());
        tokio::spawn(async move {
            let client = connect(&url).await;
            let mut most = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND state = 'active' AND query LIKE 'COPY (SELECT%pg_sleep%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let fleet = Fleet::start(&config, 3);
    env.wait(plan.run_id).await;
    fleet.stop().await;
    stop.store(true, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    assert!(
        most <= 2,
        "{most} source reads ran at once, above the ceiling of 2"
    );
    assert_eq!(most, 2, "the fleet did use its two slots");
    env.assert_same_rows("SELECT * FROM items").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_backs_off_while_the_app_is_slow_and_recovers_after() {
    let env = TestEnv::new().await;
    // The app's hot lookup, made slow on demand (the injected load).
    env.source
        .batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE);
             INSERT INTO users SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 1000) i;
             CREATE TABLE slow_app (on_ boolean);
             CREATE FUNCTION lookup_user(e text) RETURNS int LANGUAGE plpgsql STABLE AS $$
             BEGIN
               IF EXISTS (SELECT 1 FROM slow_app) THEN PERFORM pg_sleep(0.2); END IF;
               RETURN (SELECT id FROM users WHERE email = e);
             END $$;",
        )
        .await
        .unwrap();
    let text = env.config_text_with(
        // A 100 ms floor: the noise of a loaded machine stays under it
        // (one probe over it halves the level), the injected 200 ms does
        // not, and the probe's bound (4 intervals) lets it be measured.
        "[source.throttle]\nprobe = \"SELECT lookup_user('u42@example.com')\"\ninterval = \"100ms\"\nmin_latency = \"100ms\"\n",
        "",
    );
    let config = Config::load(&env.write("throttle.toml", &text)).unwrap();
    let throttle = config.reads.throttle.clone().unwrap();
    let gate = Arc::new(ReadGate::new(4, Some(4), Some(&throttle)));
    let probe_pool = Pool::connect(Role::Source, &config.source).await.unwrap();
    let dest_pool = Pool::connect(Role::Destination, &config.destination)
        .await
        .unwrap();
    env.migrate().await;
    let shutdown = Shutdown::new();
    tokio::spawn(run_probe(
        gate.clone(),
        probe_pool,
        dest_pool,
        config.broker.prefix.clone(),
        throttle,
        shutdown.signal(),
    ));

    let level = |g: &Arc<ReadGate>| g.level();
    // The baseline is the fastest recent probe: let it see the app healthy.
    env.eventually("a healthy baseline", 30, || async {
        gate.baseline()
            .is_some_and(|b| b < Duration::from_millis(100))
    })
    .await;

    env.source
        .batch_execute("INSERT INTO slow_app VALUES (true)")
        .await
        .unwrap();
    env.eventually("the throttle to back off below one read", 30, || async {
        level(&gate) < 1.0
    })
    .await;
    // Below level one, reads take turns with idle time: a second read
    // cannot start while one runs.
    let first = gate.acquire().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), gate.acquire())
            .await
            .is_err()
    );
    gate.finish(first);
    env.source
        .batch_execute("DELETE FROM slow_app")
        .await
        .unwrap();
    // Recovery is additive and slow on purpose (0.05 a second): wait until
    // reads no longer take turns, and see the level still climbing.
    env.eventually("the throttle to recover to whole reads", 120, || async {
        level(&gate) >= 1.0
    })
    .await;
    let recovered = level(&gate);
    env.eventually("the level to keep climbing", 30, || async {
        level(&gate) > recovered
    })
    .await;
    shutdown.trigger();
}

/// With the throttle pinned at its floor, the whole fleet runs one read at
/// a time, and every statement of a batch runs paced on the server (the
/// source read, the upsert, the delete of missing rows): the destination
/// must still end up exactly as the source, through both the empty-range
/// COPY and the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_batches_run_one_at_a_time_in_the_fleet_and_copy_and_merge_exactly() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, amount numeric(12,3), attrs jsonb, note text, at timestamptz);
             INSERT INTO items SELECT i, i / 7.0, jsonb_build_object('n', i), repeat('x', i % 50), \
               timestamptz '2024-01-01' + i * interval '1 minute' FROM generate_series(1, 20000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // A probe that is slow against its own fastest run almost every time
    // keeps the throttle at its floor, so every read is paced.
    let text = env.config_text_with(
        "[source.throttle]\nprobe = \"SELECT pg_sleep(random() * 0.02)\"\ninterval = \"20ms\"\nmin_latency = \"1ms\"\n",
        // Batches big enough that a paced read lasts long enough to be seen.
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 5000\n",
    );
    let config = Arc::new(Config::load(&env.write("paced.toml", &text)).unwrap());
    // Workers start at the fleet's last reported level: at the floor from
    // their first job, whenever their probes get going.
    let at_the_floor = || async {
        env.dest
            .execute(
                "INSERT INTO syncfleet.fleet_reads (fleet, level, level_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (fleet) DO UPDATE SET level = excluded.level, level_at = now()",
                &[&config.broker.prefix, &MIN_LEVEL],
            )
            .await
            .unwrap();
    };
    at_the_floor().await;
    let fleet = Fleet::start(&config, 2);

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, url) = (stop.clone(), env.source_url.clone());
        tokio::spawn(async move {
            let client = connect(&url).await;
            let (mut paced, mut plain, mut most) = (0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                let reads = client
                    .query(
                        "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
                         AND state = 'active' AND query LIKE 'COPY (%'",
                        &[],
                    )
                    .await
                    .unwrap();
                most = most.max(reads.len());
                for row in reads {
                    let query: String = row.get(0);
                    if query.contains("pg_sleep") {
                        paced += 1;
                    } else {
                        plain += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (paced, plain, most)
        })
    };
    let initial = env.plan(&config).await;
    env.wait(initial.run_id).await;
    // Changes that a loose comparison would miss: numeric scale, a jsonb
    // number written differently; plus updates, deletes and inserts.
    env.source
        .batch_execute(
            "UPDATE items SET amount = round(amount, 1)::numeric(12,3) WHERE id % 5 = 0;
             UPDATE items SET attrs = '{\"n\": 1.0}' WHERE id = 1;
             UPDATE items SET note = 'changed' WHERE id % 11 = 0;
             DELETE FROM items WHERE id % 13 = 0;
             INSERT INTO items SELECT i, 1, '{}', 'new', now() FROM generate_series(20001, 20100) i;",
        )
        .await
        .unwrap();
    let merge = env.plan(&config).await;
    env.wait(merge.run_id).await;
    stop.store(true, Ordering::Relaxed);
    fleet.stop().await;
    let (paced, plain, most) = sampler.await.unwrap();
    assert!(paced > 0, "no paced read was seen");
    assert_eq!(plain, 0, "a read ran unpaced at the floor");
    assert_eq!(most, 1, "reads of two workers ran at once at the floor");
    let all = "SELECT id, amount::text, attrs::text, note, at FROM items ORDER BY id";
    assert_eq!(
        TestEnv::rows(&env.source, all).await,
        TestEnv::rows(&env.dest, all).await
    );

    // Nothing changed since: paced, every range's fingerprints match and
    // nothing is copied. (A fresh fleet: workers that just saw every range
    // differ compare only one in eight.)
    at_the_floor().await;
    let fleet = Fleet::start(&config, 2);
    let unchanged = env.plan(&config).await;
    env.wait(unchanged.run_id).await;
    fleet.stop().await;
    let (copied, found): (i64, i64) = {
        let row = env
            .dest
            .query_one(
                "SELECT coalesce(sum(rows_copied), 0)::int8, coalesce(sum(rows_unchanged), 0)::int8 \
                 FROM syncfleet.batches WHERE run_id = $1",
                &[&unchanged.run_id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((copied, found), (0, 20100 - 20000 / 13));
}

/// `max_rows_per_second` holds for the fleet, not per worker: however the
/// reads of two workers interleave, the rows of the batches finished by any
/// moment stay within the rate since the first batch began, plus one read
/// per worker (a read is charged once its rows are known). Checked from the
/// batches' start and finish times, both taken on the destination's one
/// clock: a batch finished before a moment began its read before it, and a
/// slow machine only spreads them further apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rows_per_second_limit_holds_for_the_whole_fleet() {
    const RATE: f64 = 4000.0;
    const BATCH: i64 = 1000;
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 24000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    // One job at a time per worker: a batch's transaction then starts when
    // its read does, not while it waits for a read slot.
    let text = env
        .config_text_with(
            &format!("max_rows_per_second = {RATE}\n[source.throttle]\nenabled = false\n"),
            &format!("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = {BATCH}\n"),
        )
        .replace("concurrency = 3", "concurrency = 1");
    let config = Arc::new(Config::load(&env.write("rate.toml", &text)).unwrap());
    let fleet = Fleet::start(&config, 2);
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    fleet.stop().await;

    let batches = env
        .dest
        .query(
            "SELECT extract(epoch FROM started_at)::float8, \
               extract(epoch FROM finished_at)::float8, rows_copied, worker \
             FROM syncfleet.batches WHERE run_id = $1 ORDER BY started_at",
            &[&plan.run_id],
        )
        .await
        .unwrap();
    // 24 ranges of 1,000 and the open range past the last key.
    assert_eq!(batches.len(), 25);
    let workers: std::collections::HashSet<String> = batches.iter().map(|b| b.get(3)).collect();
    assert_eq!(workers.len(), 2, "both workers read");
    let first: f64 = batches[0].get(0);
    for batch in &batches {
        // At each batch's end: the rows of the batches ended by then.
        let moment: f64 = batch.get(1);
        let finished: i64 = batches
            .iter()
            .filter(|b| b.get::<_, f64>(1) <= moment)
            .map(|b| b.get::<_, i64>(2))
            .sum();
        let allowed = RATE * (moment - first) + 2.0 * BATCH as f64;
        assert!(
            finished as f64 <= allowed,
            "{finished} rows were read by {:.3} s, over the fleet's {RATE} rows/s \
             (at most {allowed:.0})",
            moment - first
        );
    }
    let copied: i64 = batches.iter().map(|b| b.get::<_, i64>(2)).sum();
    assert_eq!(copied, 24000);
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A job's deadline bounds its reads and writes, not its wait for the
/// rows/s budget: with every batch's share of the budget (5 s) longer than
/// the deadline (3 s), each batch still succeeds at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_rows_per_second_budget_is_not_part_of_a_jobs_deadline() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 3000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let text = env
        .config_text_with(
            "max_rows_per_second = 200\n[source.throttle]\nenabled = false\n",
            "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 1000\ndeadline = \"3s\"\n",
        )
        .replace("concurrency = 3", "concurrency = 1");
    let config = Arc::new(Config::load(&env.write("budget.toml", &text)).unwrap());
    let fleet = Fleet::start(&config, 1);
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    fleet.stop().await;

    let attempts: Vec<String> = env
        .dest
        .query(
            "SELECT batch_no || ': ' || attempts || ' ' || coalesce(error, 'ok') \
             FROM syncfleet.batches WHERE run_id = $1 ORDER BY batch_no",
            &[&plan.run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, ["1: 1 ok", "2: 1 ok", "3: 1 ok", "4: 1 ok"]);
    env.assert_same_rows("SELECT * FROM items").await;
}

/// A read slot goes to the transactions that waited for it, in turn: one
/// that tries just after the holder commits (a worker beginning its next
/// job) does not take it back from them, so no process's jobs starve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_slot_goes_to_the_transaction_that_waited_for_it() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\n");
    let namespace = ceiling::namespace(&config.broker.prefix);
    let held = hold_the_only_read_slot(&env, &config).await;
    let pool = Pool::connect(Role::Destination, &config.destination)
        .await
        .unwrap();
    let waiter = pool.get().await.unwrap();
    waiter.batch_execute("BEGIN").await.unwrap();
    let waiting = {
        let namespace = namespace.clone();
        tokio::spawn(async move {
            ceiling::take_read_slot(&waiter, 1, &namespace)
                .await
                .map(|()| waiter)
        })
    };
    env.eventually("the waiter to queue on the server", 10, || async {
        TestEnv::rows(
            &env.dest,
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'advisory' \
             AND datname = current_database()",
        )
        .await
        .len()
            == 1
    })
    .await;
    // Slices of its wait end every 50 ms; the slot is freed while it
    // queues, as it is nearly all the time.
    held.batch_execute("ROLLBACK").await.unwrap();
    let next = connect(&env.dest_url).await;
    next.batch_execute("BEGIN").await.unwrap();
    let taken = next
        .query_opt(ceiling::TAKE_READ_SLOT, &[&1i32, &namespace, &0i32])
        .await
        .unwrap();
    assert!(taken.is_none(), "the slot went to a late try");
    let waiter = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter got the slot")
        .unwrap()
        .unwrap();
    waiter.batch_execute("ROLLBACK").await.unwrap();
}

/// The planner's walk of a stream's keys is a source read too: it waits for
/// a slot of the fleet's ceiling like any batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_reads_the_source_within_the_fleets_ceiling() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 500) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let text = env.config_text_with(
        "max_concurrent_reads = 1\n",
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 50\n",
    );
    let config = Arc::new(Config::load(&env.write("ceiling.toml", &text)).unwrap());

    let held = hold_the_only_read_slot(&env, &config).await;
    let plan = env.plan(&config);
    tokio::pin!(plan);
    // Seen from `status`: the planner's walk waits for the slot, named as
    // a walk.
    let walking = env.eventually("the walk to wait for the read slot", 60, || async {
        let slots = Slots::read(&env.dest, &config).await.unwrap();
        slots.is_some_and(|slots| {
            slots
                .sessions
                .iter()
                .any(|s| !s.granted && s.application_name == ceiling::WALK_APPLICATION)
        })
    });
    tokio::select! {
        _ = &mut plan => panic!("planning finished while the fleet's only read slot was held"),
        () = walking => {}
    }
    let recorded: i64 = env
        .dest
        .query_one("SELECT count(*) FROM syncfleet.batches", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0, "batches were planned without a read slot");
    // The test's hold is the one held.
    let slots = Slots::read(&env.dest, &config).await.unwrap().unwrap();
    let held_by: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots.held().map(|s| s.pid).collect::<Vec<_>>(),
        [Some(held_by)],
        "{slots:?}"
    );
    held.batch_execute("ROLLBACK").await.unwrap();
    let plan = plan.await;
    assert_eq!(plan.batches, vec![("items".to_string(), 11)]);
}

/// A slot held by a prepared transaction (no session holds it, and it
/// never ends by itself) is shown, and stuck from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_slot_held_by_a_prepared_transaction_is_stuck() {
    let env = TestEnv::new().await;
    let cluster = tokio::task::block_in_place(|| {
        syncfleet_chaos::postgres::PrivatePostgres::start_with(
            &env.dir,
            &["max_prepared_transactions = 2"],
        )
    })
    .unwrap();
    let url = cluster.url("postgres");
    let text = env.config_text("").replace(&env.dest_url, &url);
    let config = Config::load(&env.write("prepared.toml", &text)).unwrap();
    let holder = connect(&url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), 1)",
            &[&ceiling::namespace(&config.broker.prefix)],
        )
        .await
        .unwrap();
    holder
        .batch_execute("PREPARE TRANSACTION 'sft_stray'")
        .await
        .unwrap();
    let slots = Slots::read(&holder, &config).await.unwrap().unwrap();
    let held: Vec<_> = slots.held().collect();
    assert_eq!(held.len(), 1, "{slots:?}");
    assert!(
        held[0].pid.is_none()
            && held[0].slot == 1
            && held[0].stuck
            && held[0].state == "prepared transaction 'sft_stray'",
        "{slots:?}"
    );
    holder
        .batch_execute("ROLLBACK PREPARED 'sft_stray'")
        .await
        .unwrap();
    let slots = Slots::read(&holder, &config).await.unwrap().unwrap();
    assert_eq!(slots.held().count(), 0, "{slots:?}");
}

/// `status` finds a fleet's read slots in `pg_locks`, where the first key
/// of an advisory lock (the namespace's hash) shows unsigned: prefixes
/// whose namespace hashes below zero and above it, one with a slot held
/// in a transaction, as a worker holds one, the other with one held by an
/// idle session, as a stray `psql` might.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_slot_holders_are_found_whatever_their_namespace_hashes_to() {
    let env = TestEnv::new().await;
    let mut prefixes: Vec<(bool, String)> = Vec::new();
    for i in 0.. {
        let prefix = format!("{}{i}", env.name);
        let negative: bool = env
            .dest
            .query_one("SELECT hashtext($1) < 0", &[&ceiling::namespace(&prefix)])
            .await
            .unwrap()
            .get(0);
        if !prefixes.iter().any(|(n, _)| *n == negative) {
            prefixes.push((negative, prefix));
        }
        if prefixes.len() == 2 {
            break;
        }
    }
    let text = env.config_text("");
    for (negative, prefix) in prefixes {
        let text = text.replace(
            &format!("prefix = \"{}\"", env.name),
            &format!("prefix = \"{prefix}\""),
        );
        let config = Config::load(&env.write("slots.toml", &text)).unwrap();
        let holder = connect(&env.dest_url).await;
        let lock = match negative {
            true => "SELECT pg_advisory_lock(hashtext($1), 2)",
            false => {
                holder.batch_execute("BEGIN").await.unwrap();
                "SELECT pg_advisory_xact_lock(hashtext($1), 2)"
            }
        };
        holder
            .execute(lock, &[&ceiling::namespace(&prefix)])
            .await
            .unwrap();
        let pid: i32 = holder
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let slots = Slots::read(&env.dest, &config).await.unwrap().unwrap();
        let held: Vec<_> = slots.held().collect();
        assert_eq!(held.len(), 1, "{prefix}: {slots:?}");
        assert_eq!((held[0].pid, held[0].slot), (Some(pid), 2), "{prefix}");
        assert!(held[0].seconds.is_some() && !held[0].stuck, "{slots:?}");
        assert_eq!(slots.waiting(), 0);
    }
}

/// While the throttle holds the fleet below level one, the planner walks
/// the keys (or, for an incremental run, reads them in cursor order) at the
/// pace the fleet's workers last reported; a level reported long ago, or a
/// fleet without a throttle, leaves it unpaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_walks_at_the_fleets_throttle_level() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300000) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let streams =
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10000\ncursor = \"id\"\n";
    let load = |name: &str, source: &str| {
        let text = env.config_text_with(source, streams);
        Config::load(&env.write(name, &text)).unwrap()
    };
    let config = load("level.toml", "[source.throttle]\nprobe = \"SELECT 1\"\n");
    let unthrottled = load("plain.toml", "");
    let destination = Pool::connect(Role::Destination, &config.destination)
        .await
        .unwrap();
    let pace = |config: &Config| {
        let ceiling = ceiling::Ceiling::new(config);
        let destination = destination.clone();
        async move { ceiling.pace(&destination).await }
    };
    let fleet = &config.broker.prefix;

    assert_eq!(pace(&config).await, None, "no level reported");
    report_level(&env, fleet, 0.05, 3600.0).await;
    assert_eq!(pace(&config).await, None, "a stale level");
    report_level(&env, fleet, 1.5, 0.0).await;
    assert_eq!(pace(&config).await, None, "from level one up");
    report_level(&env, fleet, 0.05, 0.0).await;
    assert_eq!(pace(&unthrottled).await, None, "without a throttle");
    assert_eq!(pace(&config).await, Pace::below_one(0.05));

    // At 0.05 the planner's reads work a twentieth of the time: mostly
    // asleep.
    let sleeping = |what: &'static str, query: &'static str| {
        let env = &env;
        async move {
            env.eventually(what, 30, || async {
                let pausing: i64 = env
                    .source
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event = 'PgSleep' AND query LIKE $1",
                        &[&query],
                    )
                    .await
                    .unwrap()
                    .get(0);
                pausing == 1
            })
            .await;
        }
    };
    let walk = sleeping("the planner's walk to pause", "%syncfleet_walk%");
    let (plan, ()) = tokio::join!(env.plan(&config), walk);
    assert_eq!(plan.batches, vec![("items".to_string(), 31)]);
    // No worker runs it: ended by hand, for the stream's next run.
    env.dest
        .execute(
            "UPDATE syncfleet.runs SET status = 'succeeded', finished_at = now()",
            &[],
        )
        .await
        .unwrap();
    // Reported again: the walk at 0.05 may have outlasted the level's
    // freshness (10 s) on a loaded machine.
    report_level(&env, fleet, 0.05, 0.0).await;

    let scan = sleeping("the incremental scan to pause", "%ORDER BY q.\"id\"%");
    let (plan, ()) = tokio::join!(env.plan_incremental(&config), scan);
    assert_eq!(plan.batches, vec![("items".to_string(), 30)]);
}

/// `syncfleet verify` reads the source as the fleet does: each read waits
/// for a slot of the ceiling, and below level one its checksums are paced
/// at the level the fleet's workers last reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_reads_the_source_within_the_fleets_ceiling_and_level() {
    let env = TestEnv::new().await;
    let tables = "CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO small SELECT i, 'v' || i FROM generate_series(1, 500) i;
         CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300000) i;";
    env.source.batch_execute(tables).await.unwrap();
    env.dest.batch_execute(tables).await.unwrap();
    env.migrate().await;
    let text = env.config_text_with(
        "max_concurrent_reads = 1\n[source.throttle]\nprobe = \"SELECT 1\"\n",
        "[[stream]]\nname = \"small\"\ntable = \"small\"\n\
         [[stream]]\nname = \"items\"\ntable = \"items\"\n",
    );
    let path = env.write("verify.toml", &text);
    let config = Config::load(&path).unwrap();
    let verify = |stream: &'static str| {
        let (env, path) = (&env, path.clone());
        async move {
            let out = env.cli(&path, &["verify", "--stream", stream]).await;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{stdout}");
            assert!(
                stdout.contains(stream) && stdout.contains(" ok"),
                "{stdout}"
            );
        }
    };

    let held = hold_the_only_read_slot(&env, &config).await;
    let waiting = verify("small");
    tokio::pin!(waiting);
    // Queued on the server for the slot, and not done meanwhile.
    let queued = env.eventually("verify to queue for the read slot", 60, || async {
        !TestEnv::rows(
            &env.dest,
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'advisory' \
             AND datname = current_database()",
        )
        .await
        .is_empty()
    });
    tokio::select! {
        () = &mut waiting => panic!("verify finished while the fleet's only read slot was held"),
        () = queued => {}
    }
    held.batch_execute("ROLLBACK").await.unwrap();
    waiting.await;

    // At 0.05 its checksums work a twentieth of the time: mostly asleep.
    report_level(&env, &config.broker.prefix, 0.05, 0.0).await;
    let sleeping = env.eventually("verify's checksum to pause", 30, || async {
        let pausing: i64 = env
            .source
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'PgSleep' AND query LIKE '%md5(ROW(%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        pausing == 1
    });
    tokio::join!(verify("items"), sleeping);
}

/// A worker that starts while its fleet is throttled begins at the level
/// the fleet last reported, not at the ceiling where it would read unpaced
/// until its own probes caught up; a level reported long ago is ignored.
/// And it reports its own level for the workers after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_worker_begins_at_the_fleets_throttle_level() {
    let env = TestEnv::new().await;
    env.migrate().await;
    // Healthy probes only, however slow the machine (a probe is cut off at
    // 4 intervals, under `min_latency`): the level can only climb, 0.05 a
    // second.
    let text = env.config_text_with(
        "[source.throttle]\nprobe = \"SELECT 1\"\ninterval = \"50ms\"\nmin_latency = \"1s\"\n",
        "",
    );
    let config = Config::load(&env.write("level.toml", &text)).unwrap();
    let throttle = config.reads.throttle.clone().unwrap();
    let start = |fleet: &str| {
        let (config, throttle, fleet) = (config.clone(), throttle.clone(), fleet.to_string());
        async move {
            let gate = Arc::new(ReadGate::new(4, Some(4), Some(&throttle)));
            let shutdown = Shutdown::new();
            let destination = Pool::connect(Role::Destination, &config.destination)
                .await
                .unwrap();
            // As a worker does before its first job.
            resume_fleet_level(&gate, &destination, &fleet).await;
            tokio::spawn(run_probe(
                gate.clone(),
                Pool::connect(Role::Source, &config.source).await.unwrap(),
                destination,
                fleet,
                throttle,
                shutdown.signal(),
            ));
            (gate, shutdown)
        }
    };
    let fleet = format!("{}-fresh", config.broker.prefix);
    let stale = format!("{}-stale", config.broker.prefix);
    env.dest
        .execute(
            "INSERT INTO syncfleet.fleet_reads (fleet, level, level_at) \
             VALUES ($1, 0.5, now()), ($2, 0.5, now() - interval '1 hour')",
            &[&fleet, &stale],
        )
        .await
        .unwrap();

    let (gate, shutdown) = start(&fleet).await;
    env.eventually("a first probe", 30, || async { gate.baseline().is_some() })
        .await;
    let level = gate.level();
    assert!(
        (0.5..1.0).contains(&level),
        "started at {level}, not at the fleet's 0.5"
    );
    env.eventually("the worker to report its level", 30, || async {
        let row = env
            .dest
            .query_one(
                "SELECT level FROM syncfleet.fleet_reads WHERE fleet = $1",
                &[&fleet],
            )
            .await
            .unwrap();
        row.get::<_, f64>(0) > 0.5
    })
    .await;
    shutdown.trigger();

    let (gate, shutdown) = start(&stale).await;
    env.eventually("a first probe", 30, || async { gate.baseline().is_some() })
        .await;
    assert_eq!(gate.level(), 4.0, "a stale level was taken up");
    shutdown.trigger();
}

/// The producer service stops when told to, even while its planning waits
/// for a read slot (as long as `statement_timeout`), and fails the run it
/// was planning, for `sync --resume`: the next leader need not wait for it
/// to count as abandoned before its stream runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_stops_while_its_planning_waits_for_a_read_slot() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 100);")
        .await
        .unwrap();
    env.migrate().await;
    let text = env.config_text_with(
        "max_concurrent_reads = 1\n",
        "[producer]\ninterval = \"1h\"\n[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n",
    );
    let config = Arc::new(Config::load(&env.write("producer.toml", &text)).unwrap());
    let held = hold_the_only_read_slot(&env, &config).await;
    let shutdown = Shutdown::new();
    let producer = tokio::spawn(syncfleet_producer::service::run(
        config.clone(),
        Default::default(),
        shutdown.signal(),
    ));
    wait_for_the_run(&env).await;
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("the producer stopped while planning waited for a slot")
        .unwrap()
        .unwrap();
    let run = env
        .dest
        .query_one("SELECT id, status, error FROM syncfleet.runs", &[])
        .await
        .unwrap();
    let (id, status, error): (i64, String, Option<String>) = (run.get(0), run.get(1), run.get(2));
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(
        error.contains(&format!("sync --resume {id}")),
        "the error says how to resume: {error}"
    );
    let busy = syncfleet_db::control::stream_busy(&env.dest, "items", Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(!busy, "the stream waits for the stopped run");
    held.batch_execute("ROLLBACK").await.unwrap();
}

/// A run being planned right now (here: its walk waits for the fleet's
/// only read slot) is not resumed beside its planner, which would walk
/// its keys a second time: the resume is refused at once (exit 5). Once
/// its planner has stopped, a resume is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_not_resumed_while_its_planner_is_at_work() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let text = env.config_text_with(
        "max_concurrent_reads = 1\n",
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 10\n",
    );
    let path = env.write("syncfleet.toml", &text);
    let config = Arc::new(Config::load(&path).unwrap());
    let held = hold_the_only_read_slot(&env, &config).await;
    let planning = env.plan(&config);
    tokio::pin!(planning);
    tokio::select! {
        _ = &mut planning => panic!("planned while the fleet's only read slot was held"),
        () = wait_for_the_run(&env) => {}
    }
    let run_id: i64 = env
        .dest
        .query_one("SELECT id FROM syncfleet.runs", &[])
        .await
        .unwrap()
        .get(0);
    let resume = env
        .cli(&path, &["sync", "--resume", &run_id.to_string()])
        .await;
    let stderr = String::from_utf8_lossy(&resume.stderr);
    assert_eq!(resume.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(&format!("run {run_id} is being planned by another process")),
        "{stderr}"
    );
    held.batch_execute("ROLLBACK").await.unwrap();
    planning.await;

    let fleet = Fleet::start(&config, 1);
    let resume = env
        .cli(&path, &["sync", "--resume", &run_id.to_string(), "--wait"])
        .await;
    fleet.stop().await;
    let stderr = String::from_utf8_lossy(&resume.stderr);
    assert!(resume.status.success(), "{stderr}");
    env.assert_same_rows("SELECT * FROM items").await;
}

/// Records `level` as the throttle level the `fleet` reported
/// `age_seconds` ago.
async fn report_level(env: &TestEnv, fleet: &str, level: f64, age_seconds: f64) {
    env.dest
        .execute(
            "INSERT INTO syncfleet.fleet_reads (fleet, level, level_at) \
             VALUES ($1, $2, now() - make_interval(secs => $3)) ON CONFLICT (fleet) \
             DO UPDATE SET level = excluded.level, level_at = excluded.level_at",
            &[&fleet, &level, &age_seconds],
        )
        .await
        .unwrap();
}

/// Takes the only read slot of `config`'s fleet (a ceiling of 1), as a
/// worker reading a batch would, until the connection's `ROLLBACK`.
async fn hold_the_only_read_slot(env: &TestEnv, config: &Config) -> tokio_postgres::Client {
    let held = connect(&env.dest_url).await;
    held.batch_execute("BEGIN").await.unwrap();
    let namespace = ceiling::namespace(&config.broker.prefix);
    assert!(
        held.query_opt(ceiling::TAKE_READ_SLOT, &[&1i32, &namespace, &0i32])
            .await
            .unwrap()
            .is_some()
    );
    held
}

/// Waits until planning has created its run (and so checked its stream).
async fn wait_for_the_run(env: &TestEnv) {
    env.eventually("the run to be created", 30, || async {
        let runs: i64 = env
            .dest
            .query_one("SELECT count(*) FROM syncfleet.runs", &[])
            .await
            .unwrap()
            .get(0);
        runs == 1
    })
    .await;
}
