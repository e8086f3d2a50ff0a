//! A real PostgreSQL server for tests, from Debian's packages (`/usr/lib/postgresql/<v>/bin`, or
//! `$PG_BIN_DIR`): `initdb` into a temporary directory, `postgres` on a free loopback port with
//! trust authentication, tied to the test process's lifetime.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
//! `postgres` system user the Debian package creates (or `nobody`), and the directory is handed
//! to that user.
//!
//! [`PostgresServer::stop`] and [`PostgresServer::start`] stop and restart the same server on the
//! same port and data directory, for outage tests.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::controlplane::free_port;
use super::process::{spawn_tied, sweep_stale_dirs, terminate};

const DIR_PREFIX: &str = "sandbox-operator-pg-";
const SUPERUSER: &str = "postgres";

/// What can go wrong starting the test server.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// No PostgreSQL server binaries.
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin or $PG_BIN_DIR: run `make tools` (hack/install-tools.sh debs installs Debian's postgresql)"
    )]
    BinariesMissing,
    /// Running as root with no unprivileged user to run the server as.
    #[error("running as root and neither the `postgres` nor the `nobody` user exists")]
    NoUser,
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the operation returned.
        source: std::io::Error,
    },
    /// initdb failed.
    #[error("initdb failed ({status}):\n{output}")]
    Initdb {
        /// How initdb exited.
        status: std::process::ExitStatus,
        /// What it printed.
        output: String,
    },
    /// The server did not come up.
    #[error(
        "postgres did not accept connections on port {port} within {timeout:?}; the end of its log:\n{tail}"
    )]
    NotReady {
        /// The port it was to listen on.
        port: u16,
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        tail: String,
    },
    /// The server exited during start-up.
    #[error("postgres exited during start-up ({status}); the end of its log:\n{tail}")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its log.
        tail: String,
    },
    /// Creating a database failed.
    #[error("creating database {name}: {source}")]
    CreateDatabase {
        /// The database.
        name: String,
        /// What the driver said.
        source: sqlx::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// The directory holding `initdb` and `postgres`: `$PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> Result<PathBuf, PostgresError> {
    let usable = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        return if usable(&d) {
            Ok(d)
        } else {
            Err(PostgresError::BinariesMissing)
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PostgresError::BinariesMissing)?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            usable(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, d)| d)
        .ok_or(PostgresError::BinariesMissing)
}

/// The uid and gid to run the server as: none when not root, else `postgres`, else `nobody`.
#[allow(unsafe_code)] // libc calls; the test environment only
fn server_user() -> Result<Option<(u32, u32)>, PostgresError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: getpwnam returns a pointer to static storage or null; we copy two integers out
        // at once. Test start-up is the only caller, so the non-reentrancy does not matter.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: checked non-null above.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Ok(Some((uid, gid)));
        }
    }
    Err(PostgresError::NoUser)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A PostgreSQL server started for tests. Dropping it stops the server and removes its files;
/// if the test process dies first, the kernel ends the server (parent-death signal) and the next
/// run removes the files.
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    user: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    dir: Mutex<Option<tempfile::TempDir>>,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .field("data", &self.data)
            .finish()
    }
}

impl PostgresServer {
    /// `initdb`s a new cluster in a temporary directory and starts it on a free loopback port.
    /// Blocks until the server accepts connections.
    pub fn init() -> Result<PostgresServer, PostgresError> {
        sweep_stale_dirs(DIR_PREFIX);
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(io("creating the PostgreSQL directory"))?;
        let root = dir.path().to_path_buf();
        if let Some((uid, gid)) = user {
            chown_tree(&root, uid, gid).map_err(io(format!("chown {}", root.display())))?;
        }
        let data = root.join("data");
        let log = root.join("postgres.log");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .env("LC_ALL", "C")
            .current_dir(&root)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(PostgresError::Initdb {
                status: out.status,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        // A port can be taken between choosing and binding it: try a few.
        let mut last = None;
        for _ in 0..3 {
            let server = PostgresServer {
                port: free_port(),
                bin: bin.clone(),
                data: data.clone(),
                socket_dir: root.clone(),
                log: log.clone(),
                user,
                child: Mutex::new(None),
                dir: Mutex::new(None),
            };
            match server.start() {
                Ok(()) => {
                    *server.dir.lock().expect("dir lock") = Some(dir);
                    return Ok(server);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Starts the server (again) on its port and data directory. A no-op while it runs.
    pub fn start(&self) -> Result<(), PostgresError> {
        let mut child = self.child.lock().expect("child lock");
        if let Some(c) = child.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            return Ok(());
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(&self.socket_dir)
            .args([
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=warning",
            ])
            .env("LC_ALL", "C")
            .current_dir(&self.socket_dir);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let mut c = spawn_tied(cmd, &self.log).map_err(io("starting postgres"))?;
        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(PostgresError::Exited {
                    status,
                    tail: tail(&self.log),
                });
            }
            if self.is_ready() {
                break;
            }
            if Instant::now() > deadline {
                terminate(&mut c, Duration::from_secs(5));
                return Err(PostgresError::NotReady {
                    port: self.port,
                    timeout,
                    tail: tail(&self.log),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *child = Some(c);
        Ok(())
    }

    fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                "1",
            ])
            .args(["-U", SUPERUSER])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server (a fast shutdown: open connections are cut, data is kept). A no-op
    /// when it is not running.
    #[allow(unsafe_code)] // libc calls; the test environment only
    pub fn stop(&self) {
        let mut child = self.child.lock().expect("child lock");
        if let Some(mut c) = child.take() {
            if let Ok(None) = c.try_wait() {
                // SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for the clients).
                // SAFETY: signalling our own child.
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGINT);
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            terminate(&mut c, Duration::from_secs(5));
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .expect("child lock")
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the server and removes its directory (what dropping it does; callable through a
    /// shared reference, for an exit hook).
    pub fn shutdown(&self) {
        self.stop();
        if let Some(dir) = self.dir.lock().expect("dir lock").take() {
            let _ = dir.close();
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// A URL for the `postgres` database as the superuser.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// A URL for database `db` as the superuser.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database (its name: lower-case letters, digits and `_`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, PostgresError> {
        use sqlx::Connection;
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(63)
            .collect();
        let err = |source| PostgresError::CreateDatabase {
            name: name.clone(),
            source,
        };
        let mut conn = sqlx::PgConnection::connect(&self.url())
            .await
            .map_err(err)?;
        let sql = format!("CREATE DATABASE \"{name}\"");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(err)?;
        let _ = conn.close().await;
        Ok(self.url_for(&name))
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
