//! Running the instance's commands (docker, systemctl, configured probes) with a time limit and
//! bounded output, and keeping secrets out of whatever of that output is shown or logged.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
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
    /// What it printed on stdout (bounded).
    pub stdout: String,
    /// What it printed on stderr (bounded).
    pub stderr: String,
}

impl CmdOutput {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last bit of stderr (or stdout when stderr is empty), redacted, then on one line
    /// (redacted first: a multi-line value or one with runs of spaces is only recognisable as
    /// printed).
    pub fn excerpt(&self, redactor: &Redactor) -> String {
        let src = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let redacted = redactor.redact(src);
        let one_line = redacted.split_whitespace().collect::<Vec<_>>().join(" ");
        tail_chars(&one_line, MAX_EXCERPT)
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
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// It ran longer than its timeout and was killed.
    #[error("{program} did not finish within {timeout:?} (killed)")]
    Timeout {
        /// The program.
        program: String,
        /// The time it was given.
        timeout: Duration,
    },
    /// Waiting for the program failed.
    #[error("waiting for {program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// What waiting returned.
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

/// A child's output stream, keeping its last 64 KiB.
pub(crate) async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> String {
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

/// The redactor the agent masks command output with: its token and the values of its env files
/// (see [`crate::redact`]).
pub use crate::redact::Redactor;

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

    #[tokio::test]
    async fn excerpts_are_redacted_before_they_are_put_on_one_line() {
        let pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAK-line-one\nline-two  with  spaces\n-----END KEY-----";
        let r = Redactor::default();
        r.set(
            "env",
            crate::redact::Secrets::new(["PEM", "PIN"], [pem.to_string(), "1234".into()]),
        );
        let file = crate::agent::envfile::render(
            &[
                ("PEM".to_string(), pem.to_string()),
                ("PIN".into(), "1234".into()),
            ]
            .into_iter()
            .collect(),
        );
        let script = "printf '%s\\n%s' 'raw:' \"$V\" >&2; printf '%s' \"$F\" >&2; exit 1";
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", script]).env("V", pem).env("F", &file);
        let out = cmd.output().await.unwrap();
        let out = CmdOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        };
        let d = out.describe(&r);
        assert!(d.starts_with("exit status 1: raw:"), "{d}");
        for leak in ["MIIBOgIBAAJBAK", "line-two", "BEGIN KEY", "1234"] {
            assert!(!d.contains(leak), "{leak} in {d}");
        }
        assert!(d.contains(crate::redact::MASK), "{d}");
    }
}
