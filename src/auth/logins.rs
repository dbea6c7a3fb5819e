//! pgwarden's own logins besides the service user: one per mapped role
//! (`[pool] isolation = "role"`) and the tag reader. Their passwords are
//! derived from the service password, so the operator keeps one secret:
//! `hex(HMAC-SHA-256(service_password, "pgwarden-login-v1\0" || login))`.
//!
//! Invariant: a login name is exactly what PostgreSQL stores (at most 63
//! bytes, never silently truncated), so the login `migrate` creates is the
//! one the pool logs in as.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// PostgreSQL's identifier limit (`NAMEDATALEN` - 1).
const MAX_NAME: usize = 63;
const DOMAIN: &[u8] = b"pgwarden-login-v1\0";

/// The password of `login`, derived from the service password.
pub fn derived_password(secret: &str, login: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key size");
    mac.update(DOMAIN);
    mac.update(login.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The login that serves `role` under `pattern` (`{role}` replaced), or
/// why there is none.
pub fn role_login(pattern: &str, role: &str) -> Result<String, String> {
    let login = pattern.replace("{role}", role);
    if login.len() > MAX_NAME {
        return Err(format!(
            "the login for role \"{role}\" would be \"{login}\", longer than PostgreSQL's 63-byte names ([pool] role_login)"
        ));
    }
    Ok(login)
}

/// Whether `name` has the shape of a login made from `pattern`.
pub fn is_role_login(pattern: &str, name: &str) -> bool {
    let (prefix, suffix) = pattern.split_once("{role}").unwrap_or((pattern, ""));
    name.len() > prefix.len() + suffix.len() && name.starts_with(prefix) && name.ends_with(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_differ_per_login_and_secret() {
        let a = derived_password("s", "pgwarden_svc_analyst");
        assert_eq!(a.len(), 64);
        assert_ne!(a, derived_password("s", "pgwarden_svc_engineer"));
        assert_ne!(a, derived_password("t", "pgwarden_svc_analyst"));
        assert_eq!(a, derived_password("s", "pgwarden_svc_analyst"));
    }

    #[test]
    fn login_names_are_never_truncated() {
        assert_eq!(
            role_login("pgwarden_svc_{role}", "analyst").unwrap(),
            "pgwarden_svc_analyst"
        );
        let long = "r".repeat(60);
        assert!(role_login("pgwarden_svc_{role}", &long).is_err());
        assert!(is_role_login("pgwarden_svc_{role}", "pgwarden_svc_analyst"));
        assert!(!is_role_login("pgwarden_svc_{role}", "pgwarden_svc_"));
        assert!(!is_role_login("pgwarden_svc_{role}", "analyst"));
    }
}
