//! Running the instance's commands (docker, systemctl, configured probes) with a time limit and
//! bounded output, and keeping secrets out of whatever of that output is shown or logged.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Output kept from each stream of a command.
const MAX_OUTPUT: usize = 64 * 1024;
/// Output shown in a message (the tail of stderr, else stdout).
const MAX_EXCERPT: usize = 400;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    /// The exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last bit of stderr (or stdout when stderr is empty), on one line, redacted.
    pub fn excerpt(&self, redactor: &Redactor) -> String {
        let src = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let one_line = src.split_whitespace().collect::<Vec<_>>().join(" ");
        let redacted = redactor.redact(&one_line);
        tail_chars(&redacted, MAX_EXCERPT)
    }

    /// `exit status N: <excerpt>`.
    pub fn describe(&self, redactor: &Redactor) -> String {
        let status = match self.code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        let ex = self.excerpt(redactor);
        if ex.is_empty() {
            status
        } else {
            format!("{status}: {ex}")
        }
    }
}

fn tail_chars(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_string()
    } else {
        let tail: String = s.chars().skip(n - max).collect();
        format!("...{tail}")
    }
}

/// Why a command did not run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?} (killed)")]
    Timeout { program: String, timeout: Duration },
    #[error("waiting for {program}: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

/// Runs `program args...` (no shell), stdin closed, output captured (bounded), killed after
/// `timeout`.
pub async fn run(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<CmdOutput, ExecError> {
    let name = program.display().to_string();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: name.clone(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read = async move {
        let (o, e) = tokio::join!(read_bounded(stdout), read_bounded(stderr));
        let status = child.wait().await;
        (status, o, e)
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ExecError::Timeout {
            program: name,
            timeout,
        }),
        Ok((Err(source), _, _)) => Err(ExecError::Wait {
            program: name,
            source,
        }),
        Ok((Ok(status), stdout, stderr)) => Ok(CmdOutput {
            code: status.code(),
            stdout,
            stderr,
        }),
    }
}

/// Runs an argv (`argv[0]` is the program).
pub async fn run_argv(argv: &[String], timeout: Duration) -> Result<CmdOutput, ExecError> {
    let (program, args) = argv.split_first().ok_or_else(|| ExecError::Spawn {
        program: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
    })?;
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    run(Path::new(program), &args, timeout).await
}

async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> String {
    let Some(mut r) = r else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Keep the tail: errors are printed last.
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > MAX_OUTPUT {
                    let cut = kept.len() - MAX_OUTPUT;
                    kept.drain(..cut);
                }
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Replaces known secrets (the token, the values of the env files) with `***` in text that is
/// about to be logged or returned. Values shorter than [`Redactor::MIN_LEN`] are left alone
/// (they are not secrets, and masking `1` or `true` everywhere would make messages unreadable).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    inner: Arc<RwLock<RedactorInner>>,
}

#[derive(Debug, Default)]
struct RedactorInner {
    by_source: BTreeMap<String, Vec<String>>,
    /// Every secret, longest first (a secret that contains another is masked whole).
    all: Arc<Vec<String>>,
}

impl Redactor {
    pub const MIN_LEN: usize = 6;

    /// Replaces the secrets that come from one `source` (e.g. "token", an env file path).
    pub fn set(&self, source: &str, values: impl IntoIterator<Item = String>) {
        let values: Vec<String> = values
            .into_iter()
            .filter(|v| v.chars().count() >= Self::MIN_LEN)
            .collect();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.by_source.insert(source.to_string(), values);
        let mut all: Vec<String> = inner.by_source.values().flatten().cloned().collect();
        all.sort_by_key(|v| std::cmp::Reverse(v.len()));
        all.dedup();
        inner.all = Arc::new(all);
    }

    pub fn redact(&self, text: &str) -> String {
        let all = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .all
            .clone();
        let mut out = text.to_string();
        for secret in all.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_and_captures() {
        let out = run_argv(
            &[
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.describe(&Redactor::default()), "exit status 3: err");
    }

    #[tokio::test]
    async fn times_out() {
        let e = run_argv(&["sleep".into(), "5".into()], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        let e = run_argv(&["/nonexistent/x".into()], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }));
    }

    #[test]
    fn redacts() {
        let r = Redactor::default();
        r.set("token", ["tok-abcdef".to_string()]);
        r.set(
            "env",
            ["secret-1".to_string(), "secret-1-long".into(), "1".into()],
        );
        assert_eq!(
            r.redact("a tok-abcdef b secret-1-long c secret-1 d 1"),
            "a *** b *** c *** d 1"
        );
        r.set("env", ["other-value".to_string()]);
        assert_eq!(r.redact("secret-1 tok-abcdef"), "secret-1 ***");
    }
}
