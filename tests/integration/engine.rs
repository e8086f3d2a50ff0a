//! The test Docker engine itself: the registry refuses anonymous pulls, the worker image's tags
//! run on the engine with host networking, and the worker reports the environment it was
//! started with (what the agent's tests read to see what a running container really has).

use std::time::Duration;

use sandbox_operator::testenv::docker::{HEALTHY_TAGS, UNHEALTHY_TAG};
use sandbox_operator::testenv::free_port;

use crate::support::docker_engine;

async fn get(url: &str) -> (u16, serde_json::Value) {
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await {
            let code = r.status().as_u16();
            return (code, r.json().await.unwrap_or(serde_json::Value::Null));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answered {url}");
}

#[tokio::test]
async fn worker_image_runs_on_the_engine_from_the_registry() {
    let engine = docker_engine();
    let repo = engine.registry().worker_repository();

    // The registry wants credentials: a client without the login is refused.
    let anon = tempfile::tempdir().unwrap();
    std::fs::write(anon.path().join("config.json"), "{}").unwrap();
    let out = engine
        .command()
        .env("DOCKER_CONFIG", anon.path())
        .args(["pull", &format!("{repo}:{}", HEALTHY_TAGS[0])])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an anonymous pull was let through");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no basic auth credentials") || err.contains("unauthorized"),
        "{err}"
    );

    let api = free_port();
    let worker = free_port();
    let name = format!("engine-smoke-{}", std::process::id());
    engine
        .docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "-e",
            &format!("GH_API_PORT={api}"),
            "-e",
            &format!("GH_WORKER_PORT={worker}"),
            "-e",
            "PLAIN_SETTING=hello",
            &format!("{repo}:{}", HEALTHY_TAGS[1]),
        ])
        .expect("docker run");
    let (code, body) = get(&format!("http://127.0.0.1:{api}/health")).await;
    assert_eq!(code, 200, "{body}");
    let (_, env) = get(&format!("http://127.0.0.1:{worker}/test/env")).await;
    assert_eq!(env["PLAIN_SETTING"], "hello", "{env}");
    assert_eq!(env["GH_BUILD"], HEALTHY_TAGS[1], "{env}");
    let (_, status) = get(&format!("http://127.0.0.1:{worker}/worker/status")).await;
    assert_eq!(status["deploy_safe"], true, "{status}");
    let image = engine
        .docker(&["inspect", "--format", "{{.Config.Image}}", &name])
        .unwrap();
    assert_eq!(image.trim(), format!("{repo}:{}", HEALTHY_TAGS[1]));
    engine.docker(&["rm", "-f", &name]).unwrap();

    // The unhealthy tag answers its health check with 503.
    let api = free_port();
    let name = format!("engine-bad-{}", std::process::id());
    engine
        .docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "-e",
            &format!("GH_API_PORT={api}"),
            "-e",
            "GH_ROLE=api",
            &format!("{repo}:{UNHEALTHY_TAG}"),
        ])
        .expect("docker run");
    let (code, _) = get(&format!("http://127.0.0.1:{api}/health")).await;
    assert_eq!(code, 503);
    engine.docker(&["rm", "-f", &name]).unwrap();
}
