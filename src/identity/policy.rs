//! Policies: which database role a client user gets in which database
//! (`policies/*.toml`, DESIGN.md section 5).
//!
//! ```toml
//! [[map]]
//! clients   = ["alice", "svc_*"]   # exact names or globs
//! role      = "analyst"            # "{user}" = a role named like the client
//! databases = ["sales"]            # optional; omitted = every database
//! ```
//!
//! Invariant: a [`Policy`] only exists if every rule in it is valid (known
//! keys, non-empty lists, valid globs, a non-empty role whose only
//! placeholder is `{user}`), so [`Policy::resolve`] cannot fail. Files load
//! in file-name order (names starting with `.` are skipped), rules in file
//! order, the first matching rule wins, and no match means deny. Every error
//! names the file and the line.

use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};
use serde::Deserialize;
use toml::Spanned;

/// One `[[map]]` rule, as written.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Client user names or globs (`svc_*`); matched case-sensitively, as
    /// PostgreSQL user names are.
    pub clients: Vec<String>,
    /// The database role; `{user}` stands for the client user name.
    pub role: String,
    /// Database names or globs; `None` matches every database.
    pub databases: Option<Vec<String>>,
    /// The file the rule came from, for messages.
    pub file: PathBuf,
    /// The line of its `[[map]]` header (1-based).
    pub line: usize,
}

/// Why a policy could not be loaded. Each variant names the place to fix.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The configured `policy_dir` is not there.
    #[error("policy directory {} does not exist", dir.display())]
    MissingDir { dir: PathBuf },
    /// The directory exists but cannot be listed.
    #[error("cannot read policy directory {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// No policy files: nobody could ever be mapped.
    #[error("policy directory {} contains no *.toml files", dir.display())]
    NoFiles { dir: PathBuf },
    /// Policy files, but not one rule in them.
    #[error("policy directory {} defines no [[map]] rules", dir.display())]
    NoRules { dir: PathBuf },
    /// A policy file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A syntax error, an unknown key or an invalid value, at `path:line`.
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// A loaded, validated set of rules.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    compiled: Vec<Compiled>,
    /// [`Policy::digest`], computed once.
    digest: String,
}

#[derive(Debug, Clone)]
struct Compiled {
    clients: Vec<Matcher>,
    databases: Option<Vec<Matcher>>,
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Glob(Pattern),
}

impl Matcher {
    fn new(s: &str) -> Result<Matcher, String> {
        if !s.contains(['*', '?', '[', ']']) {
            return Ok(Matcher::Exact(s.to_string()));
        }
        Pattern::new(s)
            .map(Matcher::Glob)
            .map_err(|e| format!("invalid glob {s:?}: {}", e.msg))
    }

    fn matches(&self, s: &str) -> bool {
        const OPTIONS: MatchOptions = MatchOptions {
            case_sensitive: true,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        match self {
            Matcher::Exact(e) => e == s,
            Matcher::Glob(p) => p.matches_with(s, OPTIONS),
        }
    }
}

/// Which part of a rule a problem is in, so the loader can point at it.
enum Field {
    Clients(Option<usize>),
    Role,
    Databases(Option<usize>),
}

fn compile(rule: &Rule) -> Result<Compiled, (Field, String)> {
    if rule.clients.is_empty() {
        return Err((
            Field::Clients(None),
            "clients must list at least one name".into(),
        ));
    }
    let mut clients = Vec::with_capacity(rule.clients.len());
    for (i, c) in rule.clients.iter().enumerate() {
        if c.is_empty() {
            return Err((
                Field::Clients(Some(i)),
                "client names must not be empty".into(),
            ));
        }
        clients.push(Matcher::new(c).map_err(|m| (Field::Clients(Some(i)), m))?);
    }
    if rule.role.is_empty() {
        return Err((Field::Role, "role must not be empty".into()));
    }
    if rule.role.replace("{user}", "").contains(['{', '}']) {
        return Err((
            Field::Role,
            format!("role {:?}: the only placeholder is {{user}}", rule.role),
        ));
    }
    let databases = match &rule.databases {
        None => None,
        Some(list) if list.is_empty() => {
            return Err((
                Field::Databases(None),
                "databases must not be empty (omit it to match every database)".into(),
            ))
        }
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, d) in list.iter().enumerate() {
                if d.is_empty() {
                    return Err((
                        Field::Databases(Some(i)),
                        "database names must not be empty".into(),
                    ));
                }
                out.push(Matcher::new(d).map_err(|m| (Field::Databases(Some(i)), m))?);
            }
            Some(out)
        }
    };
    Ok(Compiled { clients, databases })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    map: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    clients: Spanned<Vec<Spanned<String>>>,
    role: Spanned<String>,
    #[serde(default)]
    databases: Option<Spanned<Vec<Spanned<String>>>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// See [`Policy::digest`].
fn digest_of(rules: &[Rule]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for rule in rules {
        let canonical = serde_json::json!({
            "clients": rule.clients,
            "databases": rule.databases,
            "role": rule.role,
        });
        hash.update(canonical.to_string().as_bytes());
        hash.update(b"\n");
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}

impl Policy {
    /// Loads every `*.toml` file of `dir` in file-name order. A missing
    /// directory, one without policy files, or files without rules are
    /// errors: a gateway that maps nobody is a configuration mistake.
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let entries = std::fs::read_dir(dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => PolicyError::MissingDir {
                dir: dir.to_path_buf(),
            },
            _ => PolicyError::Dir {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PolicyError::Dir {
                dir: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name();
            let visible = !name.to_string_lossy().starts_with('.');
            if visible && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(PolicyError::NoFiles {
                dir: dir.to_path_buf(),
            });
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        let mut rules = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
                path: path.clone(),
                source,
            })?;
            rules.extend(parse_file(&text, &path)?);
        }
        if rules.is_empty() {
            return Err(PolicyError::NoRules {
                dir: dir.to_path_buf(),
            });
        }
        Policy::from_rules(rules)
    }

    /// A policy from rules built in code (tests, reloads). Errors point at
    /// each rule's `file` and `line`. An empty list is allowed and denies
    /// everyone.
    pub fn from_rules(rules: Vec<Rule>) -> Result<Policy, PolicyError> {
        let compiled = rules
            .iter()
            .map(|r| {
                compile(r).map_err(|(_, message)| PolicyError::Invalid {
                    path: r.file.clone(),
                    line: r.line,
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let digest = digest_of(&rules);
        Ok(Policy {
            rules,
            compiled,
            digest,
        })
    }

    /// `sha256:<hex>` of what the rules mean (each rule's clients,
    /// databases and role, in order; not file names, lines or comments):
    /// gateways with the same digest map every client alike. `policy check`
    /// prints it and every `session_start` record carries it.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The database role for `client_user` connecting to `database`: the
    /// first matching rule's role with `{user}` replaced, or `None` (deny).
    pub fn resolve(&self, client_user: &str, database: &str) -> Option<String> {
        self.rules.iter().zip(&self.compiled).find_map(|(rule, c)| {
            let client_ok = c.clients.iter().any(|m| m.matches(client_user));
            let db_ok = c
                .databases
                .as_ref()
                .is_none_or(|dbs| dbs.iter().any(|m| m.matches(database)));
            (client_ok && db_ok).then(|| rule.role.replace("{user}", client_user))
        })
    }

    /// The rules in match order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// Parses one policy file into rules, pointing errors at their line.
fn parse_file(text: &str, path: &Path) -> Result<Vec<Rule>, PolicyError> {
    let invalid = |offset: usize, message: String| PolicyError::Invalid {
        path: path.to_path_buf(),
        line: line_of(text, offset),
        message,
    };
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        invalid(offset, e.message().trim_end().replace('\n', " "))
    })?;
    let mut rules = Vec::with_capacity(doc.map.len());
    for spanned in doc.map {
        let header = spanned.span().start;
        let raw = spanned.into_inner();
        let rule = Rule {
            clients: raw
                .clients
                .get_ref()
                .iter()
                .map(|s| s.get_ref().clone())
                .collect(),
            role: raw.role.get_ref().clone(),
            databases: raw
                .databases
                .as_ref()
                .map(|d| d.get_ref().iter().map(|s| s.get_ref().clone()).collect()),
            file: path.to_path_buf(),
            line: line_of(text, header),
        };
        if let Err((field, message)) = compile(&rule) {
            let offset = match field {
                Field::Clients(None) => raw.clients.span().start,
                Field::Clients(Some(i)) => raw.clients.get_ref()[i].span().start,
                Field::Role => raw.role.span().start,
                Field::Databases(i) => {
                    let d = raw
                        .databases
                        .as_ref()
                        .expect("databases present when invalid");
                    i.map_or(d.span().start, |i| d.get_ref()[i].span().start)
                }
            };
            return Err(invalid(offset, message));
        }
        rules.push(rule);
    }
    Ok(rules)
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    fn rule(clients: &[&str], role: &str, file: &str, line: usize) -> Rule {
        Rule {
            clients: clients.iter().map(|c| c.to_string()).collect(),
            role: role.into(),
            databases: None,
            file: file.into(),
            line,
        }
    }

    #[test]
    fn the_digest_is_what_the_rules_mean() {
        let a = Policy::from_rules(vec![rule(&["alice"], "analyst", "a.toml", 1)]).unwrap();
        let moved = Policy::from_rules(vec![rule(&["alice"], "analyst", "b.toml", 9)]).unwrap();
        let other = Policy::from_rules(vec![rule(&["alice"], "engineer", "a.toml", 1)]).unwrap();
        assert_eq!(a.digest(), moved.digest());
        assert_ne!(a.digest(), other.digest());
        assert!(a.digest().starts_with("sha256:") && a.digest().len() == 71);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(clients: &[&str], role: &str, databases: Option<&[&str]>) -> Rule {
        Rule {
            clients: clients.iter().map(|s| s.to_string()).collect(),
            role: role.into(),
            databases: databases.map(|d| d.iter().map(|s| s.to_string()).collect()),
            file: PathBuf::from("test.toml"),
            line: 1,
        }
    }

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn load_err(files: &[(&str, &str)]) -> String {
        let dir = dir_with(files);
        Policy::load_dir(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let p = Policy::from_rules(vec![
            rule(&["alice"], "admin", None),
            rule(&["alice", "bob"], "analyst", None),
        ])
        .unwrap();
        assert_eq!(p.resolve("alice", "db").as_deref(), Some("admin"));
        assert_eq!(p.resolve("bob", "db").as_deref(), Some("analyst"));
        assert_eq!(p.resolve("carol", "db"), None);
        assert_eq!(p.resolve("Alice", "db"), None, "names are case-sensitive");
    }

    #[test]
    fn globs_user_placeholder_and_databases() {
        let p = Policy::from_rules(vec![
            rule(&["svc_*"], "{user}", Some(&["sales", "report_?"])),
            rule(&["svc_*"], "svc_readonly", None),
            rule(&["*"], "u_{user}", Some(&["public_*"])),
        ])
        .unwrap();
        assert_eq!(p.resolve("svc_etl", "sales").as_deref(), Some("svc_etl"));
        assert_eq!(p.resolve("svc_etl", "report_1").as_deref(), Some("svc_etl"));
        assert_eq!(
            p.resolve("svc_etl", "report_12").as_deref(),
            Some("svc_readonly")
        );
        assert_eq!(
            p.resolve("svc_etl", "other").as_deref(),
            Some("svc_readonly")
        );
        assert_eq!(p.resolve("dave", "public_x").as_deref(), Some("u_dave"));
        assert_eq!(p.resolve("dave", "sales"), None);
    }

    #[test]
    fn files_load_in_name_order_and_rules_in_file_order() {
        let dir = dir_with(&[
            ("20-rest.toml", "[[map]]\nclients = [\"*\"]\nrole = \"guest\"\n"),
            (
                "10-team.toml",
                "[[map]]\nclients = [\"alice\"]\nrole = \"lead\"\n\n[[map]]\nclients = [\"alice\", \"bob\"]\nrole = \"dev\"\n",
            ),
            ("notes.txt", "not a policy"),
            (".hidden.toml", "garbage ="),
        ]);
        let p = Policy::load_dir(dir.path()).unwrap();
        assert_eq!(p.rules().len(), 3);
        assert_eq!(p.rules()[1].line, 5);
        assert!(p.rules()[0].file.ends_with("10-team.toml"));
        assert_eq!(p.resolve("alice", "x").as_deref(), Some("lead"));
        assert_eq!(p.resolve("bob", "x").as_deref(), Some("dev"));
        assert_eq!(p.resolve("zed", "x").as_deref(), Some("guest"));
    }

    #[test]
    fn missing_and_empty_directories_are_errors() {
        let err = Policy::load_dir(Path::new("/nonexistent/pgwarden-policies")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = load_err(&[]);
        assert!(err.contains("no *.toml files"), "{err}");
        let err = load_err(&[("a.toml", "# nothing yet\n")]);
        assert!(err.contains("no [[map]] rules"), "{err}");
    }

    #[test]
    fn syntax_and_unknown_key_errors_name_file_and_line() {
        let err = load_err(&[(
            "a.toml",
            "[[map]]\nclients = [\"a\"]\nrole = \"r\"\nrol = \"x\"\n",
        )]);
        assert!(err.contains("a.toml:4:"), "{err}");
        assert!(err.contains("rol"), "{err}");
        let err = load_err(&[("b.toml", "[[map]]\nclients = [\"a\"\nrole = \"r\"\n")]);
        assert!(err.contains("b.toml:"), "{err}");
        let err = load_err(&[("c.toml", "[[map]]\nclients = [\"a\"]\n")]);
        assert!(err.contains("c.toml:") && err.contains("role"), "{err}");
        let err = load_err(&[("d.toml", "[[mapp]]\nclients = [\"a\"]\nrole = \"r\"\n")]);
        assert!(err.contains("d.toml:1:") && err.contains("mapp"), "{err}");
    }

    #[test]
    fn semantic_errors_point_at_the_offending_value() {
        let ok = "[[map]]\nclients = [\"a\"]\nrole = \"r\"\n";
        let cases = [
            ("[[map]]\nclients = []\nrole = \"r\"\n", 2, "at least one"),
            (
                "[[map]]\nclients = [\n  \"a\",\n  \"b[\",\n]\nrole = \"r\"\n",
                4,
                "invalid glob",
            ),
            (
                "[[map]]\nclients = [\"a\"]\n\nrole = \"\"\n",
                4,
                "role must not be empty",
            ),
            (
                "[[map]]\nclients = [\"a\"]\nrole = \"{usr}\"\n",
                3,
                "placeholder",
            ),
            (
                "[[map]]\nclients = [\"a\"]\nrole = \"r\"\ndatabases = []\n",
                4,
                "omit it",
            ),
            (
                "[[map]]\nclients = [\"a\"]\nrole = \"r\"\ndatabases = [\"x\", \"\"]\n",
                4,
                "must not be empty",
            ),
        ];
        for (text, line, needle) in cases {
            let err = load_err(&[("00-ok.toml", ok), ("50-bad.toml", text)]);
            assert!(
                err.contains(&format!("50-bad.toml:{line}: ")),
                "{text:?} -> {err}"
            );
            assert!(err.contains(needle), "{text:?} -> {err}");
        }
    }

    #[test]
    fn from_rules_errors_use_the_rule_location() {
        let mut bad = rule(&["a"], "", None);
        bad.file = PathBuf::from("policies/x.toml");
        bad.line = 7;
        let err = Policy::from_rules(vec![bad]).unwrap_err().to_string();
        assert_eq!(err, "policies/x.toml:7: role must not be empty");
        assert!(Policy::from_rules(Vec::new())
            .unwrap()
            .resolve("a", "b")
            .is_none());
    }
}
