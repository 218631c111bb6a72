//! Dashboard sessions: a token presented once at `/login` is kept server-side under a
//! random session id, the browser holds only that id (an `HttpOnly`, `SameSite=Strict`
//! cookie, `Secure` over HTTPS). Every request checks the kept token again against the
//! controller's tokens and revocation list, so a revoked token locks its sessions out at
//! once.
//!
//! Bounded: at most [`MAX_SESSIONS`] sessions (a new one evicts the oldest), each for
//! [`SESSION_TTL`]; failed logins per source address are limited to
//! [`MAX_FAILED_LOGINS`] per [`FAILED_LOGIN_WINDOW`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::RngCore;

/// Name of the session cookie.
pub const COOKIE: &str = "geomx_session";
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 256;
/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed logins a source may make per [`FAILED_LOGIN_WINDOW`] before it gets 429.
pub const MAX_FAILED_LOGINS: u32 = 10;
/// The window of [`MAX_FAILED_LOGINS`].
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Most source addresses whose failed logins are counted (the oldest window is dropped).
const MAX_TRACKED_SOURCES: usize = 4096;

#[derive(Debug)]
struct Session {
    token: String,
    created: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    failures: HashMap<IpAddr, (Instant, u32)>,
}

/// The dashboard's sessions (see the module docs).
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    /// No sessions.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `token` (already checked) under a new session id and returns the id.
    pub fn create(&self, token: &str, now: Instant) -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut inner = self.lock();
        inner
            .sessions
            .retain(|_, s| now.saturating_duration_since(s.created) < SESSION_TTL);
        while inner.sessions.len() >= MAX_SESSIONS {
            let oldest = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => inner.sessions.remove(&k),
                None => break,
            };
        }
        inner.sessions.insert(
            id.clone(),
            Session {
                token: token.to_owned(),
                created: now,
            },
        );
        id
    }

    /// The token of session `id`, unless there is none or it expired.
    pub fn token(&self, id: &str, now: Instant) -> Option<String> {
        let mut inner = self.lock();
        let expired = {
            let s = inner.sessions.get(id)?;
            now.saturating_duration_since(s.created) >= SESSION_TTL
        };
        if expired {
            inner.sessions.remove(id);
            return None;
        }
        inner.sessions.get(id).map(|s| s.token.clone())
    }

    /// Ends session `id` (logout).
    pub fn remove(&self, id: &str) {
        self.lock().sessions.remove(id);
    }

    /// Whether `source` may try to log in now (fewer than [`MAX_FAILED_LOGINS`] failures in
    /// the current window).
    pub fn may_try(&self, source: IpAddr, now: Instant) -> bool {
        let inner = self.lock();
        match inner.failures.get(&source) {
            Some(&(since, n)) => {
                now.saturating_duration_since(since) >= FAILED_LOGIN_WINDOW || n < MAX_FAILED_LOGINS
            }
            None => true,
        }
    }

    /// Counts a failed login of `source`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut inner = self.lock();
        if inner.failures.len() >= MAX_TRACKED_SOURCES && !inner.failures.contains_key(&source) {
            inner.failures.retain(|_, (since, _)| {
                now.saturating_duration_since(*since) < FAILED_LOGIN_WINDOW
            });
            if inner.failures.len() >= MAX_TRACKED_SOURCES {
                let oldest = inner
                    .failures
                    .iter()
                    .min_by_key(|(_, (since, _))| *since)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    inner.failures.remove(&k);
                }
            }
        }
        let entry = inner.failures.entry(source).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= FAILED_LOGIN_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in a `Cookie` header value, if any.
pub fn session_id(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value of a new session (`secure`: over HTTPS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_keep_the_token_until_logout_or_expiry() {
        let s = Sessions::new();
        let t0 = Instant::now();
        let id = s.create("tok-1", t0);
        assert_eq!(id.len(), 64);
        assert_eq!(s.token(&id, t0).as_deref(), Some("tok-1"));
        assert_eq!(s.token("0".repeat(64).as_str(), t0), None);
        let other = s.create("tok-2", t0);
        assert_ne!(id, other);
        s.remove(&id);
        assert_eq!(s.token(&id, t0), None);
        assert_eq!(s.token(&other, t0 + SESSION_TTL), None, "expired");
        assert!(s.is_empty());
    }

    #[test]
    fn the_session_count_is_bounded_by_evicting_the_oldest() {
        let s = Sessions::new();
        let t0 = Instant::now();
        let first = s.create("t", t0);
        for i in 1..=MAX_SESSIONS {
            s.create("t", t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.token(&first, t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn failed_logins_are_limited_per_source_and_window() {
        let s = Sessions::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILED_LOGINS {
            assert!(s.may_try(a, t0));
            s.failed(a, t0);
        }
        assert!(
            !s.may_try(a, t0),
            "the 11th try within the window is refused"
        );
        assert!(s.may_try(b, t0), "other sources are not affected");
        assert!(s.may_try(a, t0 + FAILED_LOGIN_WINDOW), "a new window");
    }

    #[test]
    fn the_cookie_is_parsed_strictly_and_set_with_its_attributes() {
        let id = "ab".repeat(32);
        assert_eq!(
            session_id(&format!("x=1; {COOKIE}={id}; y=2")),
            Some(id.as_str())
        );
        assert_eq!(session_id(&format!("{COOKIE}=short")), None);
        assert_eq!(session_id(&format!("{COOKIE}={}", "zz".repeat(32))), None);
        assert_eq!(session_id("other=1"), None);
        let c = set_cookie(&id, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(!set_cookie(&id, false).contains("Secure"));
        assert!(clear_cookie(true).contains("Max-Age=0"));
    }
}
