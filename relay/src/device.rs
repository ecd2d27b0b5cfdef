//! Device login (RFC 8628) as a sans-IO state machine: every call takes `now`.
//!
//! A client without a token asks for a login ([`DeviceLogins::authorize`]) and gets
//! a secret device code to poll with and a short user code for the operator. The
//! operator approves or denies by the user code; the client's poll
//! ([`DeviceLogins::poll`]) then learns the outcome. An approval hands back what the
//! token should be ([`Grant`]) exactly once; the caller makes the token then, so an
//! approval nobody collects leaves no token behind.
//!
//! Pending logins live in memory only: they last minutes, and after a restart a
//! client just gets `invalid_grant` and starts over, which costs less than
//! persisting half-finished logins. Memory is bounded: at most `max_pending` logins
//! at once and `max_pending_per_source` from one source, and expired ones are
//! forgotten after [`EXPIRED_KEPT`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sidecar_proto::device::{DeviceLoginState, DeviceLoginView};
use sidecar_proto::Scope;

use crate::limits::SourceKey;

/// The user code alphabet: consonants only, without the look-alikes and the
/// letters that spell words by accident (no vowels, no Y).
pub const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a user code (shown with a dash in the middle).
pub const USER_CODE_LEN: usize = 8;
/// How much an interval grows at each `slow_down` (RFC 8628 section 3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// How long an expired login is still reported as `expired_token` before it is
/// forgotten (and its device code reads as unknown).
pub const EXPIRED_KEPT: Duration = Duration::from_secs(600);
/// A poll that arrives this much early still counts as on time: the network can
/// deliver two polls sent a full interval apart a little closer together.
pub const POLL_SLACK: Duration = Duration::from_millis(500);

/// The bounds and timing of device logins (`[device_login]` in relay.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSettings {
    pub expires_in: Duration,
    pub interval: Duration,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
}

impl Default for DeviceSettings {
    fn default() -> DeviceSettings {
        DeviceSettings {
            expires_in: Duration::from_secs(1800),
            interval: Duration::from_secs(5),
            max_pending: 1000,
            max_pending_per_source: 10,
        }
    }
}

/// A login just started: what the client is told.
#[derive(Clone, PartialEq, Eq)]
pub struct Started {
    pub device_code: String,
    /// `XXXX-XXXX`.
    pub user_code: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// Keeps the device code out of logs.
impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("device_code", &"<redacted>")
            .field("user_code", &self.user_code)
            .finish_non_exhaustive()
    }
}

/// Why a login could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizeError {
    #[error("too many device logins are waiting for an operator; try again later")]
    Full,
    #[error("too many device logins from this address are waiting; finish or abandon one first")]
    SourceFull,
    #[error("no random numbers from the operating system")]
    Random,
}

/// What a poll learns, short of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    #[error("the operator has not decided yet; poll again after the interval")]
    Pending,
    #[error("polled faster than the interval; wait {} s between polls from now on", .interval.as_secs())]
    SlowDown { interval: Duration },
    #[error("the device code expired; start the login again")]
    Expired,
    #[error("the operator denied this login")]
    Denied,
    #[error("unknown or already used device code")]
    InvalidGrant,
}

/// An approved login, collected: the token to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user_code: String,
    pub scopes: Vec<Scope>,
    pub approval: Approval,
}

/// What the operator set when approving (unset fields take the relay's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approval {
    pub name: Option<String>,
    pub max_peers: Option<u32>,
    pub max_ipv4: Option<u32>,
    pub bandwidth_mbps: Option<u32>,
    pub isolate_peers: Option<bool>,
    pub bind_machine: Option<bool>,
}

/// Why the operator's decision did not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no device login with this user code")]
    Unknown,
    #[error("this device login expired; the client must start over")]
    Expired,
    #[error("this device login was already decided")]
    Decided,
}

#[derive(Debug, Clone)]
enum Decision {
    Pending,
    Approved(Approval),
    Denied,
}

#[derive(Debug, Clone)]
struct Login {
    user_code: String,
    scopes: Vec<Scope>,
    source: SourceKey,
    created: SystemTime,
    expires: SystemTime,
    interval: Duration,
    last_poll: Option<SystemTime>,
    decision: Decision,
}

/// Every device login in progress.
#[derive(Debug, Default)]
pub struct DeviceLogins {
    settings: DeviceSettings,
    /// Keyed by the SHA-256 of the device code, so the secret itself is not kept.
    by_device: HashMap<[u8; 32], Login>,
    /// User code (8 letters, no dash) to device-code digest.
    by_user: HashMap<String, [u8; 32]>,
}

fn digest(device_code: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, device_code.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `XXXXXXXX` as the operator sees it: `XXXX-XXXX`.
fn display(code: &str) -> String {
    let (a, b) = code.split_at(USER_CODE_LEN / 2);
    format!("{a}-{b}")
}

/// A user code as typed: any case, with or without the dash or spaces. `None` if it
/// cannot be one.
pub fn normalize_user_code(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let valid =
        code.len() == USER_CODE_LEN && code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b));
    valid.then_some(code)
}

/// Uniform letters from the alphabet: bytes past the largest multiple of its
/// length are drawn again rather than folded in (which would favour some letters).
fn random_user_code(rng: &dyn ring::rand::SecureRandom) -> Result<String, AuthorizeError> {
    let n = USER_CODE_ALPHABET.len();
    let limit = 256 - 256 % n;
    let mut code = String::with_capacity(USER_CODE_LEN);
    while code.len() < USER_CODE_LEN {
        let mut buf = [0u8; 16];
        rng.fill(&mut buf).map_err(|_| AuthorizeError::Random)?;
        for b in buf {
            if (b as usize) < limit && code.len() < USER_CODE_LEN {
                code.push(USER_CODE_ALPHABET[b as usize % n] as char);
            }
        }
    }
    Ok(code)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn source_text(source: SourceKey) -> String {
    match source {
        SourceKey::V4(a) => std::net::Ipv4Addr::from(a).to_string(),
        SourceKey::V6Net(net) => {
            let mut full = [0u8; 16];
            full[..8].copy_from_slice(&net);
            format!("{}/64", std::net::Ipv6Addr::from(full))
        }
    }
}

impl DeviceLogins {
    pub fn new(settings: DeviceSettings) -> DeviceLogins {
        DeviceLogins {
            settings,
            ..DeviceLogins::default()
        }
    }

    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    /// Logins held now, expired ones not yet forgotten included.
    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// Starts a login for `scopes` (checked by the caller) asked from `source`.
    pub fn authorize(
        &mut self,
        scopes: Vec<Scope>,
        source: SourceKey,
        now: SystemTime,
        rng: &dyn ring::rand::SecureRandom,
    ) -> Result<Started, AuthorizeError> {
        self.forget_expired(now);
        if self.by_device.len() >= self.settings.max_pending {
            return Err(AuthorizeError::Full);
        }
        let from_source = self
            .by_device
            .values()
            .filter(|l| l.source == source)
            .count();
        if from_source >= self.settings.max_pending_per_source {
            return Err(AuthorizeError::SourceFull);
        }
        let mut secret = [0u8; 32];
        rng.fill(&mut secret).map_err(|_| AuthorizeError::Random)?;
        let device_code = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        // 20^8 codes against at most `max_pending` in use: a clash is rare, and
        // drawing again settles it.
        let user_code = loop {
            let code = random_user_code(rng)?;
            if !self.by_user.contains_key(&code) {
                break code;
            }
        };
        let key = digest(&device_code);
        self.by_user.insert(user_code.clone(), key);
        self.by_device.insert(
            key,
            Login {
                user_code: user_code.clone(),
                scopes: Scope::normalize(scopes),
                source,
                created: now,
                expires: now + self.settings.expires_in,
                interval: self.settings.interval,
                last_poll: None,
                decision: Decision::Pending,
            },
        );
        Ok(Started {
            device_code,
            user_code: display(&user_code),
            expires_in: self.settings.expires_in,
            interval: self.settings.interval,
        })
    }

    /// The client's poll with its device code: the grant once approved (and the
    /// login is gone after that), or where it stands.
    pub fn poll(&mut self, device_code: &str, now: SystemTime) -> Result<Grant, PollError> {
        self.forget_expired(now);
        let key = digest(device_code);
        let login = self
            .by_device
            .get_mut(&key)
            .ok_or(PollError::InvalidGrant)?;
        if now >= login.expires {
            return Err(PollError::Expired);
        }
        let too_soon = login
            .last_poll
            .is_some_and(|last| now + POLL_SLACK < last + login.interval);
        login.last_poll = Some(now);
        if too_soon {
            login.interval += SLOW_DOWN_STEP;
            return Err(PollError::SlowDown {
                interval: login.interval,
            });
        }
        match &login.decision {
            Decision::Pending => Err(PollError::Pending),
            Decision::Denied => Err(PollError::Denied),
            Decision::Approved(_) => {
                let login = self.remove(&key).ok_or(PollError::InvalidGrant)?;
                let Decision::Approved(approval) = login.decision else {
                    return Err(PollError::InvalidGrant);
                };
                Ok(Grant {
                    user_code: display(&login.user_code),
                    scopes: login.scopes,
                    approval,
                })
            }
        }
    }

    /// What the operator sees for a user code (as typed).
    pub fn view(&self, user_code: &str, now: SystemTime) -> Option<DeviceLoginView> {
        let code = normalize_user_code(user_code)?;
        let login = self.by_device.get(self.by_user.get(&code)?)?;
        let state = if now >= login.expires {
            DeviceLoginState::Expired
        } else {
            match login.decision {
                Decision::Pending => DeviceLoginState::Pending,
                Decision::Approved(_) => DeviceLoginState::Approved,
                Decision::Denied => DeviceLoginState::Denied,
            }
        };
        Some(DeviceLoginView {
            user_code: display(&login.user_code),
            scopes: login.scopes.clone(),
            state,
            source: source_text(login.source),
            created: unix(login.created),
            expires: unix(login.expires),
        })
    }

    /// Every login held, oldest first (expired ones until they are forgotten).
    pub fn list(&self, now: SystemTime) -> Vec<DeviceLoginView> {
        // By the full creation time: the views' whole seconds would tie.
        let mut logins: Vec<&Login> = self.by_device.values().collect();
        logins.sort_by(|a, b| (a.created, &a.user_code).cmp(&(b.created, &b.user_code)));
        logins
            .into_iter()
            .filter_map(|l| self.view(&l.user_code, now))
            .collect()
    }

    /// Approves a pending login; the client's next poll collects the token.
    pub fn approve(
        &mut self,
        user_code: &str,
        approval: Approval,
        now: SystemTime,
    ) -> Result<DeviceLoginView, DecideError> {
        self.decide(user_code, Decision::Approved(approval), now)
    }

    /// Denies a pending login; the client's polls answer `access_denied` until it
    /// expires.
    pub fn deny(
        &mut self,
        user_code: &str,
        now: SystemTime,
    ) -> Result<DeviceLoginView, DecideError> {
        self.decide(user_code, Decision::Denied, now)
    }

    fn decide(
        &mut self,
        user_code: &str,
        decision: Decision,
        now: SystemTime,
    ) -> Result<DeviceLoginView, DecideError> {
        let code = normalize_user_code(user_code).ok_or(DecideError::Unknown)?;
        let key = *self.by_user.get(&code).ok_or(DecideError::Unknown)?;
        let login = self.by_device.get_mut(&key).ok_or(DecideError::Unknown)?;
        if now >= login.expires {
            return Err(DecideError::Expired);
        }
        if !matches!(login.decision, Decision::Pending) {
            return Err(DecideError::Decided);
        }
        login.decision = decision;
        self.view(&code, now).ok_or(DecideError::Unknown)
    }

    fn remove(&mut self, key: &[u8; 32]) -> Option<Login> {
        let login = self.by_device.remove(key)?;
        self.by_user.remove(&login.user_code);
        Some(login)
    }

    fn forget_expired(&mut self, now: SystemTime) {
        let gone: Vec<[u8; 32]> = self
            .by_device
            .iter()
            .filter(|(_, l)| now >= l.expires + EXPIRED_KEPT)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: SourceKey = SourceKey::V4([192, 0, 2, 1]);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn after(secs: f64) -> SystemTime {
        at(0) + Duration::from_secs_f64(secs)
    }

    fn start(logins: &mut DeviceLogins) -> Started {
        logins
            .authorize(
                vec![Scope::PeersAdd, Scope::PeersRead],
                SOURCE,
                at(0),
                &ring::rand::SystemRandom::new(),
            )
            .unwrap()
    }

    #[test]
    fn codes_have_the_promised_shape() {
        let mut logins = DeviceLogins::default();
        let s = start(&mut logins);
        assert_eq!(s.device_code.len(), 43, "32 bytes of base64url");
        assert!(s
            .device_code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(s.user_code.len(), 9);
        assert_eq!(&s.user_code[4..5], "-");
        assert_eq!((s.expires_in.as_secs(), s.interval.as_secs()), (1800, 5));
        let typed = s.user_code.replace('-', "").to_lowercase();
        let view = logins
            .view(&typed, at(1))
            .expect("lowercase without the dash");
        assert_eq!(view.user_code, s.user_code);
        assert_eq!(view.state, DeviceLoginState::Pending);
        assert_eq!(view.scopes, vec![Scope::PeersRead, Scope::PeersAdd]);
        assert_eq!(view.source, "192.0.2.1");
        assert_eq!((view.created, view.expires), (unix(at(0)), unix(at(1800))));
        assert_eq!(
            normalize_user_code("BCDF-GHJA"),
            None,
            "A is not in the alphabet"
        );
        assert_eq!(normalize_user_code("BCDF-GHJ"), None);
    }

    #[test]
    fn pending_until_approved_then_issued_exactly_once() {
        let mut logins = DeviceLogins::default();
        let s = start(&mut logins);
        assert_eq!(logins.poll(&s.device_code, at(5)), Err(PollError::Pending));
        assert_eq!(logins.poll(&s.device_code, at(10)), Err(PollError::Pending));
        let approval = Approval {
            name: Some("ci".into()),
            ..Approval::default()
        };
        let view = logins
            .approve(&s.user_code, approval.clone(), at(12))
            .unwrap();
        assert_eq!(view.state, DeviceLoginState::Approved);
        assert_eq!(
            logins.approve(&s.user_code, Approval::default(), at(13)),
            Err(DecideError::Decided)
        );
        assert_eq!(logins.deny(&s.user_code, at(13)), Err(DecideError::Decided));
        let listed = logins.list(at(13));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, DeviceLoginState::Approved);
        let grant = logins.poll(&s.device_code, at(15)).unwrap();
        assert_eq!(grant.scopes, vec![Scope::PeersRead, Scope::PeersAdd]);
        assert_eq!(grant.approval, approval);
        assert_eq!(grant.user_code, s.user_code);
        assert_eq!(
            logins.poll(&s.device_code, at(20)),
            Err(PollError::InvalidGrant),
            "spent"
        );
        assert!(logins.is_empty());
        assert_eq!(logins.view(&s.user_code, at(20)), None);
        assert_eq!(
            logins.poll("not-a-code", at(20)),
            Err(PollError::InvalidGrant)
        );
    }

    #[test]
    fn polling_too_fast_grows_the_interval_by_five_seconds_each_time() {
        let mut logins = DeviceLogins::default();
        let s = start(&mut logins);
        assert_eq!(logins.poll(&s.device_code, at(5)), Err(PollError::Pending));
        let slow = |secs| PollError::SlowDown {
            interval: Duration::from_secs(secs),
        };
        assert_eq!(logins.poll(&s.device_code, at(6)), Err(slow(10)));
        // The grown interval counts from the last poll, the refused one included.
        assert_eq!(logins.poll(&s.device_code, at(12)), Err(slow(15)));
        assert_eq!(logins.poll(&s.device_code, at(27)), Err(PollError::Pending));
        // A poll a little early (network jitter) is still on time.
        assert_eq!(
            logins.poll(&s.device_code, after(27.0 + 14.7)),
            Err(PollError::Pending)
        );
        // An approval does not forgive polling too fast.
        logins
            .approve(&s.user_code, Approval::default(), after(42.0))
            .unwrap();
        assert_eq!(logins.poll(&s.device_code, after(43.0)), Err(slow(20)));
        assert!(logins.poll(&s.device_code, after(64.0)).is_ok());
    }

    #[test]
    fn expiry_and_denial() {
        let mut logins = DeviceLogins::default();
        let expiring = start(&mut logins);
        let denied = start(&mut logins);
        logins.deny(&denied.user_code, at(10)).unwrap();
        assert_eq!(
            logins.poll(&denied.device_code, at(15)),
            Err(PollError::Denied)
        );
        assert_eq!(
            logins.poll(&denied.device_code, at(25)),
            Err(PollError::Denied)
        );
        assert_eq!(
            logins.view(&denied.user_code, at(25)).unwrap().state,
            DeviceLoginState::Denied
        );

        assert_eq!(
            logins.poll(&expiring.device_code, at(1799)),
            Err(PollError::Pending)
        );
        assert_eq!(
            logins.poll(&expiring.device_code, at(1800)),
            Err(PollError::Expired)
        );
        assert_eq!(
            logins.view(&expiring.user_code, at(1800)).unwrap().state,
            DeviceLoginState::Expired
        );
        assert_eq!(
            logins.approve(&expiring.user_code, Approval::default(), at(1801)),
            Err(DecideError::Expired)
        );
        // Long after expiry the login is forgotten.
        let late = at(1800) + EXPIRED_KEPT;
        assert_eq!(
            logins.poll(&expiring.device_code, late),
            Err(PollError::InvalidGrant)
        );
        assert!(logins.is_empty());
        assert_eq!(
            logins.approve("BCDF-GHJK", Approval::default(), late),
            Err(DecideError::Unknown)
        );
    }

    #[test]
    fn pending_logins_are_bounded_in_total_and_per_source() {
        let rng = ring::rand::SystemRandom::new();
        let mut logins = DeviceLogins::new(DeviceSettings {
            max_pending: 3,
            max_pending_per_source: 2,
            ..DeviceSettings::default()
        });
        let scopes = || vec![Scope::PeersAdd];
        let other = |n| SourceKey::V4([198, 51, 100, n]);
        logins.authorize(scopes(), SOURCE, at(0), &rng).unwrap();
        logins.authorize(scopes(), SOURCE, at(0), &rng).unwrap();
        assert_eq!(
            logins.authorize(scopes(), SOURCE, at(0), &rng),
            Err(AuthorizeError::SourceFull)
        );
        logins.authorize(scopes(), other(1), at(0), &rng).unwrap();
        assert_eq!(
            logins.authorize(scopes(), other(2), at(0), &rng),
            Err(AuthorizeError::Full)
        );
        // Expired logins make room once forgotten.
        let later = at(1800) + EXPIRED_KEPT;
        logins.authorize(scopes(), other(2), later, &rng).unwrap();
        assert_eq!(logins.len(), 1);
    }
}
