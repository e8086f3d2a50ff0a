//! Restarting an allow-listed service (`POST /restart`, and `PUT /env`'s `restartServices`) so
//! that it runs with the env file just written, and checking that it came back.
//!
//! | action            | what it does                                                        | then, without `healthUrl`              |
//! |-------------------|---------------------------------------------------------------------|----------------------------------------|
//! | `systemdUnit`     | `systemctl restart UNIT` (systemd re-reads `EnvironmentFile=`)      | `systemctl is-active UNIT` says active |
//! | `composeService`  | `docker compose up -d --force-recreate --no-deps -t GRACE SERVICE`: a new container, which reads its `env_file` (a `restart` keeps the old environment) | its containers run (and are healthy, with a health check) |
//! | `targetedWorkers` | each running targeted worker replaced on its own image, with its env files read again | each answers on its status port |
//! | `command`         | the command (argv)                                                  | --                                     |
//!
//! With `healthUrl`, the URL must answer 2xx within `deploy.healthCheckTries` tries. The whole
//! restart is bounded by `limits.restartTimeout`.

use crate::agent::daemon::config::{AgentConfig, ServiceAction};
use crate::agent::daemon::containers::{self, Engine};
use crate::agent::daemon::exec::{self, Redactor};
use crate::agent::protocol::RestartResponse;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Restarts `name` as `action` says and checks it, within `limits.restartTimeout`.
pub async fn restart(
    cfg: &AgentConfig,
    redactor: &Redactor,
    http: &reqwest::Client,
    name: &str,
    action: &ServiceAction,
) -> RestartResponse {
    let limit = cfg.limits.restart_timeout.0;
    let start = Instant::now();
    let (success, message) =
        match tokio::time::timeout(limit, restart_and_check(cfg, redactor, http, action, limit))
            .await
        {
            Ok(Ok(done)) => (true, format!("{name} {done} ({})", containers::secs(start))),
            Ok(Err(e)) => (false, format!("restarting {name}: {e}")),
            Err(_) => (
                false,
                format!(
                    "restarting {name}: not done within {} (limits.restartTimeout)",
                    cfg.limits.restart_timeout
                ),
            ),
        };
    // Masked once more as a whole before it is logged or answered (a health URL's answer or
    // an error may quote the env file).
    let message = redactor.redact(&message);
    tracing::info!(service = name, success, detail = %message, "service restart");
    RestartResponse {
        success,
        service: name.into(),
        message,
    }
}

/// `Ok(what was done)`, or why not.
async fn restart_and_check(
    cfg: &AgentConfig,
    redactor: &Redactor,
    http: &reqwest::Client,
    action: &ServiceAction,
    timeout: Duration,
) -> Result<String, String> {
    let engine = Engine { cfg, redactor };
    let d = &cfg.deploy;
    let run = |program: PathBuf, args: Vec<OsString>| async move {
        match exec::run(&program, &args, timeout).await {
            Ok(out) if out.success() => Ok(()),
            Ok(out) => Err(out.describe(redactor)),
            Err(e) => Err(redactor.redact(&e.to_string())),
        }
    };
    let done = if let Some(unit) = &action.systemd_unit {
        run(cfg.systemctl.clone(), vec!["restart".into(), unit.into()]).await?;
        if action.health_url.is_none() {
            wait_unit_active(cfg, redactor, unit).await?;
        }
        "restarted".to_string()
    } else if let Some(svc) = &action.compose_service {
        engine.recreate_compose_service(svc, timeout).await?;
        if action.health_url.is_none() {
            wait_compose_running(&engine, svc)
                .await
                .map_err(|e| format!("recreated, but {e}"))?;
        }
        "recreated".to_string()
    } else if action.targeted_workers == Some(true) {
        let specs = engine.targeted_specs().await?;
        let mut names = Vec::new();
        for spec in &specs {
            let Some(tag) = spec.tag.as_deref() else {
                return Err(format!(
                    "{}: the tag of its image is unknown; not recreated",
                    spec.name
                ));
            };
            engine.replace_worker(http, spec, &spec.image(tag)).await?;
            names.push(spec.name.clone());
        }
        if names.is_empty() {
            "had no running targeted worker to recreate".to_string()
        } else {
            format!("recreated {}", names.join(", "))
        }
    } else if let Some(argv) = action.command.as_ref().filter(|a| !a.is_empty()) {
        run(
            PathBuf::from(&argv[0]),
            argv[1..].iter().map(OsString::from).collect(),
        )
        .await?;
        "restarted".to_string()
    } else {
        return Err("no restart action configured".into());
    };
    if let Some(url) = &action.health_url {
        let tries = containers::wait_http_ok(
            http,
            url,
            d.health_check_tries,
            d.health_check_interval.0,
            d.health_check_timeout.0,
        )
        .await
        .map_err(|e| format!("{done}, but {e}"))?;
        return Ok(format!("{done}, healthy at try {tries}"));
    }
    Ok(done)
}

/// Polls `systemctl is-active UNIT` until it says `active` (`deploy.healthCheckTries` tries).
async fn wait_unit_active(
    cfg: &AgentConfig,
    redactor: &Redactor,
    unit: &str,
) -> Result<(), String> {
    let d = &cfg.deploy;
    let mut last = String::new();
    for attempt in 1..=d.health_check_tries {
        let args: Vec<OsString> = vec!["is-active".into(), unit.into()];
        match exec::run(&cfg.systemctl, &args, cfg.probe_timeout.0).await {
            Ok(out) if out.stdout.trim() == "active" => return Ok(()),
            Ok(out) if out.stdout.trim().is_empty() => last = out.describe(redactor),
            Ok(out) => last = out.stdout.trim().to_string(),
            Err(e) => last = redactor.redact(&e.to_string()),
        }
        if matches!(last.as_str(), "failed" | "inactive") && attempt > 1 {
            break;
        }
        if attempt < d.health_check_tries {
            tokio::time::sleep(d.health_check_interval.0).await;
        }
    }
    Err(format!("restarted, but {unit} is not active ({last})"))
}

/// Polls the compose service's containers until they run (and are healthy, with a check).
async fn wait_compose_running(engine: &Engine<'_>, svc: &str) -> Result<(), String> {
    let d = &engine.cfg.deploy;
    let mut last = String::new();
    for attempt in 1..=d.health_check_tries {
        match engine
            .compose_service_state(svc, engine.cfg.probe_timeout.0)
            .await
        {
            Ok(()) => return Ok(()),
            Err((true, e)) => return Err(e),
            Err((false, e)) => last = e,
        }
        if attempt < d.health_check_tries {
            tokio::time::sleep(d.health_check_interval.0).await;
        }
    }
    Err(format!(
        "not running after {} tries ({last})",
        d.health_check_tries
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::daemon::config::Dur;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(dir: &std::path::Path) -> AgentConfig {
        let mut c = AgentConfig {
            systemctl: dir.join("systemctl"),
            ..Default::default()
        };
        c.deploy.health_check_tries = 3;
        c.deploy.health_check_interval = Dur::millis(20);
        c.deploy.health_check_timeout = Dur::millis(500);
        c
    }

    /// A systemctl that restarts fine and then reports `state` for is-active.
    fn systemctl(dir: &std::path::Path, state: &str) {
        let p = dir.join("systemctl");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}/calls\n[ \"$1\" = is-active ] && {{ echo {state}; [ {state} = active ]; exit $?; }}\nexit 0\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn unit(u: &str) -> ServiceAction {
        ServiceAction {
            systemd_unit: Some(u.into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_unit_that_does_not_come_back_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let http = reqwest::Client::new();
        systemctl(dir.path(), "active");
        let r = restart(&c, &Redactor::default(), &http, "vw", &unit("valet-worker")).await;
        assert!(r.success, "{r:?}");
        assert!(r.message.starts_with("vw restarted"), "{r:?}");
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(calls, "restart valet-worker\nis-active valet-worker\n");

        systemctl(dir.path(), "failed");
        let r = restart(&c, &Redactor::default(), &http, "vw", &unit("valet-worker")).await;
        assert!(!r.success);
        assert_eq!(
            r.message,
            "restarting vw: restarted, but valet-worker is not active (failed)"
        );
    }

    #[tokio::test]
    async fn a_health_url_that_never_answers_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let action = ServiceAction {
            command: Some(vec!["true".into()]),
            health_url: Some(format!("http://{dead}/health")),
            ..Default::default()
        };
        let r = restart(
            &c,
            &Redactor::default(),
            &reqwest::Client::new(),
            "x",
            &action,
        )
        .await;
        assert!(!r.success);
        assert!(
            r.message
                .starts_with("restarting x: restarted, but not healthy after 3 tries"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn the_restart_timeout_bounds_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.limits.restart_timeout = Dur::millis(200);
        let action = ServiceAction {
            command: Some(vec!["sleep".into(), "5".into()]),
            ..Default::default()
        };
        let start = Instant::now();
        let r = restart(
            &c,
            &Redactor::default(),
            &reqwest::Client::new(),
            "x",
            &action,
        )
        .await;
        assert!(!r.success);
        // Whichever fires first, the whole restart's bound or the command's own (the same
        // 200 ms), the message says the restart did not finish in time.
        assert!(
            r.message.contains("limits.restartTimeout")
                || r.message.contains("did not finish within 200ms"),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(4));
    }
}
