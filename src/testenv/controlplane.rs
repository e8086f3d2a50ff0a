//! A real Kubernetes control plane for tests, in the manner of controller-runtime's envtest:
//! etcd and kube-apiserver started on free loopback ports, with generated certificates and an
//! admin identity, the CRDs from `crds/` installed and Established.
//!
//! The binaries come from `make tools` (hack/install-tools.sh), cached outside the repository,
//! keyed by version; `KUBE_APISERVER` and `ETCD` override their paths.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};

use super::process::spawn_tied;

/// The kube-apiserver version the wrapper module builds.
pub const KUBE_VERSION: &str = include_str!("../../tests/tools/kube-apiserver/VERSION");
/// The etcd version the wrapper module builds.
pub const ETCD_VERSION: &str = include_str!("../../tests/tools/etcd/VERSION");

/// What can go wrong starting or using the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A binary is missing: run `make tools`.
    #[error("{name} not found at {path}: run `make tools` (or set {env}) first")]
    BinaryMissing {
        /// The binary.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The environment variable that names another path.
        env: &'static str,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the operation returned.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating the control plane's certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    /// A process did not become ready in time.
    #[error("{name} did not become ready within {timeout:?}; the end of its log:\n{tail}")]
    NotReady {
        /// The process.
        name: &'static str,
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        tail: String,
    },
    /// A process exited during start-up.
    #[error("{name} exited during start-up ({status}); the end of its log:\n{tail}")]
    Exited {
        /// The process.
        name: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its log.
        tail: String,
    },
    /// Building the kube client failed.
    #[error("building the admin client: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// What the client said.
        source: kube::Error,
    },
    /// A CRD file did not parse.
    #[error("parsing CRD file {path}: {source}")]
    CrdParse {
        /// The CRD file.
        path: PathBuf,
        /// What the YAML parser said.
        source: serde_yaml::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// The cache directory the install script fills: `$SANDBOX_OPERATOR_CACHE`, else
/// `$XDG_CACHE_HOME/sandbox-operator`, else `~/.cache/sandbox-operator`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDBOX_OPERATOR_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("sandbox-operator")
}

fn binary(
    name: &'static str,
    env: &'static str,
    version: &str,
) -> Result<PathBuf, ControlPlaneError> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        cache_dir()
            .join("bin")
            .join(format!("{name}-{}", version.trim()))
    });
    if path.is_file() {
        Ok(path)
    } else {
        Err(ControlPlaneError::BinaryMissing { name, path, env })
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("binding an ephemeral loopback port")
}

/// Options for [`ControlPlane::start`].
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// A directory of CRD YAML files to install (every `*.yaml`); none when `None`.
    pub crds_dir: Option<PathBuf>,
    /// How long each process may take to become ready.
    pub ready_timeout: Duration,
    /// Extra kube-apiserver flags.
    pub extra_apiserver_args: Vec<String>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            crds_dir: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds")),
            ready_timeout: Duration::from_secs(90),
            extra_apiserver_args: Vec::new(),
        }
    }
}

/// A running etcd and kube-apiserver. Dropping it stops both and removes their files; if the
/// process dies first, the kernel kills them (see [`spawn_tied`]).
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Mutex<Child>,
    apiserver: Mutex<Child>,
    /// How kube-apiserver was started (binary and flags), to start it again the same way.
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    ready_timeout: Duration,
    server: String,
    token: String,
    ca_pem: String,
    kubeconfig_path: PathBuf,
    /// How long start-up took, from the first process spawn to CRDs Established.
    pub startup: Duration,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports, waits for `/readyz`, and installs
    /// the CRDs of `opts.crds_dir`, waiting until they are Established.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self, ControlPlaneError> {
        let started = Instant::now();
        let etcd_bin = binary("etcd", "ETCD", ETCD_VERSION)?;
        let apiserver_bin = binary("kube-apiserver", "KUBE_APISERVER", KUBE_VERSION)?;
        super::process::sweep_stale_dirs("sandbox-operator-cp-");
        let dir = tempfile::Builder::new()
            .prefix(&format!("sandbox-operator-cp-{}-", std::process::id()))
            .tempdir()
            .map_err(io("creating the control plane directory"))?;
        let d = dir.path();

        // Certificates: a CA, the API server's serving certificate, a service-account key.
        let certs = Certificates::generate()?;
        let write = |name: &str, body: &str| {
            std::fs::write(d.join(name), body).map_err(io(format!("writing {name}")))
        };
        write("ca.crt", &certs.ca_pem)?;
        write("apiserver.crt", &certs.serving_pem)?;
        write("apiserver.key", &certs.serving_key_pem)?;
        write("sa.key", &certs.sa_key_pem)?;
        write("sa.pub", &certs.sa_pub_pem)?;
        let token = format!("admin-{}", hex_token());
        write(
            "tokens.csv",
            &format!("{token},admin,admin-uid,\"system:masters\"\n"),
        )?;

        // etcd.
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_log = d.join("etcd.log");
        let mut etcd_cmd = Command::new(&etcd_bin);
        etcd_cmd
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        let mut etcd = spawn_tied(etcd_cmd, &etcd_log).map_err(io("starting etcd"))?;
        wait_tcp(&mut etcd, "etcd", etcd_port, &etcd_log, opts.ready_timeout).await?;

        // kube-apiserver.
        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let apiserver_log = d.join("kube-apiserver.log");
        let p = |name: &str| d.join(name).display().to_string();
        let mut apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-account-issuer={server}"),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        apiserver_args.extend(opts.extra_apiserver_args.iter().cloned());
        let mut cmd = Command::new(&apiserver_bin);
        cmd.args(&apiserver_args);
        let mut apiserver =
            spawn_tied(cmd, &apiserver_log).map_err(io("starting kube-apiserver"))?;

        let ca_pem = certs.ca_pem.clone();
        let kubeconfig_path = d.join("kubeconfig");
        let kubeconfig = admin_kubeconfig(&server, &ca_pem, &token);
        std::fs::write(
            &kubeconfig_path,
            serde_yaml::to_string(&kubeconfig).expect("kubeconfig serializes"),
        )
        .map_err(io("writing the kubeconfig"))?;

        wait_ready(
            &mut apiserver,
            &server,
            &token,
            &ca_pem,
            &apiserver_log,
            opts.ready_timeout,
        )
        .await?;
        let mut cp = ControlPlane {
            dir,
            etcd: Mutex::new(etcd),
            apiserver: Mutex::new(apiserver),
            apiserver_bin,
            apiserver_args,
            ready_timeout: opts.ready_timeout,
            server,
            token,
            ca_pem,
            kubeconfig_path,
            startup: Duration::ZERO,
        };
        if let Some(crds) = &opts.crds_dir {
            cp.install_crds(crds).await?;
        }
        cp.startup = started.elapsed();
        Ok(cp)
    }

    /// The process ids of kube-apiserver and etcd.
    pub fn pids(&self) -> Vec<u32> {
        [&self.apiserver, &self.etcd]
            .iter()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).id())
            .collect()
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The path of a kubeconfig for the admin identity (for kubectl and the operator binary).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The control plane's working directory (logs, certificates, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin identity's kubeconfig.
    pub fn kubeconfig(&self) -> Kubeconfig {
        admin_kubeconfig(&self.server, &self.ca_pem, &self.token)
    }

    /// A client config for the admin identity.
    pub async fn config(&self) -> Result<kube::Config, ControlPlaneError> {
        Ok(
            kube::Config::from_custom_kubeconfig(self.kubeconfig(), &KubeConfigOptions::default())
                .await?,
        )
    }

    /// A new admin client. Make one per async runtime: a client's connections belong to the
    /// runtime that made them.
    pub async fn client(&self) -> Result<kube::Client, ControlPlaneError> {
        let config = self.config().await?;
        kube::Client::try_from(config).map_err(|source| ControlPlaneError::Kube {
            what: "building the admin client".into(),
            source,
        })
    }

    /// Applies every `*.yaml` CRD in `dir` (server-side) and waits until each is Established.
    pub async fn install_crds(&self, dir: &Path) -> Result<(), ControlPlaneError> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let mut names = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path)
                .map_err(io(format!("reading {}", path.display())))?;
            let crd: CustomResourceDefinition =
                serde_yaml::from_str(&text).map_err(|source| ControlPlaneError::CrdParse {
                    path: path.clone(),
                    source,
                })?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("sandbox-operator-testenv").force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|source| ControlPlaneError::Kube {
                what: format!("installing CRD {name}"),
                source,
            })?;
            names.push(name);
        }
        for name in names {
            let cond = kube::runtime::wait::conditions::is_crd_established();
            tokio::time::timeout(
                Duration::from_secs(30),
                kube::runtime::wait::await_condition(api.clone(), &name, cond),
            )
            .await
            .map_err(|_| ControlPlaneError::NotReady {
                name: "CRD",
                timeout: Duration::from_secs(30),
                tail: tail(&self.dir.path().join("kube-apiserver.log"), 30),
            })?
            .map_err(|e| ControlPlaneError::Io {
                what: format!("waiting for CRD {name}"),
                source: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }

    /// Kills kube-apiserver (SIGKILL, as a crash would) and leaves etcd running: an API server
    /// outage. Clients see their connections cut and then refused until
    /// [`ControlPlane::start_apiserver`]. Use a control plane of your own for this: every client
    /// of this one loses the server.
    pub fn stop_apiserver(&self) {
        let mut child = self.apiserver.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts kube-apiserver again after [`ControlPlane::stop_apiserver`]: the same binary and
    /// flags, so the same port, certificates, identity and etcd (every object kept). Returns
    /// once `/readyz` answers OK. Its log goes on in the same file.
    pub async fn start_apiserver(&self) -> Result<(), ControlPlaneError> {
        let log = self.dir.path().join("kube-apiserver.log");
        if let Ok(None) = self
            .apiserver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
        {
            return Err(ControlPlaneError::Io {
                what: "starting kube-apiserver again".into(),
                source: std::io::Error::other("it is running; stop_apiserver first"),
            });
        }
        let mut cmd = Command::new(&self.apiserver_bin);
        cmd.args(&self.apiserver_args);
        let mut child = spawn_tied(cmd, &log).map_err(io("starting kube-apiserver again"))?;
        let ready = wait_ready(
            &mut child,
            &self.server,
            &self.token,
            &self.ca_pem,
            &log,
            self.ready_timeout,
        )
        .await;
        // The old process is reaped already; the new one takes its place (and is stopped with
        // the rest, ready or not).
        *self.apiserver.lock().unwrap_or_else(|e| e.into_inner()) = child;
        ready
    }

    /// Stops the API server and etcd. The files stay until the value is dropped.
    pub fn stop(&self) {
        for child in [&self.apiserver, &self.etcd] {
            let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
            super::process::terminate(&mut child, Duration::from_secs(5));
        }
    }

    /// Stops both processes and removes the working directory. For a control plane kept in a
    /// `static` (never dropped), call this from an exit hook.
    pub fn shutdown(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn admin_kubeconfig(server: &str, ca_pem: &str, token: &str) -> Kubeconfig {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: "testenv".into(),
            cluster: Some(Cluster {
                server: Some(server.to_string()),
                certificate_authority_data: Some(ca),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "admin".into(),
            auth_info: Some(AuthInfo {
                token: Some(token.to_string().into()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "testenv".into(),
            context: Some(Context {
                cluster: "testenv".into(),
                user: Some("admin".into()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        current_context: Some("testenv".into()),
        ..Default::default()
    }
}

fn hex_token() -> String {
    use std::io::Read;
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

struct Certificates {
    ca_pem: String,
    serving_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Certificates {
    fn generate() -> Result<Self, rcgen::Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sandbox-operator testenv CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);

        let serving_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "10.0.0.1".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let serving = params.signed_by(&serving_key, &issuer)?;
        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            serving_pem: serving.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }
}

async fn wait_tcp(
    child: &mut Child,
    name: &'static str,
    port: u16,
    log: &Path,
    timeout: Duration,
) -> Result<(), ControlPlaneError> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        check_alive(child, name, log)?;
        if Instant::now() > deadline {
            return Err(ControlPlaneError::NotReady {
                name,
                timeout,
                tail: tail(log, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_alive(child: &mut Child, name: &'static str, log: &Path) -> Result<(), ControlPlaneError> {
    match child.try_wait() {
        Ok(Some(status)) => Err(ControlPlaneError::Exited {
            name,
            status,
            tail: tail(log, 30),
        }),
        Ok(None) => Ok(()),
        Err(e) => Err(ControlPlaneError::Io {
            what: format!("checking {name}"),
            source: e,
        }),
    }
}

async fn wait_ready(
    child: &mut Child,
    server: &str,
    token: &str,
    ca_pem: &str,
    log: &Path,
    timeout: Duration,
) -> Result<(), ControlPlaneError> {
    let ca =
        reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| ControlPlaneError::Io {
            what: "reading the CA".into(),
            source: std::io::Error::other(e),
        })?;
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| ControlPlaneError::Io {
            what: "building the readiness client".into(),
            source: std::io::Error::other(e),
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        let ok = http
            .get(format!("{server}/readyz"))
            .bearer_auth(token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        check_alive(child, "kube-apiserver", log)?;
        if Instant::now() > deadline {
            return Err(ControlPlaneError::NotReady {
                name: "kube-apiserver",
                timeout,
                tail: tail(log, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(f) = std::fs::File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
