//! Members that come up working: `spec.agent.bootstrap`.
//!
//! A launched Sandbox with `agent.bootstrap` gets, with no human step, an agent token minted by
//! the operator (32 bytes from the process's CSPRNG, hex) in a Secret it owns,
//! [`token_secret_name`], created once and reused; and EC2 user data rendered from the cloud-init
//! script [`TEMPLATE`] (`examples/bootstrap/user-data.sh`) with that token, the agent's download
//! URL and sha256 and its port. The agent client then uses the same Secret (when
//! `agent.tokenSecretRef` is unset, which the CRD requires with bootstrap).
//!
//! The token is registered with the process redactor ([`crate::redact::process`]) the moment it
//! is minted or read, and is never written to status, Events, logs, errors or the ledger.
//!
//! The pure parts are here and tested without I/O: [`render`], [`user_data`] (the size limit),
//! [`check_spec`] (the validate step's share); the AgentRegistered condition is a step of the
//! decide pass ([`super::decide::registration`]). The two edges, [`token`] (read or create the Secret) and [`launch_user_data`], are
//! what the launch path calls.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};

use crate::api::{BootstrapSpec, SandboxSpec, SecretKeyRef};
use crate::util::parse_duration;

use super::Error;
use super::decide::MAX_USER_DATA_BYTES;

/// The cloud-init user-data template (a shell script cloud-init runs once at first boot), kept
/// in `examples/bootstrap/user-data.sh` and embedded here.
pub const TEMPLATE: &str = include_str!("../../../examples/bootstrap/user-data.sh");

/// The placeholders [`TEMPLATE`] holds, each replaced by one shell-quoted word.
pub const PLACEHOLDERS: [&str; 5] = [
    "{{DOWNLOAD_URL}}",
    "{{SHA256}}",
    "{{AGENT_PORT}}",
    "{{AGENT_TOKEN}}",
    "{{AGENT_CONFIG_B64}}",
];

/// The key of the minted token in its Secret.
pub const TOKEN_KEY: &str = "token";

/// Random bytes in a minted token (hex-encoded: twice as many characters).
pub const TOKEN_BYTES: usize = 32;

/// The name of the Secret holding a bootstrapped Sandbox's agent token: `<sandbox>-agent-token`
/// (the Sandbox's name shortened so the whole stays a valid object name).
pub fn token_secret_name(sandbox: &str) -> String {
    const SUFFIX: &str = "-agent-token";
    let keep = 253 - SUFFIX.len();
    let mut base: String = sandbox.chars().take(keep).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}{SUFFIX}")
}

/// The Secret key the agent client reads the token from: `agent.tokenSecretRef`, else, with
/// bootstrap, the minted token's Secret.
pub fn token_ref(spec: &SandboxSpec, sandbox: &str) -> Option<SecretKeyRef> {
    spec.agent.token_secret_ref.clone().or_else(|| {
        spec.agent.bootstrap.as_ref().map(|_| SecretKeyRef {
            name: token_secret_name(sandbox),
            key: TOKEN_KEY.into(),
        })
    })
}

/// The redactor source a Sandbox's minted token is registered under.
pub fn redaction_source(uid: &str) -> String {
    format!("sandbox-agent-token/{uid}")
}

/// A new agent token: [`TOKEN_BYTES`] bytes from the CSPRNG of the process's TLS provider
/// (aws-lc), hex-encoded.
pub fn mint_token() -> Result<String, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system's random number generator failed".to_string())?;
    Ok(hex::encode(bytes))
}

/// `s` as one shell word in single quotes (a `'` becomes `'\''`): nothing in it is expanded.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What the template is filled in with.
#[derive(Clone, PartialEq, Eq)]
pub struct Values<'a> {
    /// The release tarball's URL.
    pub download_url: &'a str,
    /// The tarball's sha256 (hex).
    pub sha256: &'a str,
    /// The port the agent listens on (`agent.port`).
    pub agent_port: i32,
    /// The minted token.
    pub token: &'a str,
    /// The agent's configuration, when the spec gives one.
    pub config: Option<&'a str>,
}

impl std::fmt::Debug for Values<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Values")
            .field("download_url", &self.download_url)
            .field("sha256", &self.sha256)
            .field("agent_port", &self.agent_port)
            .field("token", &"<redacted>")
            .field("config", &self.config.map(str::len))
            .finish()
    }
}

/// Why the user data could not be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A value holds a NUL byte, which no shell word can carry.
    #[error("{0} holds a NUL byte")]
    Nul(&'static str),
    /// The template holds a `{{...}}` placeholder this version does not fill.
    #[error("the template has an unknown placeholder {0}")]
    UnknownPlaceholder(String),
}

/// `template` with every placeholder replaced by its value as one shell-quoted word.
pub fn render(template: &str, v: &Values<'_>) -> Result<String, RenderError> {
    use base64::Engine as _;
    for (what, s) in [
        ("downloadUrl", v.download_url),
        ("sha256", v.sha256),
        ("the token", v.token),
        ("config", v.config.unwrap_or_default()),
    ] {
        if s.contains('\0') {
            return Err(RenderError::Nul(what));
        }
    }
    let config = v
        .config
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        .unwrap_or_default();
    let port = v.agent_port.to_string();
    let mut out = String::with_capacity(template.len() + config.len() + 128);
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail.find("}}").map(|e| e + 2).unwrap_or(tail.len());
        let value = match &tail[..end] {
            "{{DOWNLOAD_URL}}" => v.download_url,
            "{{SHA256}}" => v.sha256,
            "{{AGENT_PORT}}" => port.as_str(),
            "{{AGENT_TOKEN}}" => v.token,
            "{{AGENT_CONFIG_B64}}" => config.as_str(),
            other => return Err(RenderError::UnknownPlaceholder(other.to_string())),
        };
        out.push_str(&sh_quote(value));
        rest = &tail[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Why a bootstrapped launch is held back before any EC2 call (reported as Ready=False and
/// InstanceRunning=False with [`Hold::reason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The rendered user data is larger than EC2 accepts.
    UserDataTooLarge {
        /// Its size in bytes (before base64).
        bytes: usize,
    },
    /// The template could not be filled in.
    Render(String),
    /// The token Secret's name is taken by a Secret this Sandbox does not own.
    TokenSecretConflict {
        /// namespace/name of the Secret.
        secret: String,
    },
    /// The token Secret exists but holds no usable token.
    TokenSecretInvalid {
        /// namespace/name of the Secret.
        secret: String,
    },
    /// No token could be minted.
    Mint(String),
}

impl Hold {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Hold::UserDataTooLarge { .. } => "BootstrapUserDataTooLarge",
            Hold::Render(_) => "BootstrapRenderFailed",
            Hold::TokenSecretConflict { .. } => "AgentTokenSecretConflict",
            Hold::TokenSecretInvalid { .. } => "AgentTokenSecretInvalid",
            Hold::Mint(_) => "AgentTokenMintFailed",
        }
    }

    /// What is wrong and what to do (never the token).
    pub fn message(&self) -> String {
        match self {
            Hold::UserDataTooLarge { bytes } => format!(
                "the bootstrap user data is {bytes} bytes once rendered; EC2 accepts at most {MAX_USER_DATA_BYTES}: shorten spec.agent.bootstrap.config"
            ),
            Hold::Render(e) => format!(
                "the bootstrap user data could not be rendered: {e}; the instance is not launched"
            ),
            Hold::TokenSecretConflict { secret } => format!(
                "the Secret {secret} exists but is not owned by this Sandbox: the operator mints the agent token there; delete or rename that Secret (an earlier Sandbox's is removed by the garbage collector)"
            ),
            Hold::TokenSecretInvalid { secret } => format!(
                "the agent token Secret {secret} has no usable key {TOKEN_KEY:?} (at least 16 characters): delete it and the operator mints a new token"
            ),
            Hold::Mint(e) => format!("minting the agent token failed: {e}"),
        }
    }
}

/// The user data for `values`: the rendered [`TEMPLATE`], refused when larger than EC2's limit
/// ([`MAX_USER_DATA_BYTES`], before base64).
pub fn user_data(values: &Values<'_>) -> Result<String, Hold> {
    user_data_from(TEMPLATE, values)
}

fn user_data_from(template: &str, values: &Values<'_>) -> Result<String, Hold> {
    let text = render(template, values).map_err(|e| Hold::Render(e.to_string()))?;
    if text.len() > MAX_USER_DATA_BYTES {
        return Err(Hold::UserDataTooLarge { bytes: text.len() });
    }
    Ok(text)
}

/// The validate step's share: the checks of `agent.bootstrap` the CRD makes, for objects stored
/// without them, and the parse of `registrationTimeout`. Problems are pushed to `problems`; the
/// timeout is returned when bootstrap is set and it parses.
pub fn check_spec(spec: &SandboxSpec, problems: &mut Vec<String>) -> Option<Duration> {
    let b: &BootstrapSpec = spec.agent.bootstrap.as_ref()?;
    if spec.launch.is_none() {
        problems.push(
            "agent.bootstrap needs spec.launch: it installs the agent on an instance the operator launches".into(),
        );
    }
    if spec
        .launch
        .as_ref()
        .is_some_and(|l| l.user_data_secret_ref.is_some())
    {
        problems.push(
            "agent.bootstrap renders the user data: leave spec.launch.userDataSecretRef unset"
                .into(),
        );
    }
    if spec.agent.token_secret_ref.is_some() {
        problems.push(
            "agent.bootstrap mints the agent's token: leave agent.tokenSecretRef unset".into(),
        );
    }
    let url_ok = reqwest::Url::parse(&b.download_url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        && !b.download_url.chars().any(char::is_whitespace);
    if !url_ok {
        problems.push(format!(
            "agent.bootstrap.downloadUrl {:?} must be an http:// or https:// URL with a host and no spaces",
            b.download_url
        ));
    }
    if !(b.sha256.len() == 64
        && b.sha256
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
    {
        problems.push("agent.bootstrap.sha256 must be 64 lower-case hex digits".into());
    }
    match parse_duration(&b.registration_timeout) {
        Ok(d) if d >= Duration::from_secs(1) => Some(d),
        Ok(_) => {
            problems.push("agent.bootstrap.registrationTimeout must be at least 1s".into());
            None
        }
        Err(e) => {
            problems.push(format!("agent.bootstrap.registrationTimeout: {e}"));
            None
        }
    }
}

/// The agent token of a bootstrapped Sandbox: read from its Secret, or minted into a new one
/// owned by the Sandbox. Registered with the process redactor either way.
pub async fn token(client: &kube::Client, obj: &crate::api::Sandbox) -> Result<String, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let uid = obj.uid().unwrap_or_default();
    let name = token_secret_name(&obj.name_any());
    let secret = format!("{ns}/{name}");
    let object = crate::controller::key(obj);
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let held = |hold: Hold| Error::LaunchHeld {
        object: object.clone(),
        hold: super::decide::LaunchHold::Bootstrap(hold),
    };
    for _ in 0..2 {
        if let Some(s) = api
            .get_opt(&name)
            .await
            .map_err(|source| Error::ReadingAgentToken {
                object: object.clone(),
                source,
            })?
        {
            let owned = s
                .metadata
                .owner_references
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| o.uid == uid);
            if !owned {
                return Err(held(Hold::TokenSecretConflict { secret }));
            }
            let token = s
                .data
                .as_ref()
                .and_then(|d| d.get(TOKEN_KEY))
                .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
                .filter(|t| t.len() >= 16);
            let Some(token) = token else {
                return Err(held(Hold::TokenSecretInvalid { secret }));
            };
            crate::redact::process().set_values(&redaction_source(&uid), [token.clone()]);
            return Ok(token);
        }
        let token = mint_token().map_err(|e| held(Hold::Mint(e)))?;
        // Known to the redactor before it goes anywhere.
        crate::redact::process().set_values(&redaction_source(&uid), [token.clone()]);
        let new = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "sandbox-operator".to_string(),
                    )]
                    .into(),
                ),
                owner_references: Some(vec![OwnerReference {
                    api_version: crate::api::Sandbox::api_version(&()).into_owned(),
                    kind: crate::api::Sandbox::kind(&()).into_owned(),
                    name: obj.name_any(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                [(
                    TOKEN_KEY.to_string(),
                    ByteString(token.clone().into_bytes()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &new).await {
            Ok(_) => {
                tracing::info!(sandbox = %object, secret = %secret, "minted the agent token");
                return Ok(token);
            }
            // Created meanwhile (another reconcile): read that one.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(source) => {
                return Err(Error::MintingAgentToken {
                    object: object.clone(),
                    source,
                });
            }
        }
    }
    Err(held(Hold::TokenSecretConflict { secret }))
}

/// The rendered user data for a bootstrapped launch (minting its token first), as EC2 wants it:
/// base64.
pub async fn launch_user_data(
    client: &kube::Client,
    obj: &crate::api::Sandbox,
    b: &BootstrapSpec,
) -> Result<String, Error> {
    use base64::Engine as _;
    let token = token(client, obj).await?;
    let text = user_data(&Values {
        download_url: &b.download_url,
        sha256: &b.sha256,
        agent_port: obj.spec.agent.port,
        token: &token,
        config: b.config.as_deref(),
    })
    .map_err(|hold| Error::LaunchHeld {
        object: crate::controller::key(obj),
        hold: super::decide::LaunchHold::Bootstrap(hold),
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn values<'a>(url: &'a str, config: Option<&'a str>) -> Values<'a> {
        Values {
            download_url: url,
            sha256: SHA,
            agent_port: 8123,
            token: TOKEN,
            config,
        }
    }

    /// What bash makes of the rendered script's assignment to `var`: the script's block of
    /// assignments run by bash, then `var` printed.
    fn shell_value(script: &str, var: &str) -> String {
        let start = script.find("\ndownload_url=").expect("the assignments") + 1;
        let end = script
            .find("\n# ---- Where things go")
            .expect("the block's end");
        let mut prefix = format!("set -eu\n{}\n", &script[start..end]);
        assert!(
            prefix.contains(&format!("\n{var}=")),
            "no assignment to {var}"
        );
        prefix.push_str(&format!("printf '%s' \"${var}\"\n"));
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&prefix)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_template_holds_exactly_the_known_placeholders() {
        for p in PLACEHOLDERS {
            assert_eq!(TEMPLATE.matches(p).count(), 1, "{p}");
        }
        assert_eq!(TEMPLATE.matches("{{").count(), PLACEHOLDERS.len());
        assert!(
            TEMPLATE.starts_with("#!/bin/bash\n"),
            "cloud-init runs a #! script"
        );
    }

    #[test]
    fn render_fills_in_token_url_sha256_port_and_config() {
        let url = "https://downloads.example.com/sandbox-agent-0.1.0-linux-x86_64.tar.gz";
        let config = "listen: 0.0.0.0:1\nchecks: {warnPercent: 99}\n";
        let text = user_data(&values(url, Some(config))).unwrap();
        assert!(!text.contains("{{"), "a placeholder is left");
        assert_eq!(shell_value(&text, "download_url"), url);
        assert_eq!(shell_value(&text, "sha256"), SHA);
        assert_eq!(shell_value(&text, "agent_port"), "8123");
        assert_eq!(shell_value(&text, "agent_token"), TOKEN);
        use base64::Engine as _;
        let b64 = shell_value(&text, "agent_config_b64");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            config.as_bytes()
        );
        // Without a config, the tarball's own: an empty word.
        let text = user_data(&values(url, None)).unwrap();
        assert_eq!(shell_value(&text, "agent_config_b64"), "");
        // The script is valid bash.
        let out = std::process::Command::new("bash")
            .args(["-n", "-c", &text])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn special_characters_stay_one_word_and_run_nothing() {
        let url = "https://h.example/a'b\"c$(touch /tmp/pwned-bootstrap)`id`\\d;e&f|g\nrm -rf /";
        let text = render(TEMPLATE, &values(url, None)).unwrap();
        assert_eq!(shell_value(&text, "download_url"), url);
        assert!(!std::path::Path::new("/tmp/pwned-bootstrap").exists());
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(
            render(
                "x={{SHA256}}",
                &Values {
                    sha256: "a\0b",
                    ..values("u", None)
                }
            ),
            Err(RenderError::Nul("sha256"))
        );
        assert_eq!(
            render("x={{NOPE}}", &values("u", None)),
            Err(RenderError::UnknownPlaceholder("{{NOPE}}".into()))
        );
    }

    #[test]
    fn user_data_over_16_kib_is_refused_with_its_size() {
        let url = "https://h.example/a.tar.gz";
        let small = user_data(&values(url, None)).unwrap();
        assert!(
            small.len() < 8 * 1024,
            "the template alone is {} bytes",
            small.len()
        );
        // The config travels base64-encoded: 4/3 of its size.
        let big = "#".repeat(12 * 1024);
        match user_data(&values(url, Some(&big))) {
            Err(Hold::UserDataTooLarge { bytes }) => {
                assert!(bytes > MAX_USER_DATA_BYTES, "{bytes}");
                let h = Hold::UserDataTooLarge { bytes };
                assert_eq!(h.reason(), "BootstrapUserDataTooLarge");
                assert!(h.message().contains(&bytes.to_string()));
            }
            other => panic!("{other:?}"),
        }
        // Exactly at the limit is accepted; one byte more is not.
        let template = "x={{AGENT_TOKEN}}";
        let fill = MAX_USER_DATA_BYTES - render(template, &values(url, None)).unwrap().len();
        let at_limit = format!("{template}{}", "y".repeat(fill));
        assert_eq!(
            user_data_from(&at_limit, &values(url, None)).unwrap().len(),
            MAX_USER_DATA_BYTES
        );
        let over = format!("{at_limit}z");
        assert_eq!(
            user_data_from(&over, &values(url, None)),
            Err(Hold::UserDataTooLarge {
                bytes: MAX_USER_DATA_BYTES + 1
            })
        );
    }

    #[test]
    fn minted_tokens_are_long_random_hex_and_never_printed() {
        let a = mint_token().unwrap();
        let b = mint_token().unwrap();
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let v = Values {
            token: &a,
            ..values("u", None)
        };
        assert!(!format!("{v:?}").contains(&a));
    }

    #[test]
    fn token_secret_names() {
        assert_eq!(token_secret_name("web-1"), "web-1-agent-token");
        let long = format!("{}-x", "a".repeat(300));
        let n = token_secret_name(&long);
        assert!(n.len() <= 253 && n.ends_with("-agent-token"), "{n}");
    }

    fn spec(bootstrap: serde_json::Value) -> SandboxSpec {
        serde_json::from_value(serde_json::json!({
            "environment": "dev",
            "instanceType": "t3.large",
            "launch": {"imageId": "ami-12345678"},
            "agent": {"bootstrap": bootstrap},
        }))
        .unwrap()
    }

    #[test]
    fn check_spec_parses_the_timeout_once_and_names_each_problem() {
        let mut p = Vec::new();
        let s = spec(
            serde_json::json!({"downloadUrl": "https://h.example/a.tgz", "sha256": SHA, "registrationTimeout": "90s"}),
        );
        assert_eq!(check_spec(&s, &mut p), Some(Duration::from_secs(90)));
        assert!(p.is_empty(), "{p:?}");
        let s = spec(serde_json::json!({"downloadUrl": "https://h.example/a.tgz", "sha256": SHA}));
        assert_eq!(
            check_spec(&s, &mut p),
            Some(Duration::from_secs(600)),
            "default 10m"
        );
        let mut s = spec(
            serde_json::json!({"downloadUrl": "ftp://h/a b", "sha256": "ABC", "registrationTimeout": "soon"}),
        );
        s.agent.token_secret_ref = Some(SecretKeyRef {
            name: "t".into(),
            key: "k".into(),
        });
        s.launch = None;
        assert_eq!(check_spec(&s, &mut p), None);
        let all = p.join("\n");
        for want in [
            "needs spec.launch",
            "leave agent.tokenSecretRef unset",
            "downloadUrl",
            "sha256 must be 64",
            "registrationTimeout",
        ] {
            assert!(all.contains(want), "{want} missing in {all}");
        }
        // Without bootstrap: nothing to check.
        let mut p = Vec::new();
        let mut s = spec(serde_json::json!(null));
        s.agent.bootstrap = None;
        assert_eq!(check_spec(&s, &mut p), None);
        assert!(p.is_empty());
    }
}
