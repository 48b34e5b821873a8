//! The reader's window query must cost what the window holds, never what the table holds.
//! Regression test for the soak's growing lag: with `ORDER BY pk LIMIT n`, the planner, which
//! overestimates the rows of a txid range, walked the pk index from the table's first row and
//! filtered on txid (120–200 ms per read at 355,000 rows; 10 ms at the 50,000 here). And for
//! the soak's load: without statistics the planner launched two parallel workers for every read
//! (29.9 ms instead of 0.36 ms for 120 rows at 1.3 million).

use observer_core::change_log::{ChangeLog, ReadLimits, READER_SESSION_SQL};
use observer_core::schema::TableName;
use observer_tests::*;

/// Opens a session with the reader's settings (after `extra`, if any), then returns the plan
/// (`explain` is `EXPLAIN` or `EXPLAIN ANALYZE`) and the rows of the window of transaction ids
/// [`lo`, `hi`) at its start (`$5` = 0), as the reader sends it.
async fn plan_and_read(
    db: &TestDb,
    extra: &str,
    explain: &str,
    lo: &str,
    hi: &str,
) -> (String, Vec<tokio_postgres::Row>) {
    let log = ChangeLog::new(TableName::parse("tb_entity_change_log").expect("table name"));
    let client = db.connect().await;
    client
        .batch_execute(&format!("{extra}{READER_SESSION_SQL}"))
        .await
        .expect("the reader's session settings");
    let snapshot = format!("{hi}:{hi}:");
    let limits = ReadLimits::default();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &lo,
        &Vec::<String>::new(),
        &hi,
        &snapshot,
        &0i64,
        &1000i64,
        &limits.max_row_bytes,
        &limits.max_batch_bytes,
        &1000i64,
    ];
    let plan: Vec<String> = client
        .query(&format!("{explain} {}", log.window_sql()), &params)
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let rows = client
        .query(log.window_sql(), &params)
        .await
        .expect("window read");
    (plan.join("\n"), rows)
}

#[tokio::test]
async fn a_window_in_a_large_table_is_read_through_the_txid_index() {
    let db = TestDb::new().await;
    // 50,000 rows, ten per transaction id (as if ten rows were written per transaction), then
    // fresh statistics: the state in which the old query chose the pk index.
    db.exec(
        "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data, txid)
         SELECT 'Order', g::text, 'INSERT', jsonb_build_object('id', g), (1000000 + g / 10)::text::xid8
         FROM generate_series(1, 50000) g;
         ANALYZE tb_entity_change_log",
    )
    .await;
    // A window of 14 transaction ids in the middle of the table.
    let (plan, rows) = plan_and_read(&db, "", "EXPLAIN ANALYZE", "1004000", "1004014").await;
    assert!(
        plan.contains("tb_entity_change_log_txid_idx"),
        "the window is not read through the txid index:\n{plan}"
    );
    assert!(
        !plan.contains("pkey"),
        "the window query walks the pk index:\n{plan}"
    );
    assert_eq!(
        plan.matches("Sort Key").count(),
        1,
        "one sort: the byte budget's running total follows the window's own order:\n{plan}"
    );
    assert_eq!(rows.len(), 140, "rows of txids 1004000..1004014");
    let pks: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert!(pks.windows(2).all(|w| w[0] < w[1]), "pk order: {pks:?}");
}

/// A change log without statistics (autovacuum off, or a table growing faster than it is
/// analyzed) is read without parallel workers. Parallel plans are made as cheap as they can be
/// here, so that only the reader's own session settings can keep them out; the old settings
/// (only `plan_cache_mode`) give a `Gather` in this test.
#[tokio::test]
async fn a_window_is_never_read_by_parallel_workers() {
    let db = TestDb::new().await;
    db.exec(
        "ALTER TABLE tb_entity_change_log SET (autovacuum_enabled = false);
         INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data, txid)
         SELECT 'Order', g::text, 'INSERT', jsonb_build_object('id', g), (1000000 + g / 10)::text::xid8
         FROM generate_series(1, 20000) g",
    )
    .await;
    let cheap_parallel = "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
         SET min_parallel_table_scan_size = 0; SET min_parallel_index_scan_size = 0; ";
    let (plan, rows) = plan_and_read(&db, cheap_parallel, "EXPLAIN", "1000500", "1001500").await;
    assert!(
        !plan.contains("Gather") && !plan.contains("Parallel"),
        "the window query is planned with parallel workers:\n{plan}"
    );
    assert_eq!(rows.len(), 1000, "the first page of txids 1000500..1001500");
}

/// The byte budget holds per page of `$9` rows, so one cursor reads a window of any size: a
/// page's running size starts again at each page, and the rows are cut (to the window's end)
/// only where a page already held the budget before the row. When the budget held for the read
/// as a whole, a drain of a large window of small rows re-ran the window's scan and sort after
/// every 8 MiB (docs/benchmarks.md).
#[tokio::test]
async fn the_byte_budget_holds_per_page() {
    let db = TestDb::new().await;
    db.exec(
        "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data, txid)
         SELECT 'Order', g::text, 'INSERT', jsonb_build_object('s', repeat('x', 100)), '2000000'::xid8
         FROM generate_series(1, 30) g",
    )
    .await;
    let client = db.connect().await;
    let size: i32 = client
        .query_one(
            "SELECT pg_column_size(jsonb_build_object('s', repeat('x', 100)) #> '{}')",
            &[],
        )
        .await
        .expect("image size")
        .get(0);
    let log = ChangeLog::new(TableName::parse("tb_entity_change_log").expect("table name"));
    let read = |budget: i64, page: i64| {
        let (client, sql) = (&client, log.window_sql().to_string());
        async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &"2000000",
                &Vec::<String>::new(),
                &"2000001",
                &"2000001:2000001:",
                &0i64,
                &i64::MAX,
                &ReadLimits::default().max_row_bytes,
                &budget,
                &page,
            ];
            let rows = client.query(&sql, &params).await.expect("window read");
            rows.iter()
                .map(|r| r.get::<_, i64>(11))
                .collect::<Vec<i64>>()
        }
    };
    let x = i64::from(size);
    // Pages of 10 rows hold 10 images each: a budget of 15 is never reached.
    let pages = read(15 * x, 10).await;
    assert_eq!(pages.len(), 30, "every row of the window: {pages:?}");
    let expected: Vec<i64> = (0..30).map(|i| (i % 10 + 1) * x).collect();
    assert_eq!(pages, expected, "each page's running size starts again");
    // A budget of 5 images: the sixth row of the first page comes after the budget, and the
    // read ends there (the rows after it are in later reads, never skipped).
    assert_eq!(
        read(5 * x, 10).await,
        (1..=5).map(|i| i * x).collect::<Vec<_>>()
    );
    // A budget of 4.5 images: the row that reaches it is the last one read.
    assert_eq!(read(9 * x / 2, 10).await.len(), 5);
}
