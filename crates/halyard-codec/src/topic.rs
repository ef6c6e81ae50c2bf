//! Topic names, topic filters and matching (MQTT 5 section 4.7).
//!
//! These live in the codec because the decoder must reject invalid names and filters, and the
//! broker core needs exactly the same rules when it routes; one implementation keeps the two
//! from drifting apart.

const SHARE_PREFIX: &str = "$share/";

/// Valid topic NAME for PUBLISH / will: non-empty [MQTT-4.7.3-1] and free of the wildcards
/// `+` and `#` [MQTT-3.3.2-2]. Length and UTF-8 rules are the decoder's job.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', '#'])
}

/// Valid topic FILTER: non-empty; `#` only as the last level and alone in its level
/// [MQTT-4.7.1-1]; `+` alone in its level [MQTT-4.7.1-2]. A shared subscription
/// `$share/{group}/{filter}` needs a non-empty group without `+`, `#` or `/`, followed by a
/// valid filter [MQTT-4.8.2-1, MQTT-4.8.2-2].
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if let Some(rest) = filter.strip_prefix(SHARE_PREFIX) {
        return match rest.split_once('/') {
            Some((group, inner)) => {
                !group.is_empty() && !group.contains(['+', '#']) && is_valid_plain_filter(inner)
            }
            None => false,
        };
    }
    is_valid_plain_filter(filter)
}

fn is_valid_plain_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if is_last => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Splits `$share/{group}/{filter}` into `(group, filter)`; `None` for a filter that is not
/// of that form (including a `$share/` prefix without a second `/`), which the broker then
/// treats as an ordinary filter. Validity is [`is_valid_topic_filter`]'s job.
pub fn parse_shared_subscription(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix(SHARE_PREFIX)?.split_once('/')
}

/// Does `topic` (a name) match `filter` (a non-shared filter; strip `$share/{group}/` first)?
/// `+` matches exactly one level, `#` this level and all below (so `sport/#` matches `sport`)
/// [MQTT-4.7.1-2]; a filter starting with a wildcard does not match a topic starting with `$`
/// [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(is_valid_topic_name("a/b"));
        assert!(is_valid_topic_name("/"));
        assert!(is_valid_topic_name("$SYS/x"));
        // [MQTT-4.7.3-1]
        assert!(!is_valid_topic_name(""));
        // [MQTT-3.3.2-2]
        assert!(!is_valid_topic_name("a/+"));
        assert!(!is_valid_topic_name("a/#"));
        assert!(!is_valid_topic_name("a+b"));
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#", "+", "a", "a/b", "a/+", "+/+", "a/#", "+/#", "/", "//", "a//b", "/#", "$SYS/#",
        ] {
            assert!(is_valid_topic_filter(ok), "{ok}");
        }
        // [MQTT-4.7.1-1] / [MQTT-4.7.1-2] / [MQTT-4.7.3-1]
        for bad in ["", "a#", "a/#/b", "#/a", "a/b#", "a+", "a/+b", "++", "##"] {
            assert!(!is_valid_topic_filter(bad), "{bad}");
        }
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(
            parse_shared_subscription("$share/g/a/b"),
            Some(("g", "a/b"))
        );
        assert_eq!(parse_shared_subscription("$share/g/#"), Some(("g", "#")));
        assert_eq!(parse_shared_subscription("a/b"), None);
        assert_eq!(parse_shared_subscription("$share/g"), None);
        assert!(is_valid_topic_filter("$share/g/a/+"));
        assert!(is_valid_topic_filter("$share/g/#"));
        // [MQTT-4.8.2-1] group non-empty, no wildcards; [MQTT-4.8.2-2] filter required.
        for bad in [
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/+/a",
            "$share/g#/a",
            "$share/g/a#",
        ] {
            assert!(!is_valid_topic_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/#", "sport/tennis"));
        assert!(!matches("sport/tennis/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("#", "/"));
        // [MQTT-4.7.2-1]
        assert!(!matches("#", "$SYS/uptime"));
        assert!(!matches("+/uptime", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
        assert!(matches("$SYS/+", "$SYS/uptime"));
    }
}
