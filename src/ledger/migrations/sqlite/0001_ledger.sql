-- The fleet ledger (SQLite). The PostgreSQL twin of this file is ../postgres/0001_ledger.sql: the
-- two must declare the same tables and columns, since both backends run the same DML.
-- Times are RFC 3339 text in UTC (sqlx's encoding of DateTime<Utc>); *_us columns are
-- microseconds since the Unix epoch, for arithmetic that must be the same on both backends.

-- Append-only history: one row per EC2 action, observed instance state change, deploy step and
-- secret sync. `payload` is the whole event as JSON; the other columns are for querying.
CREATE TABLE IF NOT EXISTS ledger_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key    TEXT    NOT NULL UNIQUE,
    at           TEXT    NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('ec2_action', 'instance_state', 'deploy_step', 'secret_sync')),
    namespace    TEXT,
    sandbox      TEXT,
    environment  TEXT,
    instance_id  TEXT,
    action       TEXT,
    state        TEXT,
    deploy       TEXT,
    tag          TEXT,
    step         TEXT,
    bundle       TEXT,
    target_kind  TEXT,
    target_name  TEXT,
    content_hash TEXT,
    request_id   TEXT,
    outcome      TEXT,
    message      TEXT,
    payload      TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_ledger_events_kind_at ON ledger_events (kind, at);
CREATE INDEX IF NOT EXISTS idx_ledger_events_sandbox ON ledger_events (namespace, sandbox, id);
CREATE INDEX IF NOT EXISTS idx_ledger_events_instance ON ledger_events (instance_id, id);

-- Power intervals, derived from instance_state events: [start_us, stop_us) while an instance ran.
-- stop_us is NULL while it still runs; at most one open interval per instance.
CREATE TABLE IF NOT EXISTS power_intervals (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id   TEXT    NOT NULL,
    namespace     TEXT,
    name          TEXT,
    instance_type TEXT,
    market        TEXT    NOT NULL CHECK (market IN ('on-demand', 'spot')),
    start_us      BIGINT  NOT NULL,
    stop_us       BIGINT,
    started_at    TEXT    NOT NULL,
    stopped_at    TEXT,
    stop_reason   TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_power_intervals_open ON power_intervals (instance_id) WHERE stop_us IS NULL;
CREATE INDEX IF NOT EXISTS idx_power_intervals_instance ON power_intervals (instance_id, start_us);
CREATE INDEX IF NOT EXISTS idx_power_intervals_start ON power_intervals (start_us);

-- The fleet as the cluster has it, one row per Sandbox, with the column names (and enum values)
-- of the seeds' `sandboxes` table so existing SQL dashboards keep working. The enums are TEXT
-- with CHECK constraints (the same DML binds text on both backends). Extra columns of ours:
-- namespace, phase, market, stop_reason, failure_reason.
CREATE TABLE IF NOT EXISTS sandboxes (
    id                       TEXT    NOT NULL PRIMARY KEY,
    namespace                TEXT    NOT NULL,
    name                     TEXT    NOT NULL,
    environment              TEXT    NOT NULL CHECK (environment IN ('dev', 'staging', 'prod')),
    instance_id              TEXT,
    instance_type            TEXT,
    public_ip                TEXT,
    private_ip               TEXT,
    status                   TEXT    NOT NULL DEFAULT 'provisioning' CHECK (status IN ('provisioning', 'active', 'deploying', 'unhealthy', 'stopping', 'stopped', 'terminating', 'terminated')),
    health_status            TEXT    NOT NULL DEFAULT 'unknown' CHECK (health_status IN ('healthy', 'degraded', 'unhealthy', 'unknown')),
    last_health_check_at     TEXT,
    capacity                 INTEGER NOT NULL DEFAULT 5,
    current_load             INTEGER NOT NULL DEFAULT 0,
    ssh_key_name             TEXT,
    novnc_url                TEXT,
    adspower_version         TEXT,
    browser_engine           TEXT    NOT NULL DEFAULT 'adspower' CHECK (browser_engine IN ('chromium', 'adspower')),
    browser_config           TEXT    DEFAULT '{}',
    tags                     TEXT    DEFAULT '{}',
    ec2_status               TEXT    CHECK (ec2_status IN ('pending', 'running', 'stopping', 'stopped', 'shutting-down', 'terminated')),
    last_started_at          TEXT,
    last_stopped_at          TEXT,
    auto_stop_enabled        BOOLEAN NOT NULL DEFAULT FALSE,
    idle_minutes_before_stop INTEGER NOT NULL DEFAULT 30,
    machine_type             TEXT    NOT NULL DEFAULT 'ec2',
    agent_version            TEXT,
    agent_last_seen_at       TEXT,
    gh_image_tag             TEXT,
    gh_image_updated_at      TEXT,
    deployed_commit_sha      TEXT,
    phase                    TEXT,
    market                   TEXT    CHECK (market IN ('on-demand', 'spot')),
    stop_reason              TEXT,
    failure_reason           TEXT,
    created_at               TEXT    NOT NULL,
    updated_at               TEXT    NOT NULL,
    UNIQUE (namespace, name)
);
CREATE INDEX IF NOT EXISTS idx_sandboxes_environment ON sandboxes (environment);
CREATE INDEX IF NOT EXISTS idx_sandboxes_status ON sandboxes (status);
CREATE INDEX IF NOT EXISTS idx_sandboxes_health_status ON sandboxes (health_status);
CREATE INDEX IF NOT EXISTS idx_sandboxes_env_status ON sandboxes (environment, status);
CREATE INDEX IF NOT EXISTS idx_sandboxes_status_health ON sandboxes (status, health_status);
CREATE INDEX IF NOT EXISTS idx_sandboxes_updated_at ON sandboxes (updated_at);
CREATE INDEX IF NOT EXISTS idx_sandboxes_instance_id ON sandboxes (instance_id);
