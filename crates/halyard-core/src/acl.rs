//! Mosquitto-compatible ACL files, so an operator can move a Mosquitto deployment over with
//! its rules unchanged.
//!
//! Syntax (one directive per line; a line starting with `#` is a comment, blank lines are
//! ignored):
//!
//! ```text
//! topic [read|write|readwrite|deny] <topic>     rule for the current section
//! user <username>                               starts the section of that user
//! pattern [read|write|readwrite|deny] <topic>   rule for every client, with %c / %u
//! ```
//!
//! Semantics, as Mosquitto documents them:
//! - `topic` lines before the first `user` line apply to anonymous clients only; the lines
//!   after `user NAME` apply to clients authenticated as NAME.
//! - `pattern` lines apply to every client wherever they appear; `%c` is replaced by the
//!   client id and `%u` by the user name (a pattern with `%u` never matches an anonymous
//!   client). A client whose id or user name contains `+`, `#` or `/` is denied everything
//!   when pattern rules exist, so that it cannot widen a pattern with a wildcard.
//! - The access word is optional (default `readwrite`). `deny` rules are checked first and
//!   win over any grant; otherwise access needs a matching grant: with an ACL file, what is
//!   not granted is denied.
//! - `read` grants both SUBSCRIBE and receiving. A SUBSCRIBE filter is checked as if it
//!   were a topic name, so `topic read a/#` allows subscribing to `a/+/b` but not to `#`;
//!   every message is checked again on delivery, so a wildcard subscription never leaks a
//!   denied topic.
//! - Rules written with wildcards do not match topics starting with `$` unless they start
//!   with `$` themselves [MQTT-4.7.2-1].

use std::collections::HashMap;

use halyard_codec::topic::{is_valid_topic_filter, matches};

use crate::authz::{Access, Authorizer, ClientInfo};

/// Why an ACL file was rejected; the line is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct AclError {
    /// Line of the offending directive.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// What one rule grants (or, for `deny`, takes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn parse(word: &str) -> Option<Grant> {
        match word {
            "read" => Some(Grant::Read),
            "write" => Some(Grant::Write),
            "readwrite" => Some(Grant::ReadWrite),
            "deny" => Some(Grant::Deny),
            _ => None,
        }
    }

    fn allows(self, access: Access) -> bool {
        match (self, access) {
            (Grant::Deny, _) => false,
            (Grant::ReadWrite, _) => true,
            (Grant::Read, Access::Subscribe | Access::Receive) => true,
            (Grant::Write, Access::Publish) => true,
            (Grant::Read, Access::Publish) | (Grant::Write, _) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    topic: String,
}

/// A parsed ACL file; implements [`Authorizer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Rules before the first `user` line: anonymous clients.
    anonymous: Vec<Rule>,
    /// Rules per user name (several sections for one user are merged).
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` rules, for everyone.
    patterns: Vec<Rule>,
    /// Whether some pattern substitutes `%c` / `%u` (then such values must be safe).
    patterns_use_id: bool,
    patterns_use_user: bool,
}

impl Acl {
    /// Parses the text of an ACL file. Unlike Mosquitto, which skips what it does not
    /// understand, every unknown keyword, access word or invalid topic is an error naming
    /// the line: a typo in a security rule should never silently widen or narrow access.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let error = |message: String| AclError { line, message };
            let trimmed = raw.trim_start().trim_end_matches(['\r', '\n']);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (keyword, rest) = trimmed
                .split_once([' ', '\t'])
                .map_or((trimmed, ""), |(k, r)| (k, r.trim_start()));
            match keyword {
                "user" => {
                    let name = rest.trim_end();
                    if name.is_empty() {
                        return Err(error("`user` without a user name".to_owned()));
                    }
                    user = Some(name.to_owned());
                }
                "topic" | "pattern" => {
                    let rest = rest.trim_end();
                    if rest.is_empty() {
                        return Err(error(format!("`{keyword}` without a topic")));
                    }
                    // The access word is optional; a topic may contain spaces.
                    let (grant, topic) = match rest.split_once([' ', '\t']) {
                        Some((word, topic)) => match Grant::parse(word) {
                            Some(grant) => (grant, topic.trim_start()),
                            None => {
                                return Err(error(format!(
                                    "unknown access `{word}` (expected read, write, \
                                     readwrite or deny)"
                                )))
                            }
                        },
                        None if Grant::parse(rest).is_some() => {
                            return Err(error(format!("`{keyword} {rest}` without a topic")))
                        }
                        None => (Grant::ReadWrite, rest),
                    };
                    if !is_valid_topic_filter(topic) {
                        return Err(error(format!("invalid topic `{topic}`")));
                    }
                    let rule = Rule {
                        grant,
                        topic: topic.to_owned(),
                    };
                    match (keyword, &user) {
                        ("pattern", _) => {
                            acl.patterns_use_id |= rule.topic.contains("%c");
                            acl.patterns_use_user |= rule.topic.contains("%u");
                            acl.patterns.push(rule);
                        }
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(name)) => acl.users.entry(name.clone()).or_default().push(rule),
                    }
                }
                other => {
                    return Err(error(format!(
                        "unknown keyword `{other}` (expected topic, user or pattern)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// Number of rules, for logs.
    pub fn rule_count(&self) -> usize {
        self.anonymous.len()
            + self.users.values().map(Vec::len).sum::<usize>()
            + self.patterns.len()
    }

    /// The decision for one check; see the module documentation for the rules.
    pub fn check(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool {
        let own = match client.username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous[..],
        };
        let dangerous = |value: &str| value.contains(['+', '#', '/']);
        if (self.patterns_use_id && dangerous(client.client_id))
            || (self.patterns_use_user && client.username.is_some_and(dangerous))
        {
            return false;
        }
        let pattern_hit = |rule: &Rule| {
            if !rule.topic.contains('%') {
                return matches(&rule.topic, topic);
            }
            let mut filter = rule.topic.replace("%c", client.client_id);
            if filter.contains("%u") {
                match client.username {
                    Some(name) => filter = filter.replace("%u", name),
                    // A pattern with %u never matches an anonymous client.
                    None => return false,
                }
            }
            matches(&filter, topic)
        };
        let own_hit = |rule: &Rule| matches(&rule.topic, topic);
        let denied = own.iter().any(|r| r.grant == Grant::Deny && own_hit(r))
            || self
                .patterns
                .iter()
                .any(|r| r.grant == Grant::Deny && pattern_hit(r));
        if denied {
            return false;
        }
        own.iter().any(|r| r.grant.allows(access) && own_hit(r))
            || self
                .patterns
                .iter()
                .any(|r| r.grant.allows(access) && pattern_hit(r))
    }
}

impl Authorizer for Acl {
    fn authorize(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool {
        self.check(client, access, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(id: &str) -> ClientInfo<'_> {
        ClientInfo {
            client_id: id,
            username: None,
        }
    }

    fn user<'a>(id: &'a str, name: &'a str) -> ClientInfo<'a> {
        ClientInfo {
            client_id: id,
            username: Some(name),
        }
    }

    #[test]
    fn paho_subscribe_failure_rules() {
        // The Eclipse Paho interop suite's broker configuration.
        let acl = Acl::parse("topic readwrite #\ntopic deny test/nosubscribe\n").expect("valid");
        let c = anon("paho");
        assert!(!acl.check(&c, Access::Subscribe, "test/nosubscribe"));
        assert!(acl.check(&c, Access::Subscribe, "test/other"));
        assert!(acl.check(&c, Access::Subscribe, "test/#"));
        assert!(acl.check(&c, Access::Publish, "test/x"));
        assert!(!acl.check(&c, Access::Receive, "test/nosubscribe"));
        assert!(!acl.check(&c, Access::Publish, "test/nosubscribe"));
    }

    #[test]
    fn general_section_is_for_anonymous_clients_only() {
        let acl = Acl::parse("topic read public/#\n\nuser alice\ntopic alice/#\n").expect("ok");
        assert!(acl.check(&anon("c"), Access::Subscribe, "public/news"));
        assert!(!acl.check(&anon("c"), Access::Publish, "public/news"));
        assert!(!acl.check(&anon("c"), Access::Receive, "alice/x"));
        let alice = user("c", "alice");
        assert!(acl.check(&alice, Access::Publish, "alice/x"));
        assert!(acl.check(&alice, Access::Receive, "alice/x/y"));
        assert!(
            !acl.check(&alice, Access::Receive, "public/news"),
            "the anonymous section does not apply to users"
        );
        assert!(!acl.check(&user("c", "bob"), Access::Receive, "alice/x"));
    }

    #[test]
    fn read_and_write_are_separate() {
        let acl = Acl::parse("user u\ntopic read r/#\ntopic write w/#\n").expect("ok");
        let u = user("c", "u");
        assert!(acl.check(&u, Access::Subscribe, "r/1"));
        assert!(acl.check(&u, Access::Receive, "r/1"));
        assert!(!acl.check(&u, Access::Publish, "r/1"));
        assert!(acl.check(&u, Access::Publish, "w/1"));
        assert!(!acl.check(&u, Access::Subscribe, "w/1"));
        assert!(!acl.check(&u, Access::Receive, "w/1"));
    }

    #[test]
    fn deny_wins_over_grants_wherever_written() {
        let acl =
            Acl::parse("user u\ntopic deny a/secret\ntopic readwrite a/#\npattern deny %c/x\n")
                .expect("ok");
        let u = user("dev1", "u");
        assert!(!acl.check(&u, Access::Receive, "a/secret"));
        assert!(acl.check(&u, Access::Receive, "a/public"));
        // A wildcard subscription is allowed; delivery filters the denied topic.
        assert!(acl.check(&u, Access::Subscribe, "a/#"));
        assert!(!acl.check(&u, Access::Publish, "dev1/x"));
    }

    #[test]
    fn patterns_substitute_client_id_and_user_name() {
        let acl = Acl::parse(
            "pattern readwrite devices/%c/#\npattern read users/%u/inbox\nuser bob\ntopic x\n",
        )
        .expect("ok");
        let bob = user("sensor-7", "bob");
        assert!(acl.check(&bob, Access::Publish, "devices/sensor-7/temp"));
        assert!(!acl.check(&bob, Access::Publish, "devices/sensor-8/temp"));
        assert!(acl.check(&bob, Access::Subscribe, "users/bob/inbox"));
        assert!(!acl.check(&bob, Access::Subscribe, "users/eve/inbox"));
        assert!(
            acl.check(&bob, Access::Publish, "x"),
            "pattern after user still global"
        );
        // Anonymous: %c patterns apply, %u patterns do not.
        let a = anon("sensor-9");
        assert!(acl.check(&a, Access::Publish, "devices/sensor-9/t"));
        assert!(!acl.check(&a, Access::Subscribe, "users/%u/inbox"));
        // A client id with a wildcard or a separator cannot widen a pattern.
        assert!(!acl.check(&anon("+"), Access::Publish, "devices/x/t"));
        assert!(!acl.check(&anon("a/b"), Access::Publish, "devices/a/b/t"));
        assert!(!acl.check(&user("c", "#"), Access::Publish, "devices/c/t"));
    }

    #[test]
    fn access_word_is_optional_and_topics_may_contain_spaces() {
        // As in Mosquitto, the access word is required when the topic contains a space.
        let acl = Acl::parse("topic readwrite my topic/#\ntopic read  spaced  out\ntopic plain\n")
            .expect("ok");
        assert!(acl.check(&anon("c"), Access::Publish, "plain"));
        assert!(Acl::parse("topic my topic").is_err());
        let a = anon("c");
        assert!(acl.check(&a, Access::Publish, "my topic/x"));
        assert!(acl.check(&a, Access::Receive, "spaced  out"));
    }

    #[test]
    fn dollar_topics_need_dollar_rules() {
        let acl = Acl::parse("topic read #\ntopic read $SYS/broker/#\n").expect("ok");
        let a = anon("c");
        assert!(acl.check(&a, Access::Receive, "$SYS/broker/uptime"));
        assert!(!acl.check(&a, Access::Receive, "$SYS/other"));
        assert!(acl.check(&a, Access::Receive, "a"));
    }

    #[test]
    fn empty_file_denies_everything() {
        let acl = Acl::parse("# nothing\n\n").expect("ok");
        assert!(!acl.check(&anon("c"), Access::Receive, "a"));
        assert_eq!(acl.rule_count(), 0);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("topic read a\nfoo bar\n", 2, "unknown keyword"),
            ("\n\ntopic reed a/b\n", 3, "unknown access"),
            ("topic\n", 1, "without a topic"),
            ("topic read\n", 1, "without a topic"),
            ("user\n", 1, "user name"),
            ("topic read a/#/b\n", 1, "invalid topic"),
        ];
        for (text, line, needle) in cases {
            let error = Acl::parse(text).expect_err(text);
            assert_eq!(error.line, line, "{text}");
            assert!(error.to_string().contains(needle), "{error}");
            assert!(error.to_string().starts_with(&format!("line {line}:")));
        }
    }

    #[test]
    fn crlf_and_indentation_are_tolerated() {
        let acl = Acl::parse("  user u\r\n\ttopic read a\r\n").expect("ok");
        assert!(acl.check(&user("c", "u"), Access::Receive, "a"));
    }
}
