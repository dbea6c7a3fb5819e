//! TEMPORARY stand-in for policies (being written separately).
use serde::Deserialize;
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);
#[derive(Debug, Clone)]
pub struct Rule {
    pub clients: Vec<String>,
    pub role: String,
    pub databases: Option<Vec<String>>,
    pub file: PathBuf,
    pub line: usize,
}
#[derive(Deserialize)]
struct File {
    map: Vec<Map>,
}
#[derive(Deserialize)]
struct Map {
    clients: Vec<String>,
    role: String,
    databases: Option<Vec<String>>,
}
pub struct Policy {
    rules: Vec<Rule>,
}
impl Policy {
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| PolicyError(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut rules = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| PolicyError(e.to_string()))?;
            let parsed: File =
                toml::from_str(&text).map_err(|e| PolicyError(format!("{}: {e}", f.display())))?;
            for m in parsed.map {
                rules.push(Rule {
                    clients: m.clients,
                    role: m.role,
                    databases: m.databases,
                    file: f.clone(),
                    line: 0,
                });
            }
        }
        Ok(Policy { rules })
    }
    pub fn from_rules(rules: Vec<Rule>) -> Result<Policy, PolicyError> {
        Ok(Policy { rules })
    }
    pub fn resolve(&self, user: &str, database: &str) -> Option<String> {
        let m = |pats: &[String], s: &str| {
            pats.iter()
                .any(|p| glob::Pattern::new(p).map(|g| g.matches(s)).unwrap_or(false))
        };
        self.rules
            .iter()
            .find(|r| m(&r.clients, user) && r.databases.as_ref().is_none_or(|d| m(d, database)))
            .map(|r| r.role.replace("{user}", user))
    }
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}
