//! Reading the fleet: the seeds' `sandboxes` table over sqlx, EC2 instances over the SDK. Each
//! returns plain records for [`super::plan`]; nothing is decided here.

use std::collections::BTreeMap;

use sqlx::Connection;

use super::plan::{Ec2Instance, TableRow};

/// What can go wrong reading a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A schema or table name that is not a plain SQL identifier.
    #[error("{what} {name:?} is not a plain SQL identifier (letters, digits, _)")]
    Identifier {
        /// `--schema` or `--table`.
        what: &'static str,
        /// The value.
        name: String,
    },
    /// Connecting to the database (the URL is shown without its credentials).
    #[error("connecting to {target}: {message}")]
    Connecting {
        /// The URL without user, password or query.
        target: String,
        /// sqlx's message, with the password scrubbed.
        message: String,
    },
    /// The table is not there.
    #[error(
        "no table {schema}.{table} in {target}: is this the old admin API's database (migration 0004_add_sandboxes)?"
    )]
    TableMissing {
        /// The schema.
        schema: String,
        /// The table.
        table: String,
        /// The URL without credentials.
        target: String,
    },
    /// A column the import cannot do without.
    #[error("table {schema}.{table} has no column {column}: is this the seeds' sandboxes table?")]
    ColumnMissing {
        /// The schema.
        schema: String,
        /// The table.
        table: String,
        /// The column.
        column: &'static str,
    },
    /// Reading the rows.
    #[error("reading {schema}.{table}: {message}")]
    Reading {
        /// The schema.
        schema: String,
        /// The table.
        table: String,
        /// sqlx's message, with the password scrubbed.
        message: String,
    },
    /// DescribeInstances failed.
    #[error("DescribeInstances: {0}")]
    Ec2(String),
}

/// `url` without its user, password and query string: what error messages may show.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let rest = rest.rsplit_once('@').map(|(_, host)| host).unwrap_or(rest);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
}

/// The secret parts of `url`: the password in the user info and `password=` in the query.
fn secrets_of(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    if let Some((userinfo, _)) = before_query.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        out.push(password.to_owned());
    }
    for pair in query.split('&') {
        if let Some(("password", v)) = pair.split_once('=')
            && !v.is_empty()
        {
            out.push(v.to_owned());
        }
    }
    out
}

/// `s` with `%XX` escapes decoded (what a driver sees of a URL's password).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `message` with every secret part of `url` replaced, as written and percent-decoded.
pub fn scrub(message: &str, url: &str) -> String {
    let mut m = message.to_owned();
    for s in secrets_of(url) {
        for form in [percent_decode(&s), s] {
            if !form.is_empty() {
                m = m.replace(&form, "***");
            }
        }
    }
    m
}

fn identifier(what: &'static str, name: &str) -> Result<String, SourceError> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if ok {
        Ok(format!("\"{name}\""))
    } else {
        Err(SourceError::Identifier {
            what,
            name: name.to_owned(),
        })
    }
}

/// The columns read, with the SQL type each is cast to (enums as text, so an unknown value
/// reaches the mapping and becomes a `skip` line instead of failing the read).
const COLUMNS: &[(&str, &str)] = &[
    ("id", "text"),
    ("name", "text"),
    ("environment", "text"),
    ("instance_id", "text"),
    ("instance_type", "text"),
    ("status", "text"),
    ("ec2_status", "text"),
    ("capacity", "int4"),
    ("browser_engine", "text"),
    ("auto_stop_enabled", "bool"),
    ("idle_minutes_before_stop", "int4"),
    ("tags", "text"),
    ("browser_config", "text"),
];
/// Without these there is nothing to import.
const REQUIRED: &[&str] = &["id", "environment", "instance_id"];

/// The SELECT for a table with these columns: absent optional columns read as NULL (a database
/// migrated only part of the way, say before 0007 or 0009), oldest rows first.
pub fn select_sql(schema: &str, table: &str, present: &[String]) -> Result<String, SourceError> {
    let qualified = format!(
        "{}.{}",
        identifier("--schema", schema)?,
        identifier("--table", table)?
    );
    for column in REQUIRED {
        if !present.iter().any(|p| p == column) {
            return Err(SourceError::ColumnMissing {
                schema: schema.to_owned(),
                table: table.to_owned(),
                column,
            });
        }
    }
    let list: Vec<String> = COLUMNS
        .iter()
        .map(|(c, ty)| {
            if present.iter().any(|p| p == c) {
                format!("\"{c}\"::{ty} AS \"{c}\"")
            } else {
                format!("NULL::{ty} AS \"{c}\"")
            }
        })
        .collect();
    let order = if present.iter().any(|p| p == "created_at") {
        "\"created_at\" ASC NULLS LAST, \"id\"::text ASC"
    } else {
        "\"id\"::text ASC"
    };
    Ok(format!(
        "SELECT {} FROM {qualified} ORDER BY {order}",
        list.join(", ")
    ))
}

/// Every row of `schema.table`, oldest first.
pub async fn read_table(
    url: &str,
    schema: &str,
    table: &str,
) -> Result<Vec<TableRow>, SourceError> {
    // Checked before connecting: a bad name is a usage error whatever the database says.
    identifier("--schema", schema)?;
    identifier("--table", table)?;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| SourceError::Connecting {
            target: redact_url(url),
            message: scrub(&e.to_string(), url),
        })?;
    let reading = |e: sqlx::Error| SourceError::Reading {
        schema: schema.to_owned(),
        table: table.to_owned(),
        message: scrub(&e.to_string(), url),
    };
    let present: Vec<(String,)> = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut conn)
    .await
    .map_err(reading)?;
    if present.is_empty() {
        let _ = conn.close().await;
        return Err(SourceError::TableMissing {
            schema: schema.to_owned(),
            table: table.to_owned(),
            target: redact_url(url),
        });
    }
    let present: Vec<String> = present.into_iter().map(|(c,)| c).collect();
    let sql = select_sql(schema, table, &present)?;
    let rows: Vec<TableRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut conn)
        .await
        .map_err(reading)?;
    let _ = conn.close().await;
    Ok(rows)
}

/// One DescribeInstances page, retried with backoff while EC2 throttles (the SDK's own retries
/// are off in [`crate::ec2::sdk_client`]).
async fn describe_page(
    client: &aws_sdk_ec2::Client,
    filters: &[aws_sdk_ec2::types::Filter],
    token: Option<String>,
) -> Result<aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput, SourceError> {
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    let mut delay = std::time::Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        let result = client
            .describe_instances()
            .set_filters(Some(filters.to_vec()))
            .max_results(crate::ec2::MAX_RESULTS)
            .set_next_token(token.clone())
            .send()
            .await;
        match result {
            Ok(page) => return Ok(page),
            Err(e) => {
                let code = e.code().map(str::to_owned);
                if attempt < 6
                    && code
                        .as_deref()
                        .is_some_and(crate::ec2::error::is_throttling_code)
                {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                    continue;
                }
                return Err(SourceError::Ec2(match (code, e.message()) {
                    (Some(code), Some(message)) => format!("{code}: {message}"),
                    (Some(code), None) => code,
                    _ => aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
                }));
            }
        }
    }
}

/// Instances with all of `tags` (values of one key are alternatives), oldest launch first.
pub async fn read_ec2(
    client: &aws_sdk_ec2::Client,
    tags: &[(String, String)],
) -> Result<Vec<Ec2Instance>, SourceError> {
    use aws_sdk_ec2::types::Filter;
    let mut by_key: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (k, v) in tags {
        by_key.entry(k.as_str()).or_default().push(v.clone());
    }
    let filters: Vec<Filter> = by_key
        .into_iter()
        .map(|(k, vs)| {
            Filter::builder()
                .name(format!("tag:{k}"))
                .set_values(Some(vs))
                .build()
        })
        .collect();
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = describe_page(client, &filters, token.take()).await?;
        for r in page.reservations() {
            for i in r.instances() {
                let Some(id) = i.instance_id().filter(|s| !s.is_empty()) else {
                    continue;
                };
                out.push(Ec2Instance {
                    id: id.to_owned(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_else(|| "pending".into()),
                    instance_type: i.instance_type().map(|t| t.as_str().to_owned()),
                    launch_time: i.launch_time().and_then(|t| {
                        jiff::Timestamp::new(t.secs(), i32::try_from(t.subsec_nanos()).unwrap_or(0))
                            .ok()
                    }),
                    tags: i
                        .tags()
                        .iter()
                        .filter_map(|t| {
                            Some((
                                t.key()?.to_owned(),
                                t.value().unwrap_or_default().to_owned(),
                            ))
                        })
                        .collect(),
                });
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => break,
        }
    }
    out.sort_by(|a, b| (a.launch_time, &a.id).cmp(&(b.launch_time, &b.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        let url = "postgres://admin:s3cr%21t@db.example:5432/valet?sslmode=require&password=other";
        assert_eq!(redact_url(url), "postgres://db.example:5432/valet");
        let m = scrub(
            "password authentication failed: s3cr%21t / s3cr!t / other",
            url,
        );
        assert!(
            !m.contains("s3cr%21t") && !m.contains("s3cr!t") && !m.contains("other"),
            "{m}"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn the_select_reads_what_is_there_and_nulls_the_rest() {
        let present: Vec<String> = [
            "id",
            "name",
            "environment",
            "instance_id",
            "status",
            "capacity",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let sql = select_sql("public", "sandboxes", &present).unwrap();
        assert!(
            sql.contains("\"environment\"::text AS \"environment\""),
            "{sql}"
        );
        assert!(sql.contains("NULL::text AS \"browser_engine\""), "{sql}");
        assert!(sql.contains("NULL::bool AS \"auto_stop_enabled\""), "{sql}");
        assert!(sql.contains("FROM \"public\".\"sandboxes\""), "{sql}");
        assert!(sql.ends_with("ORDER BY \"id\"::text ASC"), "{sql}");

        let missing = select_sql("public", "sandboxes", &present[..2]).unwrap_err();
        assert!(
            missing.to_string().contains("no column environment"),
            "{missing}"
        );
        let bad = select_sql("public; drop", "sandboxes", &present).unwrap_err();
        assert!(
            matches!(
                bad,
                SourceError::Identifier {
                    what: "--schema",
                    ..
                }
            ),
            "{bad}"
        );
    }
}
