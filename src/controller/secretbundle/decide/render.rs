//! The render step: the source Secrets into one deterministic `.env` ([`Content`]), or every
//! problem that stands in the way ([`SourceProblem`]).

use super::*;

// ---------------------------------------------------------------------------------------------
// Content: the sources rendered into one `.env`.
// ---------------------------------------------------------------------------------------------

/// One source Secret as read: its data, or `None` when it does not exist.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceData {
    /// The Secret's name.
    pub name: String,
    /// Its data (`None`: the Secret does not exist).
    pub data: Option<BTreeMap<String, Vec<u8>>>,
}

impl fmt::Debug for SourceData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceData")
            .field("name", &self.name)
            .field(
                "keys",
                &self.data.as_ref().map(|d| d.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// The rendered bundle: the variables, the `.env` text and its sha256.
#[derive(Clone, PartialEq, Eq)]
pub struct Content {
    /// Key to value (sorted).
    pub vars: BTreeMap<String, String>,
    /// The `.env` text, as the agent writes it.
    pub env: String,
    /// sha256 (hex) of `env`'s bytes: the content hash.
    pub hash: String,
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Content")
            .field("keys", &self.vars.keys().collect::<Vec<_>>())
            .field("hash", &self.hash)
            .finish()
    }
}

impl Content {
    /// The first 12 hex digits of the hash, for messages.
    pub fn short_hash(&self) -> &str {
        short(&self.hash)
    }
}

pub(super) fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Why the sources cannot be rendered. Messages name Secrets and keys, never values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceProblem {
    /// A Secret key that is not an environment variable name.
    InvalidKeyName {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// Two sources (or one source twice) define a key.
    DuplicateKey {
        /// The key.
        key: String,
        /// The Secret that defined it first.
        first: String,
        /// The Secret that defined it again.
        second: String,
    },
    /// A source Secret does not exist.
    SecretMissing {
        /// The Secret.
        secret: String,
    },
    /// A key listed in `keys` is not in the Secret.
    KeyMissing {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A value is not UTF-8.
    NotUtf8 {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A value holds a NUL byte (no environment variable can).
    NulByte {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// The sources hold no key.
    NoKeys,
    /// A duration field of the spec does not parse (stored before the CRD checked it).
    InvalidDuration {
        /// The field, as written in the spec (`spec.refreshInterval`).
        field: &'static str,
        /// What is wrong and what to write instead.
        problem: String,
    },
    /// The sandbox selector is one the API refuses today (stored before the CRD checked it).
    InvalidSelector(InvalidSelector),
}

impl SourceProblem {
    /// The Ready reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceProblem::InvalidKeyName { .. }
            | SourceProblem::DuplicateKey { .. }
            | SourceProblem::InvalidDuration { .. }
            | SourceProblem::InvalidSelector(_) => reason::INVALID_SPEC,
            SourceProblem::NotUtf8 { .. } | SourceProblem::NulByte { .. } => reason::INVALID_VALUE,
            SourceProblem::SecretMissing { .. } => reason::SOURCE_SECRET_MISSING,
            SourceProblem::KeyMissing { .. } => reason::SOURCE_KEY_MISSING,
            SourceProblem::NoKeys => reason::NO_KEYS,
        }
    }
}

impl fmt::Display for SourceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceProblem::InvalidKeyName { secret, key } => write!(
                f,
                "key {key:?} of Secret {secret} is not an environment variable name (letters, digits and _, not starting with a digit); list the valid keys in sources[].keys"
            ),
            SourceProblem::DuplicateKey { key, first, second } if first == second => {
                write!(f, "key {key} is listed twice for Secret {first}")
            }
            SourceProblem::DuplicateKey { key, first, second } => write!(
                f,
                "key {key} is defined by Secret {first} and again by Secret {second}; a key may come from one source only"
            ),
            SourceProblem::SecretMissing { secret } => {
                write!(f, "source Secret {secret} does not exist")
            }
            SourceProblem::KeyMissing { secret, key } => {
                write!(f, "source Secret {secret} has no key {key}")
            }
            SourceProblem::NotUtf8 { secret, key } => {
                write!(
                    f,
                    "the value of key {key} in Secret {secret} is not UTF-8 text"
                )
            }
            SourceProblem::NulByte { secret, key } => write!(
                f,
                "the value of key {key} in Secret {secret} contains a NUL byte, which no environment variable can hold"
            ),
            SourceProblem::NoKeys => write!(
                f,
                "the sources hold no key; nothing is pushed (an empty .env would wipe every target)"
            ),
            SourceProblem::InvalidDuration { field, problem } => write!(f, "{field}: {problem}"),
            SourceProblem::InvalidSelector(invalid) => write!(f, "{invalid}"),
        }
    }
}

/// Renders the sources. Every problem is reported (missing Secrets first), never a value.
pub fn render(
    sources: &[SecretSource],
    data: &[SourceData],
) -> Result<Content, Vec<SourceProblem>> {
    let mut problems = Vec::new();
    for src in sources {
        let found = data.iter().find(|d| d.name == src.secret_name);
        if found.and_then(|d| d.data.as_ref()).is_none() {
            problems.push(SourceProblem::SecretMissing {
                secret: src.secret_name.clone(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for src in sources {
        let secret = &src.secret_name;
        let Some(d) = data
            .iter()
            .find(|d| &d.name == secret)
            .and_then(|d| d.data.as_ref())
        else {
            continue;
        };
        let keys: Vec<&String> = match &src.keys {
            Some(keys) => keys.iter().collect(),
            None => d.keys().collect(),
        };
        for key in keys {
            let Some(bytes) = d.get(key) else {
                problems.push(SourceProblem::KeyMissing {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            };
            if !envfile::is_valid_key(key) {
                problems.push(SourceProblem::InvalidKeyName {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            }
            if let Some(first) = origin.get(key) {
                problems.push(SourceProblem::DuplicateKey {
                    key: key.clone(),
                    first: first.clone(),
                    second: secret.clone(),
                });
                continue;
            }
            origin.insert(key.clone(), secret.clone());
            let Ok(value) = std::str::from_utf8(bytes) else {
                problems.push(SourceProblem::NotUtf8 {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            };
            if value.contains('\0') {
                problems.push(SourceProblem::NulByte {
                    secret: secret.clone(),
                    key: key.clone(),
                });
                continue;
            }
            vars.insert(key.clone(), value.to_string());
        }
    }
    if problems.is_empty() && vars.is_empty() {
        problems.push(SourceProblem::NoKeys);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let env = envfile::render(&vars);
    let hash = envfile::sha256_hex(env.as_bytes());
    Ok(Content { vars, env, hash })
}

/// One message for a list of problems: the first few, and how many more.
pub fn problems_message(problems: &[SourceProblem]) -> String {
    let mut msg = problems
        .iter()
        .take(5)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > 5 {
        msg.push_str(&format!(" (and {} more)", problems.len() - 5));
    }
    msg.push_str("; nothing is pushed");
    msg
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    const SECRET_VALUE: &str = "hunter2-s3cr3t-value";

    #[test]
    fn renders_sorted_and_round_trips_through_the_agents_parser() {
        let nasty = [
            "plain",
            "",
            " leading and trailing spaces ",
            "quote\" and 'single' and \\ backslash",
            "multi\nline\nvalue\n",
            "\r\n windows \r\n",
            "$HOME and ${PATH} and `cmd` and $(cmd)",
            "# not a comment",
            "a=b=c",
            "\"\"\"triple\"\"\"",
            "tab\there",
            "ünïcødé ✓",
            "-----BEGIN KEY-----\nMIIB\n-----END KEY-----",
        ];
        let kv: Vec<(String, String)> = nasty
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("K_{i:02}"), v.to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let c = render(&[src("s", None)], &[data("s", &pairs)]).unwrap();
        let parsed = envfile::parse(&c.env).unwrap().to_map();
        assert_eq!(parsed, c.vars);
        assert_eq!(c.vars.len(), nasty.len());
        // Sorted keys, one file, deterministic hash.
        let keys: Vec<String> = envfile::parse(&c.env)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.key)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let again = render(&[src("s", None)], &[data("s", &pairs)]).unwrap();
        assert_eq!(again.hash, c.hash);
        assert_eq!(c.hash, envfile::sha256_hex(c.env.as_bytes()));
        // The Debug form shows keys and the hash, never a value.
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("K_00") && !dbg.contains("leading and trailing"),
            "{dbg}"
        );
    }

    #[test]
    fn order_of_sources_does_not_change_the_hash() {
        let a = data("a", &[("A", "1"), ("Z", "2")]);
        let b = data("b", &[("M", "3")]);
        let c1 = render(&[src("a", None), src("b", None)], &[a.clone(), b.clone()]).unwrap();
        let c2 = render(&[src("b", None), src("a", None)], &[b, a]).unwrap();
        assert_eq!(c1.hash, c2.hash);
    }

    #[test]
    fn subsets_pick_only_listed_keys() {
        let c = render(
            &[src("a", Some(&["B"]))],
            &[data("a", &[("A", "1"), ("B", "2")])],
        )
        .unwrap();
        assert_eq!(c.vars.keys().collect::<Vec<_>>(), ["B"]);
    }

    #[test]
    fn duplicate_keys_are_an_error_naming_the_key_never_the_value() {
        let err = render(
            &[src("a", None), src("b", None)],
            &[
                data("a", &[("DB_URL", SECRET_VALUE)]),
                data("b", &[("DB_URL", SECRET_VALUE), ("OK", "x")]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            vec![SourceProblem::DuplicateKey {
                key: "DB_URL".into(),
                first: "a".into(),
                second: "b".into()
            }]
        );
        assert_eq!(err[0].reason(), reason::INVALID_SPEC);
        let msg = problems_message(&err);
        assert!(msg.contains("DB_URL") && msg.contains("Secret a") && msg.contains("Secret b"));
        assert!(!msg.contains(SECRET_VALUE), "{msg}");
        // A key listed twice for one source, too.
        let err = render(&[src("a", Some(&["K", "K"]))], &[data("a", &[("K", "v")])]).unwrap_err();
        assert!(matches!(&err[0], SourceProblem::DuplicateKey { key, .. } if key == "K"));
    }

    #[test]
    fn invalid_key_names_are_an_error_naming_the_key() {
        for bad in ["my-key", "1ABC", "tls.crt", "has space", ""] {
            let err = render(&[src("s", None)], &[data("s", &[(bad, SECRET_VALUE)])]).unwrap_err();
            assert_eq!(err[0].reason(), reason::INVALID_SPEC, "{bad}");
            let msg = problems_message(&err);
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(!msg.contains(SECRET_VALUE), "{msg}");
        }
    }

    #[test]
    fn missing_sources_values_and_empty_bundles() {
        let err = render(
            &[src("gone", None), src("here", None)],
            &[
                SourceData {
                    name: "gone".into(),
                    data: None,
                },
                data("here", &[("A", "1")]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            vec![SourceProblem::SecretMissing {
                secret: "gone".into()
            }]
        );
        assert_eq!(err[0].reason(), "SourceSecretMissing");
        assert!(problems_message(&err).contains("gone"));

        let err = render(&[src("s", Some(&["NOPE"]))], &[data("s", &[("A", "1")])]).unwrap_err();
        assert_eq!(err[0].reason(), "SourceKeyMissing");

        let mut d = data("s", &[]);
        d.data
            .as_mut()
            .unwrap()
            .insert("BIN".into(), vec![0xff, 0xfe]);
        let err = render(&[src("s", None)], &[d]).unwrap_err();
        assert_eq!(err[0].reason(), reason::INVALID_VALUE);

        let err = render(&[src("s", None)], &[data("s", &[("N", "a\0b")])]).unwrap_err();
        assert!(matches!(err[0], SourceProblem::NulByte { .. }));

        let err = render(&[src("s", None)], &[data("s", &[])]).unwrap_err();
        assert_eq!(err, vec![SourceProblem::NoKeys]);
    }
}
