//! A real node for the test control plane: Debian's containerd (CRI plugin on, its own root,
//! state, socket and runc root; the system's containerd is not touched) with Debian's runc, and
//! a kubelet, kube-controller-manager and kube-scheduler built from the same `k8s.io/kubernetes`
//! module and version as kube-apiserver (`hack/install-tools.sh node`).
//!
//! Choices a test relies on:
//! - **Host networking only.** The node has no pod network: its CNI configuration is a single
//!   loopback network, there so the runtime reports its network ready; pods that run here use
//!   `hostNetwork: true` and listen on loopback ports the test chooses. There is no kube-proxy:
//!   a pod reaches the API server through `KUBERNETES_SERVICE_HOST=127.0.0.1` (the serving
//!   certificate names 127.0.0.1), and a test reaches a Service through its EndpointSlice's port.
//! - **cgroup v1** (these machines): the kubelet runs with `failCgroupV1: false`, the cgroupfs
//!   driver and no QoS cgroups.
//! - **No public registry.** The pod sandbox image is a static program of this repository
//!   (`tests/tools/pause`) packed FROM scratch by `hack/oci-image.py` and imported, and
//!   containerd's `sandbox_image` names it. Other images are imported with [`Node::import_image`].
//! - The three Kubernetes components use the control plane's admin kubeconfig.
//!
//! Everything lives in one temporary directory `sbxn-<pid>-…`; [`Node::shutdown`] stops the
//! processes, kills the containers (and their shims), detaches the mounts and removes it. What a
//! killed test binary left behind is swept at the next start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::Api;
use sha2::Digest;

use super::controlplane::{ControlPlane, KUBE_VERSION, cache_dir, free_port, tail};
use super::docker::{remove_dir, sweep_stale_with};
use super::process::{spawn_tied, terminate};

const DIR_PREFIX: &str = "sbxn-";
const PAUSE_MAIN: &str = include_str!("../../tests/tools/pause/main.go");
const PAUSE_GOMOD: &str = include_str!("../../tests/tools/pause/go.mod");
/// The Node's name.
pub const NODE_NAME: &str = "testenv-node";
/// The containerd namespace the CRI plugin (and so the kubelet) uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Starting or driving the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the operation returned.
        source: std::io::Error,
    },
    /// A program the node needs is not installed or built.
    #[error("{name} not found at {path}: {hint}")]
    Missing {
        /// The program.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to install or build it.
        hint: &'static str,
    },
    /// A component did not become ready in time.
    #[error("{what} did not become ready within {secs} s; the end of {log}:\n{tail}")]
    NotReady {
        /// The component.
        what: String,
        /// How long it was given, seconds.
        secs: u64,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A command (go build, ctr, the image packer) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed.
        output: String,
    },
    /// The API server refused a call.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// What the API server or the client said.
        source: kube::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

fn command_error(command: &str, o: &Output) -> NodeError {
    NodeError::Command {
        command: command.to_string(),
        status: o.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
        .trim()
        .chars()
        .take(4000)
        .collect(),
    }
}

fn system_binary(name: &str, candidates: &[&str]) -> Result<PathBuf, NodeError> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| NodeError::Missing {
            name: name.to_string(),
            path: PathBuf::from(candidates[0]),
            hint: "install Debian's containerd and runc (hack/install-tools.sh debs)",
        })
}

fn kube_binary(name: &str) -> Result<PathBuf, NodeError> {
    let path = cache_dir()
        .join("bin")
        .join(format!("{name}-{}", KUBE_VERSION.trim()));
    if path.is_file() {
        Ok(path)
    } else {
        Err(NodeError::Missing {
            name: name.to_string(),
            path,
            hint: "run `hack/install-tools.sh node` (or `make tools`)",
        })
    }
}

/// The repository's root (the packer script and the pause program live there).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pause program, built static from `tests/tools/pause` into the cache (keyed by its
/// source) the first time it is needed. Returns its path and its source hash.
fn pause_binary() -> Result<(PathBuf, String), NodeError> {
    let mut h = sha2::Sha256::new();
    h.update(PAUSE_MAIN.as_bytes());
    h.update(PAUSE_GOMOD.as_bytes());
    let hash = hex::encode(h.finalize())[..12].to_string();
    let bin_dir = cache_dir().join("bin");
    let out = bin_dir.join(format!("pause-{hash}"));
    if out.is_file() {
        return Ok((out, hash));
    }
    std::fs::create_dir_all(&bin_dir).map_err(io(format!("creating {}", bin_dir.display())))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let o = Command::new("go")
        .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(repo().join("tests/tools/pause"))
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .output()
        .map_err(io(
            "running go build for the pause image (is Go installed?)",
        ))?;
    if !o.status.success() {
        return Err(command_error("go build (tests/tools/pause)", &o));
    }
    std::fs::rename(&tmp, &out).map_err(io("moving the pause program into the cache"))?;
    Ok((out, hash))
}

/// A running node; see the module docs.
pub struct Node {
    dir: PathBuf,
    socket: PathBuf,
    ctr: PathBuf,
    containerd: Mutex<Option<Child>>,
    kubelet: Mutex<Option<Child>>,
    controller_manager: Mutex<Option<Child>>,
    scheduler: Mutex<Option<Child>>,
    /// How long start-up took, from the first spawn to the Node Ready.
    pub startup: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("dir", &self.dir).finish()
    }
}

impl Node {
    /// Starts containerd (with the pause image imported), the kubelet, kube-controller-manager
    /// and kube-scheduler against `cp`, and waits until the Node is Ready.
    pub async fn start(cp: &ControlPlane) -> Result<Node, NodeError> {
        let started = Instant::now();
        sweep_stale_with(DIR_PREFIX);
        let containerd_bin = system_binary("containerd", &["/usr/bin/containerd"])?;
        let runc = system_binary("runc", &["/usr/sbin/runc", "/usr/bin/runc"])?;
        let ctr = system_binary("ctr", &["/usr/bin/ctr"])?;
        let kubelet_bin = kube_binary("kubelet")?;
        let kcm_bin = kube_binary("kube-controller-manager")?;
        let scheduler_bin = kube_binary("kube-scheduler")?;
        let (pause, pause_hash) = pause_binary()?;

        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let node = Node {
            socket: dir.join("containerd.sock"),
            dir,
            ctr,
            containerd: Mutex::new(None),
            kubelet: Mutex::new(None),
            controller_manager: Mutex::new(None),
            scheduler: Mutex::new(None),
            startup: Duration::ZERO,
        };
        // A start that fails half-way leaves nothing running.
        let up: Result<(), NodeError> = async {
            let pause_image = format!("localhost/sandbox-operator-pause:{pause_hash}");
            node.start_containerd(&containerd_bin, &runc, &pause_image)?;
            node.import_pause(&pause, &pause_hash)?;

            let cp_dir = cp.dir();
            let kubeconfig = cp.kubeconfig_path();
            // kube-controller-manager: Deployments, ReplicaSets, garbage collection, EndpointSlices,
            // the kube-root-ca.crt ConfigMap each pod's service-account volume needs.
            let kcm_port = free_port();
            let mut cmd = Command::new(&kcm_bin);
            cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!(
                    "--authentication-kubeconfig={}",
                    kubeconfig.display()
                ))
                .arg(format!(
                    "--authorization-kubeconfig={}",
                    kubeconfig.display()
                ))
                .arg(format!(
                    "--root-ca-file={}",
                    cp_dir.join("ca.crt").display()
                ))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    cp_dir.join("sa.key").display()
                ))
                .arg("--use-service-account-credentials=false")
                // Only what running a chart needs; the rest of the shared control plane's tests see
                // no new controller (no namespace deletion, no jobs). The node lifecycle controller
                // lifts the not-ready taint the kubelet registers the Node with; the volume binder
                // binds the chart's ledger claim to the test's hostPath PersistentVolume.
                .arg(concat!(
                    "--controllers=deployment-controller,replicaset-controller,",
                    "node-lifecycle-controller,persistentvolume-binder-controller,",
                    "garbage-collector-controller,endpointslice-controller,",
                    "root-ca-certificate-publisher-controller,serviceaccount-controller"
                ))
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={kcm_port}"))
                .arg(format!(
                    "--cert-dir={}",
                    node.dir.join("kcm-certs").display()
                ))
                .arg("--v=1");
            *node.controller_manager.lock().unwrap() = Some(
                spawn_tied(cmd, &node.log("kube-controller-manager"))
                    .map_err(io("starting kube-controller-manager"))?,
            );

            let scheduler_port = free_port();
            let mut cmd = Command::new(&scheduler_bin);
            cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!(
                    "--authentication-kubeconfig={}",
                    kubeconfig.display()
                ))
                .arg(format!(
                    "--authorization-kubeconfig={}",
                    kubeconfig.display()
                ))
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={scheduler_port}"))
                .arg(format!(
                    "--cert-dir={}",
                    node.dir.join("scheduler-certs").display()
                ))
                .arg("--v=1");
            *node.scheduler.lock().unwrap() = Some(
                spawn_tied(cmd, &node.log("kube-scheduler"))
                    .map_err(io("starting kube-scheduler"))?,
            );

            node.start_kubelet(&kubelet_bin, kubeconfig, &cp_dir.join("ca.crt"))?;
            node.wait_node_ready(cp, Duration::from_secs(120)).await
        }
        .await;
        if let Err(e) = up {
            node.shutdown();
            return Err(e);
        }
        Ok(Node {
            startup: started.elapsed(),
            ..node
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The directory holding the node's logs (`containerd.log`, `kubelet.log`,
    /// `kube-controller-manager.log`, `kube-scheduler.log`) and state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The end of one component's log (`kubelet`, `containerd`, ...), for failure messages.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        tail(&self.log(name), lines)
    }

    fn start_containerd(
        &self,
        bin: &Path,
        runc: &Path,
        pause_image: &str,
    ) -> Result<(), NodeError> {
        let d = &self.dir;
        let cni_conf = d.join("cni");
        std::fs::create_dir_all(&cni_conf).map_err(io("creating the CNI config dir"))?;
        std::fs::write(
            cni_conf.join("10-testenv.conflist"),
            "{\"cniVersion\": \"1.0.0\", \"name\": \"testenv-host\", \"plugins\": [{\"type\": \"loopback\"}]}\n",
        )
        .map_err(io("writing the CNI config"))?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # These machines grant no CAP_SYS_RESOURCE: no score below containerd's own (the sandbox's
  # default -998 would fail in runc).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            sock = self.socket.display(),
            ttrpc = d.join("containerd-ttrpc.sock").display(),
            runc = runc.display(),
            runc_root = d.join("runc").display(),
            cni_conf = cni_conf.display(),
        );
        let config_path = d.join("containerd.toml");
        std::fs::write(&config_path, config).map_err(io("writing containerd's config"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let log = self.log("containerd");
        *self.containerd.lock().unwrap() =
            Some(spawn_tied(cmd, &log).map_err(io("starting containerd"))?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.socket.exists() && self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.containerd.lock().unwrap().as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(NodeError::NotReady {
            what: "containerd".into(),
            secs: 60,
            tail: tail(&log, 30),
            log,
        })
    }

    /// Runs `ctr` against this node's containerd in the CRI namespace; its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, NodeError> {
        let o = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", CRI_NAMESPACE])
            .args(args)
            .output()
            .map_err(io("running ctr"))?;
        if !o.status.success() {
            return Err(command_error(&format!("ctr {}", args.join(" ")), &o));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Imports an OCI (or Docker) image archive into the CRI namespace, where the kubelet finds
    /// it by the name the archive carries.
    pub fn import_image(&self, archive: &Path) -> Result<(), NodeError> {
        let path = archive.display().to_string();
        self.ctr(&["images", "import", &path])?;
        Ok(())
    }

    /// Gives an imported image another name (`ctr images tag`), e.g. a second tag of the same
    /// image for an upgrade.
    pub fn tag_image(&self, from: &str, to: &str) -> Result<(), NodeError> {
        self.ctr(&["images", "tag", "--force", from, to])?;
        Ok(())
    }

    fn import_pause(&self, pause: &Path, hash: &str) -> Result<(), NodeError> {
        let rootfs = self.dir.join("pause-rootfs");
        std::fs::create_dir_all(&rootfs).map_err(io("creating the pause image's rootfs"))?;
        std::fs::copy(pause, rootfs.join("pause")).map_err(io("copying the pause program"))?;
        let archive = self.dir.join("pause.oci.tar");
        let o = Command::new("python3")
            .arg(repo().join("hack/oci-image.py"))
            .arg(&rootfs)
            .arg(&archive)
            .args([
                "--name",
                "localhost/sandbox-operator-pause",
                "--tag",
                hash,
                "--user",
                "65535:65535",
                "--entrypoint",
                "/pause",
            ])
            .output()
            .map_err(io("running hack/oci-image.py for the pause image"))?;
        if !o.status.success() {
            return Err(command_error("hack/oci-image.py (pause)", &o));
        }
        self.import_image(&archive)
    }

    fn start_kubelet(&self, bin: &Path, kubeconfig: &Path, ca: &Path) -> Result<(), NodeError> {
        let d = &self.dir;
        let port = free_port();
        let healthz = free_port();
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: "unix://{sock}"
imageServiceEndpoint: "unix://{sock}"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
podLogsDir: "{pod_logs}"
"#,
            ca = ca.display(),
            pod_logs = d.join("pod-logs").display(),
            sock = self.socket.display(),
        );
        let config_path = d.join("kubelet.yaml");
        std::fs::write(&config_path, config).map_err(io("writing the kubelet's config"))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config={}", config_path.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--cert-dir={}", d.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg("--v=1");
        *self.kubelet.lock().unwrap() =
            Some(spawn_tied(cmd, &self.log("kubelet")).map_err(io("starting the kubelet"))?);
        Ok(())
    }

    async fn wait_node_ready(&self, cp: &ControlPlane, timeout: Duration) -> Result<(), NodeError> {
        let client = cp.client().await.map_err(|e| NodeError::Io {
            what: "building the admin client".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let nodes: Api<KubeNode> = Api::all(client);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(n)) = nodes.get_opt(NODE_NAME).await {
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                // Schedulable too: the not-ready taint lifted.
                let tainted = n
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
                if ready && !tainted {
                    return Ok(());
                }
            }
            for (name, child) in [
                ("kubelet", &self.kubelet),
                ("containerd", &self.containerd),
                ("kube-controller-manager", &self.controller_manager),
                ("kube-scheduler", &self.scheduler),
            ] {
                if let Some(c) = child.lock().unwrap().as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    return Err(NodeError::NotReady {
                        what: format!("{name} (exited: {status})"),
                        secs: 0,
                        log: self.log(name),
                        tail: tail(&self.log(name), 40),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(NodeError::NotReady {
                    what: format!("Node {NODE_NAME}"),
                    secs: timeout.as_secs(),
                    log: self.log("kubelet"),
                    tail: tail(&self.log("kubelet"), 40),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The logs the kubelet kept of a pod's containers (every container, every restart), oldest
    /// file first within each container.
    pub fn pod_logs(&self, namespace: &str, pod: &str) -> String {
        let mut out = String::new();
        let prefix = format!("{namespace}_{pod}_");
        let Ok(pods) = std::fs::read_dir(self.dir.join("pod-logs")) else {
            return out;
        };
        for p in pods.flatten() {
            if !p.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let Ok(containers) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for c in containers.flatten() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(c.path())
                    .map(|r| r.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                files.sort();
                for f in files {
                    out.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
                }
            }
        }
        out
    }

    /// The running containers (their first process, as containerd lists its tasks) whose
    /// command line starts with `exe`: their pids.
    pub fn container_processes(&self, exe: &str) -> Vec<i32> {
        let Ok(tasks) = self.ctr(&["tasks", "ls"]) else {
            return Vec::new();
        };
        tasks
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (_id, pid, status) = (w.next()?, w.next()?, w.next()?);
                (status == "RUNNING").then_some(())?;
                pid.parse::<i32>().ok()
            })
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.split(|b| *b == 0).next() == Some(exe.as_bytes())
            })
            .collect()
    }

    /// Stops the components, kills every container (and its shim), detaches the mounts and
    /// removes the directory. For a node kept in a `static`, call this from an exit hook.
    pub fn shutdown(&self) {
        for child in [&self.kubelet, &self.scheduler, &self.controller_manager] {
            if let Some(mut c) = child.lock().unwrap_or_else(|e| e.into_inner()).take() {
                terminate(&mut c, Duration::from_secs(5));
            }
        }
        if let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in tasks.split_whitespace() {
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id]);
            }
        }
        if let Some(mut c) = self
            .containerd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            terminate(&mut c, Duration::from_secs(10));
        }
        remove_dir(&self.dir);
    }
}
