//! The reader's window query must cost what the window holds, never what the table holds.
//! Regression test for the soak's growing lag: with `ORDER BY pk LIMIT n`, the planner, which
//! overestimates the rows of a txid range, walked the pk index from the table's first row and
//! filtered on txid (120–200 ms per read at 355,000 rows; 10 ms at the 50,000 here).

use observer_core::change_log::ChangeLog;
use observer_core::schema::TableName;
use observer_tests::*;

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
    let log = ChangeLog::new(TableName::parse("tb_entity_change_log").expect("table name"));
    let client = db.connect().await;
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .await
        .expect("plan_cache_mode");
    // A window of 14 transaction ids in the middle of the table, at its start (`$5` = 0), as
    // the reader sends it.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &"1004000",
        &Vec::<String>::new(),
        &"1004014",
        &"1004014:1004014:",
        &0i64,
        &1000i64,
    ];
    let plan: Vec<String> = client
        .query(&format!("EXPLAIN ANALYZE {}", log.window_sql()), &params)
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("tb_entity_change_log_txid_idx"),
        "the window is not read through the txid index:\n{plan}"
    );
    assert!(
        !plan.contains("pkey"),
        "the window query walks the pk index:\n{plan}"
    );
    let rows = client
        .query(log.window_sql(), &params)
        .await
        .expect("window read");
    assert_eq!(rows.len(), 140, "rows of txids 1004000..1004014");
    let pks: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert!(pks.windows(2).all(|w| w[0] < w[1]), "pk order: {pks:?}");
}
