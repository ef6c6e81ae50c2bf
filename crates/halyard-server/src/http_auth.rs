//! The HTTP authentication and ACL hook (`[auth.http]`), in the manner of EMQX's HTTP auth
//! and mosquitto-go-auth: a service that already knows the devices answers for them.
//!
//! - `url`: POST `{client_id, username, password, peer_address, protocol}` per CONNECT
//!   (`protocol` is the MQTT protocol level: 3, 4 or 5).
//! - `acl_url`: POST `{client_id, username, topic, action}` (`action` is `publish` or
//!   `subscribe`) per decision not in the cache.
//!
//! A 200 reply whose JSON body has `"result": "allow"` allows; any other reply denies. A
//! timeout or a transport error answers with `default_allow` (false: deny).
//!
//! Calls never run on the broker task: CONNECTs are decided in the connection task, and a
//! connection task asks for every publish and subscribe decision before it hands the
//! packet to the broker, which then only reads the result from the cache (a bounded map,
//! entries fresh for `cache_ttl_ms`). One pooled `reqwest` client (rustls on `ring`)
//! serves every call.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tracing::warn;

/// The `[auth.http]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAuthConfig {
    /// Authentication endpoint; `None`: the hook does not authenticate.
    pub url: Option<String>,
    /// ACL endpoint; `None`: the hook does not authorize.
    pub acl_url: Option<String>,
    /// Time allowed per call.
    pub timeout: Duration,
    /// How long an ACL answer is reused.
    pub cache_ttl: Duration,
    /// Most ACL answers kept; the oldest go first.
    pub cache_max_entries: usize,
    /// The answer when the service times out or fails.
    pub default_allow: bool,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            url: None,
            acl_url: None,
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            cache_max_entries: 10_000,
            default_allow: false,
        }
    }
}

/// What a CONNECT tells the service.
#[derive(Debug, Serialize)]
pub(crate) struct AuthRequest<'a> {
    pub(crate) client_id: &'a str,
    pub(crate) username: Option<&'a str>,
    /// The CONNECT password, as UTF-8 (lossy: the hook is for text credentials).
    pub(crate) password: Option<String>,
    pub(crate) peer_address: Option<String>,
    pub(crate) protocol: u8,
}

/// What an ACL decision is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub(crate) struct AclRequest {
    pub(crate) client_id: String,
    pub(crate) username: Option<String>,
    pub(crate) topic: String,
    pub(crate) action: &'static str,
}

/// How the service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200 with `"result": "allow"`.
    Allow,
    /// Any other reply.
    Deny,
    /// No reply in time, or the call failed: the configured default applies.
    Failed,
}

/// Bounded map of ACL answers, oldest evicted first.
#[derive(Debug, Default)]
struct AclCache {
    answers: HashMap<AclRequest, (bool, Instant)>,
    order: VecDeque<(AclRequest, Instant)>,
}

impl AclCache {
    fn insert(&mut self, request: AclRequest, allowed: bool, at: Instant, max: usize) {
        while self.answers.len() >= max.max(1) {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            if self
                .answers
                .get(&old)
                .is_some_and(|(_, kept)| *kept == stamp)
            {
                self.answers.remove(&old);
            }
        }
        self.order.push_back((request.clone(), at));
        self.answers.insert(request, (allowed, at));
        // Entries replaced by newer answers leave stale order slots; keep them bounded.
        if self.order.len() > 2 * max.max(1) {
            let answers = &self.answers;
            self.order
                .retain(|(key, stamp)| answers.get(key).is_some_and(|(_, kept)| kept == stamp));
        }
    }
}

/// A configured hook.
#[derive(Debug)]
pub(crate) struct HttpAuth {
    config: HttpAuthConfig,
    client: reqwest::Client,
    cache: Mutex<AclCache>,
}

impl HttpAuth {
    /// Builds the pooled client.
    pub(crate) fn new(config: HttpAuthConfig) -> Result<HttpAuth, String> {
        for (key, url) in [("url", &config.url), ("acl_url", &config.acl_url)] {
            if let Some(url) = url {
                reqwest::Url::parse(url)
                    .map_err(|error| format!("auth.http.{key}: bad URL `{url}`: {error}"))?;
            }
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|error| format!("auth.http: cannot build the HTTP client: {error}"))?;
        Ok(HttpAuth {
            config,
            client,
            cache: Mutex::default(),
        })
    }

    /// The settings.
    pub(crate) fn config(&self) -> &HttpAuthConfig {
        &self.config
    }

    /// Asks `url` about a CONNECT (`None` if no `url` is configured).
    pub(crate) async fn authenticate(&self, request: &AuthRequest<'_>) -> Option<Answer> {
        let url = self.config.url.as_deref()?;
        Some(self.post(url, request).await)
    }

    /// Whether the answer lets the client in, the default applied to a failure.
    pub(crate) fn allows(&self, answer: Answer) -> bool {
        match answer {
            Answer::Allow => true,
            Answer::Deny => false,
            Answer::Failed => self.config.default_allow,
        }
    }

    /// Makes sure the cache holds a fresh answer for `request`, asking `acl_url` if not.
    pub(crate) async fn prefetch_acl(&self, request: AclRequest) {
        let Some(url) = self.config.acl_url.as_deref() else {
            return;
        };
        let now = Instant::now();
        let fresh = self
            .lock()
            .answers
            .get(&request)
            .is_some_and(|(_, at)| now.duration_since(*at) < self.config.cache_ttl);
        if fresh {
            return;
        }
        let answer = self.post(url, &request).await;
        let allowed = self.allows(answer);
        self.lock().insert(
            request,
            allowed,
            Instant::now(),
            self.config.cache_max_entries,
        );
    }

    /// The cached answer for `request`, stale or not (the connection task refreshed it
    /// before it forwarded the packet); `None` if it was evicted meanwhile.
    pub(crate) fn cached_acl(&self, request: &AclRequest) -> Option<bool> {
        self.lock()
            .answers
            .get(request)
            .map(|(allowed, _)| *allowed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AclCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn post(&self, url: &str, body: &impl Serialize) -> Answer {
        let reply = match self.client.post(url).json(body).send().await {
            Ok(reply) => reply,
            Err(error) => {
                warn!(%error, url, "HTTP auth hook failed; using the default");
                return Answer::Failed;
            }
        };
        if reply.status() != reqwest::StatusCode::OK {
            return Answer::Deny;
        }
        match reply.json::<Value>().await {
            Ok(json) if json.get("result").and_then(Value::as_str) == Some("allow") => {
                Answer::Allow
            }
            Ok(_) => Answer::Deny,
            // A body cut off by the timeout is a failure; a body that is not JSON a denial.
            Err(error) if error.is_timeout() => Answer::Failed,
            Err(_) => Answer::Deny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(topic: &str) -> AclRequest {
        AclRequest {
            client_id: "c".to_owned(),
            username: None,
            topic: topic.to_owned(),
            action: "publish",
        }
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let mut cache = AclCache::default();
        let now = Instant::now();
        for n in 0..5 {
            cache.insert(request(&format!("t/{n}")), n % 2 == 0, now, 3);
        }
        assert_eq!(cache.answers.len(), 3);
        assert!(!cache.answers.contains_key(&request("t/0")));
        assert_eq!(cache.answers.get(&request("t/4")).map(|a| a.0), Some(true));
        // Re-answering one topic many times keeps the bookkeeping bounded too.
        for _ in 0..100 {
            cache.insert(request("t/4"), false, Instant::now(), 3);
        }
        assert!(cache.order.len() <= 6, "{}", cache.order.len());
        assert_eq!(cache.answers.get(&request("t/4")).map(|a| a.0), Some(false));
    }
}
