//! A real Docker engine for the agent's tests: Debian's `dockerd` (with the containerd and runc it
//! manages) on its own data root and socket, Compose v2 as the `docker compose` CLI plugin, and
//! Debian's `docker-registry` on loopback with htpasswd authentication, holding the project's own
//! worker image (built FROM scratch from `tests/tools/worker`; nothing is pulled from a public
//! registry).
//!
//! The engine runs with `--iptables=false --bridge=none`: containers use the host's network, so
//! a worker container listens on loopback ports the tests choose.
//!
//! Everything lives in one temporary directory named `sbxd-<pid>-…`. [`DockerEngine::shutdown`]
//! removes the containers, stops the daemons and removes the directory; a test binary that was
//! killed leaves container shims behind, which the next start sweeps (processes whose command
//! line names a dead owner's directory are killed, its mounts detached, the directory removed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest;

use super::controlplane::{cache_dir, free_port};
use super::process::{spawn_tied, terminate};

/// The Compose version `hack/install-tools.sh compose` builds into the cache.
pub const COMPOSE_VERSION: &str = include_str!("../../tests/tools/compose/VERSION");
const WORKER_MAIN: &str = include_str!("../../tests/tools/worker/main.go");
const WORKER_GOMOD: &str = include_str!("../../tests/tools/worker/go.mod");
const DIR_PREFIX: &str = "sbxd-";

/// The worker image's repository name in the local registry.
pub const WORKER_REPOSITORY: &str = "ghosthands";
/// Healthy tags of the worker image (same program, different image ids).
pub const HEALTHY_TAGS: [&str; 2] = ["v1", "v2"];
/// A tag whose worker answers its health check with 503.
pub const UNHEALTHY_TAG: &str = "unhealthy";

/// Starting or driving the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the operation returned.
        source: std::io::Error,
    },
    /// A program the engine needs is not installed.
    #[error("{name} not found at {path}; run `hack/install-tools.sh {hint}`")]
    Missing {
        /// The program.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The `hack/install-tools.sh` target that installs it.
        hint: &'static str,
    },
    /// A daemon did not become ready in time.
    #[error("{what} did not become ready within {secs} s; last lines of {log}:\n{tail}")]
    NotReady {
        /// The daemon.
        what: &'static str,
        /// How long it was given, seconds.
        secs: u64,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A `docker` (or build) command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed.
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DockerError {
    let what = what.into();
    move |source| DockerError::Io { what, source }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn need(name: &'static str, hint: &'static str) -> Result<PathBuf, DockerError> {
    which(name).ok_or_else(|| DockerError::Missing {
        name,
        path: PathBuf::from(format!("$PATH/{name}")),
        hint,
    })
}

/// The Compose CLI plugin built by `hack/install-tools.sh compose`.
pub fn compose_binary() -> Result<PathBuf, DockerError> {
    let path = std::env::var_os("DOCKER_COMPOSE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join("bin")
                .join(format!("docker-compose-{}", COMPOSE_VERSION.trim()))
        });
    if path.is_file() {
        Ok(path)
    } else {
        Err(DockerError::Missing {
            name: "docker-compose",
            path,
            hint: "compose",
        })
    }
}

/// The worker image's program, built from `tests/tools/worker` into the cache (keyed by its
/// source) with the machine's Go, static, the first time it is needed.
pub fn worker_binary() -> Result<PathBuf, DockerError> {
    let mut h = sha2::Sha256::new();
    h.update(WORKER_MAIN.as_bytes());
    h.update(WORKER_GOMOD.as_bytes());
    let hash = hex::encode(h.finalize());
    let bin_dir = cache_dir().join("bin");
    let out = bin_dir.join(format!("gh-worker-{}", &hash[..12]));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&bin_dir).map_err(io(format!("creating {}", bin_dir.display())))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/worker");
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let go = need("go", "(Go is needed to build the worker image)")?;
    let o = Command::new(go)
        .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .output()
        .map_err(io("running go build for the worker image"))?;
    if !o.status.success() {
        return Err(command_error("go build (tests/tools/worker)", &o));
    }
    std::fs::rename(&tmp, &out).map_err(io("installing the worker binary"))?;
    Ok(out)
}

fn command_error(command: &str, o: &Output) -> DockerError {
    DockerError::Command {
        command: command.to_string(),
        status: o.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
        .trim()
        .to_string(),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The registry's address and the accounts the tests log in with.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The test account's user name.
    pub username: String,
    /// The test account's password.
    pub password: String,
    /// A second account named `AWS`, as ECR's (`aws ecr get-login-password | docker login
    /// --username AWS --password-stdin REGISTRY`); its password is [`Registry::aws_password`].
    pub aws_password: String,
}

impl Registry {
    /// `ADDR/REPOSITORY` for the worker image.
    pub fn worker_repository(&self) -> String {
        format!("{}/{WORKER_REPOSITORY}", self.addr)
    }
}

/// A running engine and registry; see the module docs.
pub struct DockerEngine {
    dir: PathBuf,
    sock: PathBuf,
    config_dir: PathBuf,
    log: PathBuf,
    registry: Registry,
    dockerd: Mutex<Option<Child>>,
    registry_child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerEngine")
            .field("dir", &self.dir)
            .field("registry", &self.registry.addr)
            .finish()
    }
}

impl DockerEngine {
    /// Starts dockerd and the registry, logs the engine's client in, and pushes the worker
    /// image's tags ([`HEALTHY_TAGS`], [`UNHEALTHY_TAG`]). Blocks until all of that is done.
    pub fn start() -> Result<DockerEngine, DockerError> {
        sweep_stale();
        let dockerd = need("dockerd", "debs")?;
        need("docker", "debs")?;
        let registry_bin = need("docker-registry", "debs")?;
        let htpasswd = need("htpasswd", "debs")?;
        let compose = compose_binary()?;
        let worker = worker_binary()?;

        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let config_dir = dir.join("config");
        let plugins = config_dir.join("cli-plugins");
        std::fs::create_dir_all(&plugins).map_err(io("creating the CLI plugin directory"))?;
        std::os::unix::fs::symlink(&compose, plugins.join("docker-compose"))
            .map_err(io("linking the compose plugin"))?;
        std::fs::write(config_dir.join("config.json"), "{}\n")
            .map_err(io("writing the client config"))?;

        let seed = hex::encode(sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()));
        let registry = Registry {
            addr: format!("127.0.0.1:{}", free_port()),
            username: "sandbox".into(),
            password: format!("pw-{}", &seed[..16]),
            aws_password: format!("ecr-{}", &seed[16..40]),
        };
        let engine = DockerEngine {
            sock: dir.join("d.sock"),
            log: dir.join("dockerd.log"),
            config_dir,
            registry,
            dir,
            dockerd: Mutex::new(None),
            registry_child: Mutex::new(None),
        };
        engine.start_registry(&registry_bin, &htpasswd)?;
        engine.start_dockerd(&dockerd)?;
        engine.login()?;
        engine.push_worker_images(&worker)?;
        Ok(engine)
    }

    fn start_registry(&self, bin: &Path, htpasswd: &Path) -> Result<(), DockerError> {
        let auth = self.dir.join("htpasswd");
        let mut lines = Vec::new();
        for (user, pw) in [
            (self.registry.username.as_str(), &self.registry.password),
            ("AWS", &self.registry.aws_password),
        ] {
            let o = Command::new(htpasswd)
                .args(["-Bbn", user, pw])
                .output()
                .map_err(io("running htpasswd"))?;
            if !o.status.success() {
                return Err(command_error("htpasswd -Bbn", &o));
            }
            lines.extend_from_slice(String::from_utf8_lossy(&o.stdout).trim().as_bytes());
            lines.push(b'\n');
        }
        std::fs::write(&auth, &lines).map_err(io("writing htpasswd"))?;
        let cfg = self.dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\nauth:\n  htpasswd:\n    realm: sandbox-test\n    path: {}\n",
                self.dir.join("registry").display(),
                self.registry.addr,
                auth.display()
            ),
        )
        .map_err(io("writing the registry config"))?;
        let log = self.dir.join("registry.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&cfg);
        let child = spawn_tied(cmd, &log).map_err(io("starting docker-registry"))?;
        *self.registry_child.lock().expect("registry lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.registry.addr).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(DockerError::NotReady {
            what: "docker-registry",
            secs: 30,
            tail: tail(&log, 20),
            log,
        })
    }

    fn start_dockerd(&self, bin: &Path) -> Result<(), DockerError> {
        let mut cmd = Command::new(bin);
        cmd.arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("d.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--log-level=warn",
            ]);
        let child = spawn_tied(cmd, &self.log).map_err(io("starting dockerd"))?;
        *self.dockerd.lock().expect("dockerd lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(o) = self
                .command()
                .args(["version", "--format", "{{.Server.Version}}"])
                .output()
                && o.status.success()
            {
                return Ok(());
            }
            if let Some(c) = self.dockerd.lock().expect("dockerd lock").as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(DockerError::NotReady {
            what: "dockerd",
            secs: 90,
            tail: tail(&self.log, 30),
            log: self.log.clone(),
        })
    }

    fn login(&self) -> Result<(), DockerError> {
        let mut child = self
            .command()
            .args([
                "login",
                "--username",
                &self.registry.username,
                "--password-stdin",
            ])
            .arg(&self.registry.addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("running docker login"))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(self.registry.password.as_bytes())
            .map_err(io("writing the registry password"))?;
        let o = child
            .wait_with_output()
            .map_err(io("waiting for docker login"))?;
        if !o.status.success() {
            return Err(command_error("docker login", &o));
        }
        Ok(())
    }

    /// Builds the worker image FROM scratch (the static worker program and nothing else) in
    /// its tags and pushes them to the registry.
    fn push_worker_images(&self, worker: &Path) -> Result<(), DockerError> {
        let ctx = self.dir.join("worker-image");
        std::fs::create_dir_all(&ctx).map_err(io("creating the image build context"))?;
        std::fs::copy(worker, ctx.join("gh-worker")).map_err(io("copying the worker binary"))?;
        let repo = self.registry.worker_repository();
        let tags: Vec<(&str, &str)> = HEALTHY_TAGS
            .iter()
            .map(|t| (*t, "0"))
            .chain([(UNHEALTHY_TAG, "1")])
            .collect();
        for (tag, unhealthy) in tags {
            std::fs::write(
                ctx.join("Dockerfile"),
                format!(
                    "FROM scratch\nCOPY gh-worker /gh-worker\nENV GH_BUILD={tag} GH_WORKER_UNHEALTHY={unhealthy}\nLABEL dev.valet.fleet.test-build=\"{tag}\"\nENTRYPOINT [\"/gh-worker\"]\n"
                ),
            )
            .map_err(io("writing the worker Dockerfile"))?;
            let image = format!("{repo}:{tag}");
            let o = self
                .command()
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "-q", "-t", &image])
                .arg(&ctx)
                .output()
                .map_err(io("running docker build"))?;
            if !o.status.success() {
                return Err(command_error(&format!("docker build -t {image}"), &o));
            }
            self.docker(&["push", &image])?;
        }
        Ok(())
    }

    /// The engine's socket as a `DOCKER_HOST` value.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// The client configuration directory (`DOCKER_CONFIG`): the compose plugin and the
    /// registry login.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// A client configuration directory of its own under `dir` (for `DOCKER_CONFIG`): the
    /// compose plugin, and no registry login (so a pull works only after a login of its own).
    pub fn client_config(&self, dir: &Path) -> Result<PathBuf, DockerError> {
        let plugins = dir.join("cli-plugins");
        std::fs::create_dir_all(&plugins).map_err(io("creating a client config directory"))?;
        let link = plugins.join("docker-compose");
        if !link.exists() {
            std::os::unix::fs::symlink(compose_binary()?, &link)
                .map_err(io("linking the compose plugin"))?;
        }
        std::fs::write(dir.join("config.json"), "{}\n").map_err(io("writing the client config"))?;
        Ok(dir.to_path_buf())
    }

    /// The variables that point a `docker` client at this engine.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DOCKER_HOST".into(), self.host()),
            (
                "DOCKER_CONFIG".into(),
                self.config_dir.display().to_string(),
            ),
        ]
    }

    /// A `docker` command pointed at this engine.
    pub fn command(&self) -> Command {
        let mut c = Command::new("docker");
        c.envs(self.env()).stdin(Stdio::null());
        c
    }

    /// Runs `docker ARGS` and returns its stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String, DockerError> {
        let o = self
            .command()
            .args(args)
            .output()
            .map_err(io(format!("running docker {}", args.join(" "))))?;
        if !o.status.success() {
            return Err(command_error(&format!("docker {}", args.join(" ")), &o));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The registry and its account.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// dockerd's log (the engine's own messages).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Removes every container, stops the daemons and removes the directory.
    pub fn shutdown(&self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        if let Some(mut c) = self.dockerd.lock().expect("dockerd lock").take() {
            terminate(&mut c, Duration::from_secs(20));
        }
        if let Some(mut c) = self.registry_child.lock().expect("registry lock").take() {
            terminate(&mut c, Duration::from_secs(5));
        }
        remove_dir(&self.dir);
    }
}

/// Kills processes whose command line names `dir` (container shims and containerd of a dead
/// engine) or whose root is inside it (the containers' processes), detaches mounts under it,
/// and removes it.
#[allow(unsafe_code)] // libc calls; the test environment only
pub(crate) fn remove_dir(dir: &Path) {
    let needle = dir.display().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            // A container's own processes have their root inside the engine's data root.
            let in_container =
                std::fs::read_link(p.path().join("root")).is_ok_and(|r| r.starts_with(dir));
            if in_container || String::from_utf8_lossy(&cmdline).contains(&needle) {
                // SAFETY: sending a signal to a process of a dead test engine.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&needle))
        .map(str::to_string)
        .collect();
    // Deepest first.
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: a NUL-terminated path; MNT_DETACH only detaches.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes what engines of test processes that are gone left behind.
fn sweep_stale() {
    sweep_stale_with(DIR_PREFIX);
}

/// Removes (with [`remove_dir`]) the directories `<prefix><pid>-…` in the temp dir whose test
/// process is gone.
pub(crate) fn sweep_stale_with(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_dir(&entry.path());
        }
    }
}
