//! What the daemon checks about its database role before it reads anything: that our tables
//! exist, that its role holds the privileges the run will use (so a missing grant is one clear
//! message at start, not a failure at the first dead letter hours later), and that row-level
//! security on the change log does not hide rows from it (which would make events silently
//! undeliverable). docs/security.md lists the grants.

use crate::config::Config;
use crate::schema::{Objects, TableName};
use crate::store::StoreError;

/// One privilege the run needs on one table, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub table: TableName,
    pub privilege: &'static str,
    pub why: &'static str,
}

/// The privileges a `run` with this config uses (besides USAGE on the schema).
pub fn needs(objects: &Objects, cfg: &Config) -> Vec<Need> {
    let need = |table: &TableName, privilege, why| Need {
        table: table.clone(),
        privilege,
        why,
    };
    let mut v = vec![
        need(&objects.change_log, "SELECT", "reading events"),
        need(
            &objects.dead_letters,
            "SELECT",
            "counting the DLQ for metrics",
        ),
        need(
            &objects.dead_letters,
            "INSERT",
            "dead-lettering failed actions",
        ),
        need(&objects.action_log, "INSERT", "recording action outcomes"),
        need(&objects.checkpoints, "SELECT", "reading checkpoints"),
    ];
    if cfg.features.checkpoint {
        v.push(need(
            &objects.checkpoints,
            "INSERT",
            "saving the checkpoint",
        ));
        v.push(need(
            &objects.checkpoints,
            "UPDATE",
            "saving the checkpoint",
        ));
    }
    if cfg.features.failover {
        for p in ["SELECT", "INSERT", "UPDATE"] {
            v.push(need(&objects.leases, p, "holding the failover lease"));
        }
        for p in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
            v.push(need(
                &objects.instances,
                p,
                "registering this instance of the listener group",
            ));
        }
    }
    if cfg.features.search {
        v.push(need(
            &objects.audit,
            "INSERT",
            "recording the audit trail (features.search)",
        ));
        if cfg.search.backend == crate::config::SearchBackend::Elasticsearch {
            v.push(need(&objects.audit, "SELECT", "indexing the audit trail"));
            for p in ["SELECT", "INSERT", "UPDATE"] {
                v.push(need(
                    &objects.search_index,
                    p,
                    "the search indexer's watermark",
                ));
            }
        }
    }
    let r = &cfg.retention;
    if r.interval_secs > 0 {
        if r.change_log_days > 0 && cfg.features.checkpoint {
            v.push(need(
                &objects.change_log,
                "DELETE",
                "[retention] change_log_days",
            ));
        }
        if r.action_log_days > 0 {
            v.push(need(
                &objects.action_log,
                "SELECT",
                "[retention] action_log_days",
            ));
            v.push(need(
                &objects.action_log,
                "DELETE",
                "[retention] action_log_days",
            ));
        }
        if r.action_log_days > 0 && cfg.features.search {
            for p in ["SELECT", "DELETE"] {
                v.push(need(
                    &objects.audit,
                    p,
                    "[retention] action_log_days (the audit trail)",
                ));
            }
            v.push(need(
                &objects.search_index,
                "SELECT",
                "[retention] keeping audit rows the indexer has yet to index",
            ));
        }
        if r.dead_letter_days > 0 {
            v.push(need(
                &objects.dead_letters,
                "DELETE",
                "[retention] dead_letter_days",
            ));
        }
    }
    v
}

/// Checks that our tables exist and that the current role holds every privilege in `needs`.
/// Returns warnings to log; a missing table or privilege, or a change log whose rows are hidden
/// from this role by row-level security, is an error naming what to grant.
pub async fn check(
    client: &tokio_postgres::Client,
    objects: &Objects,
    needs: &[Need],
) -> Result<Vec<String>, StoreError> {
    let mut tables = vec![
        &objects.change_log,
        &objects.checkpoints,
        &objects.dead_letters,
        &objects.action_log,
    ];
    for n in needs {
        if !tables.contains(&&n.table) {
            tables.push(&n.table);
        }
    }
    for t in tables {
        let row = client
            .query_one(
                "SELECT has_schema_privilege(current_user, $1, 'USAGE'),
                        to_regclass($2) IS NOT NULL",
                &[&t.schema, &t.sql()],
            )
            .await;
        let row = match row {
            Ok(row) => row,
            // has_schema_privilege raises for a schema that does not exist.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME) => {
                return Err(StoreError::NotMigrated(format!(
                    "schema {} does not exist",
                    t.schema
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let (usage, exists): (bool, bool) = (row.get(0), row.get(1));
        if !usage {
            return Err(StoreError::Privileges(format!(
                "role cannot use schema {} (GRANT USAGE ON SCHEMA {} TO <role>)",
                t.schema,
                crate::schema::quote_ident(&t.schema)
            )));
        }
        if !exists {
            return Err(StoreError::NotMigrated(format!("table {t} does not exist")));
        }
    }
    let mut missing: Vec<String> = Vec::new();
    for n in needs {
        let ok: bool = client
            .query_one(
                "SELECT has_table_privilege(current_user, $1, $2)",
                &[&n.table.sql(), &n.privilege],
            )
            .await?
            .get(0);
        if !ok {
            missing.push(format!(
                "{} on {} ({}): GRANT {} ON {} TO <role>",
                n.privilege,
                n.table,
                n.why,
                n.privilege,
                n.table.sql()
            ));
        }
    }
    if !missing.is_empty() {
        return Err(StoreError::Privileges(missing.join("; ")));
    }
    let mut warnings = row_security(client, &objects.change_log).await?;
    warnings.extend(wake_up(client, &objects.change_log).await?);
    Ok(warnings)
}

/// Whether the change log carries the wake-up `migrate` installs (a deferred constraint
/// trigger). Without it deliveries wait for the poll; with the per-statement NOTIFY trigger of
/// earlier builds they arrive, but every notifying commit of the application waits for the one
/// before it.
async fn wake_up(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Option<String>, StoreError> {
    let deferred: Option<bool> = client
        .query_opt(
            "SELECT t.tgdeferrable FROM pg_trigger t
              WHERE t.tgrelid = $1::text::regclass AND t.tgname = 'fraiseql_observers_notify'
                AND t.tgenabled <> 'D'",
            &[&table.sql()],
        )
        .await?
        .map(|r| r.get(0));
    Ok(match deferred {
        Some(true) => None,
        Some(false) => Some(format!(
            "the wake-up trigger on {table} is from an earlier build (one NOTIFY per statement,              which makes the application's concurrent commits wait for each other): run              `fraiseql-observers migrate` to replace it"
        )),
        None => Some(format!(
            "no enabled wake-up trigger (fraiseql_observers_notify) on {table}: changes are              read every listener.poll_interval_ms instead of at once; run `fraiseql-observers              migrate`"
        )),
    })
}

/// Whether row-level security filters what this role reads from the change log. No applicable
/// policy means every row is hidden: an error. Applicable policies mean rows they exclude are
/// never delivered: a warning naming them.
async fn row_security(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Vec<String>, StoreError> {
    let row = client
        .query_one(
            "SELECT c.relrowsecurity, c.relforcerowsecurity,
                    pg_has_role(current_user, c.relowner, 'USAGE'),
                    r.rolbypassrls OR r.rolsuper,
                    current_user::text,
                    ARRAY(SELECT p.policyname::text FROM pg_policies p
                           WHERE p.schemaname = $2 AND p.tablename = $3
                             AND p.cmd IN ('SELECT', 'ALL') AND p.permissive = 'PERMISSIVE'
                             AND ('public' = ANY(p.roles) OR EXISTS (
                                   SELECT 1 FROM unnest(p.roles) pr
                                    WHERE pr <> 'public' AND pg_has_role(current_user, pr, 'USAGE')))
                           ORDER BY 1)
               FROM pg_class c, pg_roles r
              WHERE c.oid = $1::text::regclass AND r.rolname = current_user",
            &[&table.sql(), &table.schema, &table.table],
        )
        .await?;
    let (enabled, forced, owner, bypass, role): (bool, bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let policies: Vec<String> = row.get(5);
    let applies = enabled && !bypass && (!owner || forced);
    if !applies {
        return Ok(Vec::new());
    }
    if policies.is_empty() {
        return Err(StoreError::Privileges(format!(
            "row-level security is enabled on {table} and role {role} can see none of its rows \
             (it is not the owner{}, has no BYPASSRLS and no policy lets it read): no event \
             would ever be delivered. Grant it BYPASSRLS (ALTER ROLE {} BYPASSRLS) or make it \
             the table's owner; see docs/security.md",
            if forced && owner {
                ", or the table forces row security on its owner"
            } else {
                ""
            },
            crate::schema::quote_ident(&role)
        )));
    }
    Ok(vec![format!(
        "row-level security policies ({}) filter what role {role} reads from {table}: events \
         they hide are never delivered. To deliver every event, grant the role BYPASSRLS or \
         ownership (docs/security.md)",
        policies.join(", ")
    )])
}
