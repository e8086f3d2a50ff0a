//! `spec.agent.bootstrap` end to end: the real operator binary against the shared control plane
//! and a moto EC2 endpoint of the test's own; the user data it renders read back from the
//! endpoint (DescribeInstanceAttribute) and run by this test as cloud-init would, in a scratch
//! root, against the `make dist` tarball (packed by hack/dist.sh from the debug agent) served
//! over local HTTP; the agent that script starts is what the operator then probes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{Sandbox, SandboxStatus};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::support::{self, Operator};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sandbox-agent");

struct Env {
    client: kube::Client,
    ns: String,
    ec2: Ec2Endpoint,
    ami: String,
    sbx: Api<Sandbox>,
    secrets: Api<Secret>,
}

async fn env(test: &str) -> Env {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let ec2 =
        Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(Duration::from_secs(1)))
            .await
            .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    Env {
        sbx: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        ec2,
        ami,
    }
}

fn cond(s: &SandboxStatus, t: &str) -> Option<(String, String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

impl Env {
    async fn apply(&self, name: &str, spec: serde_json::Value) {
        let obj = serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.sbx
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }

    async fn wait(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&SandboxStatus) -> bool,
    ) -> SandboxStatus {
        let mut last = SandboxStatus::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(s) = self.sbx.get(name).await {
                last = s.status.unwrap_or_default();
                if f(&last) {
                    return last;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: timed out after {secs}s waiting for {what}; last status: {}",
                serde_json::to_string_pretty(&last).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn user_data(&self, instance: &str) -> String {
        use base64::Engine as _;
        let attr = self
            .ec2
            .client()
            .await
            .describe_instance_attribute()
            .instance_id(instance)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let b64 = attr
            .user_data()
            .and_then(|v| v.value())
            .expect("the instance has user data");
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }

    async fn token_secret(&self, sandbox: &str) -> (Secret, String) {
        let s = self
            .secrets
            .get(&format!("{sandbox}-agent-token"))
            .await
            .expect("the minted token Secret");
        let token = String::from_utf8(s.data.as_ref().unwrap()["token"].0.clone()).unwrap();
        (s, token)
    }

    async fn events(&self) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default()).await.unwrap().items
    }
}

/// The `make dist` tarball of the debug agent (hack/dist.sh packs a given binary: no release
/// build here), its file name and sha256.
fn dist_tarball(out: &Path) -> (PathBuf, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = std::process::Command::new(root.join("hack/dist.sh"))
        .args(["--binary", AGENT_BIN, "--out"])
        .arg(out)
        .output()
        .expect("running hack/dist.sh");
    assert!(o.status.success(), "dist.sh: {}", support::text(&o));
    let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()));
    (path, name, sha)
}

/// Serves the tarball at `/dist/<name>` and a stand-in worker (status and health) the agent's
/// configuration points at. Returns its address.
async fn serve(tarball: &Path, name: &str) -> std::net::SocketAddr {
    use axum::routing::{get, post};
    let bytes = std::fs::read(tarball).unwrap();
    let router = axum::Router::new()
        .route(
            &format!("/dist/{name}"),
            get(move || {
                let b = bytes.clone();
                async move { b }
            }),
        )
        .route(
            "/worker/status",
            get(|| async {
                axum::Json(serde_json::json!({"activeWorkers": 0, "deploy_safe": true}))
            }),
        )
        .route("/worker/drain", post(|| async { "{}" }))
        .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// The agent the bootstrap script started in the scratch root (no systemd there: in the
/// background, its pid in `run/sandbox-agent.pid`); killed when dropped.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(self.0.join("run/sandbox-agent.pid"))
            && let Ok(pid) = p.trim().parse::<i32>()
        {
            // SAFETY: sending a signal to the process this test's script started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs the user data as cloud-init runs a `#!` user-data script (written to a file, executed),
/// with only SANDBOX_BOOTSTRAP_ROOT set to put everything under `root` instead of `/`.
async fn run_as_cloud_init(user_data: &str, dir: &Path, root: &Path) -> std::process::Output {
    let script = dir.join("part-001");
    std::fs::write(&script, user_data).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::create_dir_all(root).unwrap();
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(&script)
            .env("SANDBOX_BOOTSTRAP_ROOT", &root)
            .current_dir("/")
            .output()
            .expect("running the user data")
    })
    .await
    .unwrap()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A Sandbox with bootstrap launches with user data that carries the token of the Secret it
/// owns; that user data, run as cloud-init would, downloads and verifies the tarball, installs the
/// agent with the token and configuration and starts it; the agent answers /health only with
/// the minted token, and the Sandbox turns AgentRegistered=True and Ready. A launch whose
/// rendered user data is over 16 KiB is held (condition) with its token minted once and reused
/// when the spec is fixed. The token is in no operator log line, Event, status or ledger row.
#[tokio::test]
async fn bootstrapped_member_comes_up_working_and_its_token_is_nowhere_else() {
    let e = env("bootstrap-works").await;
    let tmp = tempfile::tempdir().unwrap();
    let (tarball, name, sha) = dist_tarball(&tmp.path().join("dist"));
    let web = serve(&tarball, &name).await;
    let port = sandbox_operator::testenv::free_port();
    let config = format!(
        "refreshInterval: 200ms\nprobeTimeout: 2s\nworker:\n  statusUrl: http://{web}/worker/status\n  drainUrl: http://{web}/worker/drain\n  healthUrl: http://{web}/health\nchecks: {{warnPercent: 99.5, failPercent: 99.9}}\n"
    );
    let spec = |config: &str| {
        serde_json::json!({
            "environment": "staging",
            "instanceType": "t3.large",
            "launch": {"imageId": e.ami},
            "agent": {
                "url": format!("http://127.0.0.1:{port}"),
                "port": port,
                "probeInterval": "1s",
                "timeout": "1s",
                "failureThreshold": 2,
                "bootstrap": {
                    "downloadUrl": format!("http://{web}/dist/{name}"),
                    "sha256": sha,
                    "registrationTimeout": "5m",
                    "config": config,
                },
            },
        })
    };
    let mut op = Operator::start(&e.ns, &e.ec2.url(), &[]);

    // Too large once rendered (the config travels base64-encoded): held before any EC2 call,
    // with its token minted already.
    let big = format!("{config}# {}\n", "x".repeat(12_000));
    e.apply("web-1", spec(&big)).await;
    let st = e
        .wait("web-1", 60, "BootstrapUserDataTooLarge", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "BootstrapUserDataTooLarge")
        })
        .await;
    let (_, _, msg) = cond(&st, "InstanceRunning").unwrap();
    assert!(msg.contains("16384"), "{msg}");
    assert!(st.instance.is_none());
    assert_eq!(e.ec2.calls().await.unwrap().accepted("RunInstances"), 0);
    let (held_secret, held_token) = e.token_secret("web-1").await;

    // Fixed: it launches, with the same token (minted once, reused).
    e.apply("web-1", spec(&config)).await;
    let st = e
        .wait("web-1", 60, "a launched instance", |s| s.instance.is_some())
        .await;
    let id = st.instance.as_ref().unwrap().id.clone();
    let (secret, token) = e.token_secret("web-1").await;
    assert_eq!(token, held_token, "the token is minted once");
    assert_eq!(
        secret.metadata.resource_version, held_secret.metadata.resource_version,
        "the Secret is not written again"
    );
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()), "hex");
    let sbx = e.sbx.get("web-1").await.unwrap();
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owners[0].kind, "Sandbox");
    assert_eq!(Some(&owners[0].uid), sbx.metadata.uid.as_ref());
    assert_eq!(owners[0].controller, Some(true));

    // The user data EC2 holds carries that token.
    let user_data = e.user_data(&id).await;
    assert!(user_data.starts_with("#!/bin/bash\n"));
    assert!(
        user_data.contains(&format!("agent_token='{token}'")),
        "the token is not in the user data"
    );
    assert!(user_data.contains(&format!("sha256='{sha}'")));
    assert_eq!(e.ec2.calls().await.unwrap().accepted("RunInstances"), 1);

    // Nothing answers yet: the registration is awaited, not failed.
    let st = e
        .wait("web-1", 60, "AgentRegistered awaited", |s| {
            cond(s, "AgentRegistered").is_some_and(|c| c.1 == "AwaitingRegistration")
        })
        .await;
    assert_eq!(cond(&st, "AgentRegistered").unwrap().0, "Unknown");
    assert_eq!(cond(&st, "Ready").unwrap().0, "False");

    // This test acts as cloud-init.
    let root = tmp.path().join("root");
    let _agent = Started(root.clone());
    let out = run_as_cloud_init(&user_data, tmp.path(), &root).await;
    let script_output = support::text(&out);
    assert!(
        out.status.success(),
        "the user data failed:\n{script_output}"
    );
    assert!(
        script_output.contains(&format!("listening on port {port}")),
        "{script_output}"
    );
    // What it installed, as on an instance (install.sh --root: same files and modes).
    let etc = root.join("etc/sandbox-agent");
    assert_eq!(
        std::fs::read_to_string(etc.join("token")).unwrap().trim(),
        token
    );
    assert_eq!(mode(&etc.join("token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(etc.join("agent.yaml")).unwrap(),
        config
    );
    assert!(root.join("usr/local/bin/sandbox-agent").is_file());
    assert!(
        root.join("etc/systemd/system/sandbox-agent.service")
            .is_file()
    );
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/sandbox-agent.service")
            .symlink_metadata()
            .is_ok(),
        "enabled"
    );
    assert_eq!(
        std::fs::read_to_string(
            root.join("etc/systemd/system/sandbox-agent.service.d/10-bootstrap.conf")
        )
        .unwrap(),
        "[Service]\nEnvironmentFile=/etc/sandbox-agent/bootstrap.env\n"
    );
    let env_file = std::fs::read_to_string(etc.join("bootstrap.env")).unwrap();
    assert!(
        env_file.contains(&format!("SANDBOX_AGENT_LISTEN=0.0.0.0:{port}"))
            && env_file.contains("SANDBOX_AGENT_REQUIRE_AUTH_FOR_HEALTH=true"),
        "{env_file}"
    );
    assert!(
        !root.join("var/lib/sandbox-agent-bootstrap/token").exists(),
        "the staged token is removed"
    );

    // The agent it started wants the minted token, even for /health.
    let http = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{port}/health");
    let anon = http.get(&health).send().await.unwrap();
    assert_eq!(anon.status().as_u16(), 401);
    let authed = http.get(&health).bearer_auth(&token).send().await.unwrap();
    assert_eq!(authed.status().as_u16(), 200);

    let st = e
        .wait("web-1", 90, "AgentRegistered=True and Ready", |s| {
            cond(s, "AgentRegistered").is_some_and(|c| c.0 == "True")
                && cond(s, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(cond(&st, "AgentRegistered").unwrap().1, "AgentReported");

    // An operator started again reads the same token from the Secret (nothing minted anew).
    op = op.restart(&e.ns, &e.ec2.url(), &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = e
        .wait("web-1", 30, "still Ready", |s| {
            cond(s, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(cond(&st, "AgentRegistered").unwrap().0, "True");
    let (again, _) = e.token_secret("web-1").await;
    assert_eq!(
        again.metadata.resource_version,
        secret.metadata.resource_version
    );

    // The token is nowhere else: operator log, Events, the Sandbox (status), the ledger, the
    // script's output and the agent's log.
    let ledger = op.ledger.clone();
    op.kill();
    let mut places = vec![
        ("operator log".to_string(), op.logs()),
        ("bootstrap script output".to_string(), script_output),
        (
            "agent log".to_string(),
            std::fs::read_to_string(root.join("var/log/sandbox-agent.log")).unwrap_or_default(),
        ),
    ];
    let events = e.events().await;
    assert!(
        events
            .iter()
            .any(|ev| ev.reason.as_deref() == Some("BootstrapUserDataTooLarge")),
        "no hold Event"
    );
    for ev in events {
        places.push((
            format!("event {}", ev.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&ev).unwrap(),
        ));
    }
    for s in e.sbx.list(&ListParams::default()).await.unwrap() {
        places.push(("Sandbox".into(), serde_json::to_string(&s).unwrap()));
    }
    let db = Path::new(ledger.strip_prefix("sqlite://").unwrap());
    let mut ledger_files = 0;
    for f in std::fs::read_dir(db.parent().unwrap()).unwrap() {
        let f = f.unwrap().path();
        if f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ledger.db"))
        {
            ledger_files += 1;
            places.push((
                format!("ledger file {}", f.display()),
                String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned(),
            ));
        }
    }
    assert!(ledger_files > 0, "no ledger file next to {}", db.display());
    let leaks = support::find_leaks(&[("minted token", token.clone())], &places);
    assert!(leaks.is_empty(), "leaked:\n{}", leaks.join("\n"));
    // The places were looked at for real: the log speaks of the launch and the Secret.
    assert!(
        places[0].1.contains("minted the agent token"),
        "operator log"
    );
}

/// A bootstrapped member whose agent never comes up (here: nothing runs its user data) gets
/// AgentRegistered=False with reason RegistrationTimedOut and a Warning Event, once the
/// registration timeout has passed since launch.
#[tokio::test]
async fn a_member_whose_agent_never_registers_times_out() {
    let e = env("bootstrap-timeout").await;
    let port = sandbox_operator::testenv::free_port();
    let _op = Operator::start(&e.ns, &e.ec2.url(), &[]);
    e.apply(
        "never",
        serde_json::json!({
            "environment": "dev",
            "instanceType": "t3.large",
            "launch": {"imageId": e.ami},
            "agent": {
                "url": format!("http://127.0.0.1:{port}"),
                "port": port,
                "probeInterval": "1s",
                "timeout": "1s",
                "bootstrap": {
                    "downloadUrl": "https://downloads.invalid/sandbox-agent.tar.gz",
                    "sha256": "0".repeat(64),
                    "registrationTimeout": "6s",
                },
            },
        }),
    )
    .await;
    let st = e
        .wait("never", 60, "registration awaited", |s| {
            s.instance.is_some()
                && cond(s, "AgentRegistered").is_some_and(|c| c.1 == "AwaitingRegistration")
        })
        .await;
    assert!(st.instance.is_some());
    let st = e
        .wait("never", 60, "RegistrationTimedOut", |s| {
            cond(s, "AgentRegistered").is_some_and(|c| c.1 == "RegistrationTimedOut")
        })
        .await;
    let (status, _, message) = cond(&st, "AgentRegistered").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("registrationTimeout (6s)"), "{message}");
    assert_eq!(cond(&st, "Ready").unwrap().0, "False");
    let evs = e.events().await;
    assert_eq!(
        evs.iter()
            .filter(|ev| ev.reason.as_deref() == Some("RegistrationTimedOut"))
            .count(),
        1,
        "one Warning Event"
    );
    // Its token Secret was minted all the same.
    let (_, token) = e.token_secret("never").await;
    assert_eq!(token.len(), 64);
}

/// What the API server refuses at once, with a message saying what to fix.
#[tokio::test]
async fn the_api_server_refuses_a_bootstrap_it_cannot_act_on() {
    let client = support::client().await;
    let ns = support::namespace(&client, "bootstrap-cel").await;
    let sbx: Api<Sandbox> = Api::namespaced(client, &ns);
    let sha = "a".repeat(64);
    let ok_boot = serde_json::json!({"downloadUrl": "https://h.example/a.tgz", "sha256": sha});
    let launched = |agent: serde_json::Value, launch: serde_json::Value| {
        serde_json::json!({
            "environment": "dev",
            "instanceType": "t3.large",
            "launch": launch,
            "agent": agent,
        })
    };
    let launch = serde_json::json!({"imageId": "ami-12345678"});
    let cases = [
        (
            serde_json::json!({"environment": "dev", "instanceId": "i-12345678", "agent": {"bootstrap": ok_boot}}),
            "it needs spec.launch",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": ok_boot}),
                serde_json::json!({"imageId": "ami-12345678", "userDataSecretRef": {"name": "u", "key": "k"}}),
            ),
            "leave spec.launch.userDataSecretRef unset",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": ok_boot, "tokenSecretRef": {"name": "t", "key": "k"}}),
                launch.clone(),
            ),
            "leave agent.tokenSecretRef unset",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": {"downloadUrl": "ftp://h.example/a.tgz", "sha256": sha}}),
                launch.clone(),
            ),
            "downloadUrl must start with https:// or http://",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": {"downloadUrl": "https://h.example/a b.tgz", "sha256": sha}}),
                launch.clone(),
            ),
            "no spaces",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": {"downloadUrl": "https://h.example/a.tgz", "sha256": "A".repeat(64)}}),
                launch.clone(),
            ),
            "sha256 must be 64 lower-case hex digits",
        ),
        (
            launched(
                serde_json::json!({"bootstrap": {"downloadUrl": "https://h.example/a.tgz", "sha256": sha, "registrationTimeout": "soon"}}),
                launch.clone(),
            ),
            "registrationTimeout must be a duration",
        ),
    ];
    for (n, (spec, want)) in cases.into_iter().enumerate() {
        let obj: Sandbox = serde_json::from_value(serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": format!("bad-{n}")},
            "spec": spec,
        }))
        .unwrap();
        match sbx.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "case {n}: {s:?}");
                assert!(
                    s.message.contains(want),
                    "case {n}: want {want:?} in {}",
                    s.message
                );
            }
            other => panic!("case {n} ({want}) was not refused: {other:?}"),
        }
    }
    // And a good one is accepted, with the default registration timeout.
    let obj: Sandbox = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": "good"},
        "spec": launched(serde_json::json!({"bootstrap": ok_boot}), launch),
    }))
    .unwrap();
    let made = sbx.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(
        made.spec.agent.bootstrap.unwrap().registration_timeout,
        "10m"
    );
}

/// The chart lets the operator create Secrets (the minted token) only with
/// `rbac.bootstrap=true`, and nothing more on Secrets than it had.
#[tokio::test]
async fn the_chart_grants_creating_secrets_only_with_rbac_bootstrap() {
    use crate::ship::{helm_template, kubectl_async};
    let client = support::client().await;
    let ns = support::namespace(&client, "bootstrap-rbac").await;
    let full = format!("bs-{}-op", &ns[ns.len().saturating_sub(12)..]);
    let who = format!("system:serviceaccount:{ns}:{full}");
    let can = |verb: &'static str| {
        let (who, ns) = (who.clone(), ns.clone());
        async move {
            let out = support::kubectl(
                &["auth", "can-i", verb, "secrets", "-n", &ns, "--as", &who],
                None,
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    for (bootstrap, create) in [("false", "no"), ("true", "yes")] {
        let rbac = helm_template(&[
            "--namespace",
            &ns,
            "--set",
            &format!("fullnameOverride={full}"),
            "--set",
            &format!("operator.watchNamespace={ns}"),
            "--set",
            &format!("rbac.bootstrap={bootstrap}"),
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ]);
        kubectl_async(&["apply", "-f", "-"], Some(&rbac)).await;
        // RBAC is read from the API server's cache: give it a moment to see the change.
        let got = support::try_eventually(20, || async move {
            let c = can("create").await;
            (c == create).then_some(c)
        })
        .await;
        assert_eq!(got.as_deref(), Some(create), "rbac.bootstrap={bootstrap}");
        assert_eq!(can("get").await, "yes");
        for verb in ["update", "patch", "delete"] {
            assert_eq!(
                can(verb).await,
                "no",
                "{verb} secrets, rbac.bootstrap={bootstrap}"
            );
        }
    }
}

/// The operator's user data refuses a tarball whose sha256 is not the spec's: nothing is
/// installed and nothing is started (the same template the operator embeds, rendered by its
/// renderer, run as cloud-init would in a scratch root).
#[tokio::test]
async fn a_tarball_whose_sha256_differs_is_not_installed() {
    use sandbox_operator::controller::sandbox::bootstrap::{Values, mint_token, user_data};
    let tmp = tempfile::tempdir().unwrap();
    let (tarball, name, sha) = dist_tarball(&tmp.path().join("dist"));
    let web = serve(&tarball, &name).await;
    let port = sandbox_operator::testenv::free_port();
    let token = mint_token().unwrap();
    let url = format!("http://{web}/dist/{name}");
    // One hex digit off.
    let wrong = format!(
        "{}{}",
        if sha.starts_with('0') { '1' } else { '0' },
        &sha[1..]
    );
    let script = user_data(&Values {
        download_url: &url,
        sha256: &wrong,
        agent_port: i32::from(port),
        token: &token,
        config: None,
    })
    .unwrap();
    let root = tmp.path().join("root");
    let _agent = Started(root.clone());
    let out = run_as_cloud_init(&script, tmp.path(), &root).await;
    let said = support::text(&out);
    assert!(
        !out.status.success(),
        "a wrong sha256 was accepted:\n{said}"
    );
    assert!(
        said.contains(&format!("the download's sha256 is {sha}, not {wrong}")),
        "{said}"
    );
    assert!(!said.contains(&token), "the script printed the token");
    for p in [
        "usr/local/bin/sandbox-agent",
        "etc/sandbox-agent/token",
        "var/lib/sandbox-agent-bootstrap/sandbox-agent.tar.gz",
        "var/lib/sandbox-agent-bootstrap/sandbox-agent.tar.gz.part",
        "run/sandbox-agent.pid",
    ] {
        assert!(
            !root.join(p).exists(),
            "{p} exists after a refused download"
        );
    }
    // The right sha256 with the same script otherwise: installed and listening.
    let script = user_data(&Values {
        download_url: &url,
        sha256: &sha,
        agent_port: i32::from(port),
        token: &token,
        config: None,
    })
    .unwrap();
    let out = run_as_cloud_init(&script, tmp.path(), &root).await;
    assert!(out.status.success(), "{}", support::text(&out));
    assert!(root.join("usr/local/bin/sandbox-agent").is_file());
    let health = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
}
