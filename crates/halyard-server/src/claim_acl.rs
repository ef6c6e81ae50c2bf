//! A client's ACL carried in its token: topic filter lists for publishing and subscribing,
//! as EMQX reads them from a JWT claim: `"acl": {"pub": ["a/#"], "sub": ["a/+/b"]}`.
//!
//! A publish needs its topic to match a `pub` filter; a SUBSCRIBE filter is checked as if it
//! were a topic name against the `sub` filters (as the ACL file does, so `a/#` allows
//! subscribing to `a/+/b` but not to `#`), and so is every delivery. Filters starting with
//! a wildcard never match `$` topics [MQTT-4.7.2-1]. Everything else is denied.

use halyard_codec::topic::{is_valid_topic_filter, matches};
use halyard_core::Access;
use serde_json::Value;

/// The parsed claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClaimAcl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl ClaimAcl {
    /// Reads the claim; `Err` names what is wrong (a malformed claim refuses the token
    /// rather than granting more or less than the issuer meant).
    pub(crate) fn from_claim(claim: &Value) -> Result<ClaimAcl, String> {
        let Value::Object(map) = claim else {
            return Err("the ACL claim must be an object with pub and sub lists".to_owned());
        };
        if let Some(key) = map
            .keys()
            .find(|key| !matches!(key.as_str(), "pub" | "sub"))
        {
            return Err(format!("unknown key `{key}` in the ACL claim"));
        }
        let list = |key: &str| -> Result<Vec<String>, String> {
            let Some(value) = map.get(key) else {
                return Ok(Vec::new());
            };
            let Value::Array(items) = value else {
                return Err(format!("`{key}` in the ACL claim must be a list"));
            };
            items
                .iter()
                .map(|item| match item.as_str() {
                    Some(filter) if is_valid_topic_filter(filter) => Ok(filter.to_owned()),
                    _ => Err(format!("`{key}` holds something not a topic filter")),
                })
                .collect()
        };
        Ok(ClaimAcl {
            publish: list("pub")?,
            subscribe: list("sub")?,
        })
    }

    /// Whether the claim allows `access` on `topic`.
    pub(crate) fn allows(&self, access: Access, topic: &str) -> bool {
        let filters = match access {
            Access::Publish => &self.publish,
            Access::Subscribe | Access::Receive => &self.subscribe,
        };
        filters.iter().any(|filter| matches(filter, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_grant_what_they_name_and_nothing_else() {
        let acl = ClaimAcl::from_claim(&json!({"pub": ["dev/42/#"], "sub": ["cmd/42/+"]}))
            .expect("valid");
        assert!(acl.allows(Access::Publish, "dev/42/temp"));
        assert!(!acl.allows(Access::Publish, "dev/43/temp"));
        assert!(!acl.allows(Access::Publish, "cmd/42/reboot"));
        assert!(acl.allows(Access::Subscribe, "cmd/42/+"));
        assert!(acl.allows(Access::Receive, "cmd/42/reboot"));
        assert!(!acl.allows(Access::Subscribe, "cmd/#"));
        let everything = ClaimAcl::from_claim(&json!({"pub": ["#"]})).expect("valid");
        assert!(!everything.allows(Access::Publish, "$SYS/broker/version"));
        assert!(!everything.allows(Access::Subscribe, "a"));
    }

    #[test]
    fn malformed_claims_are_errors() {
        for claim in [
            json!(["a"]),
            json!({"pub": "a/#"}),
            json!({"pub": [1]}),
            json!({"pub": ["a/#/b"]}),
            json!({"publish": ["a"]}),
        ] {
            assert!(ClaimAcl::from_claim(&claim).is_err(), "{claim}");
        }
    }
}
