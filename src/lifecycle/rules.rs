//! `[[retention]]` and `[[immutable]]`: which tags `prune` removes, and which tags no
//! push may move and no delete may remove. Repositories match with the globs of
//! `[[rules]]` (`*` within one path component, `**` across them), tags with `*`; for
//! each repository the first retention rule that matches it applies.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::auth::policy::glob;

fn everything() -> Vec<String> {
    vec!["**".into()]
}

/// One `[[retention]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    #[serde(default = "everything")]
    pub repositories: Vec<String>,
    /// The newest N tags by push time are always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<usize>,
    /// Tags (globs) never pruned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<String>,
    /// Other tags go once pushed longer ago than this; absent: they go now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_days: Option<u64>,
    /// Also remove manifests no remaining tag reaches (index children and referrers
    /// of kept manifests stay).
    #[serde(default)]
    pub untagged: bool,
}

/// One `[[immutable]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImmutableRule {
    #[serde(default = "everything")]
    pub repositories: Vec<String>,
    /// Tags (globs) that, once pushed, keep their digest and cannot be deleted.
    pub tags: Vec<String>,
}

fn any_match(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
}

/// A problem with a pattern list, for the configuration's error.
fn pattern_problem(what: &str, patterns: &[String], tags: bool) -> Option<String> {
    if patterns.is_empty() {
        return Some(format!("{what} must name at least one pattern"));
    }
    patterns.iter().find_map(|p| {
        let bad = p.is_empty()
            || p.chars().any(|c| c.is_whitespace() || c.is_control())
            || (tags && p.contains('/'));
        bad.then(|| format!("{what}: {p:?} is not a valid pattern"))
    })
}

impl RetentionRule {
    pub fn problem(&self) -> Option<String> {
        if let Some(p) = pattern_problem("repositories", &self.repositories, false) {
            return Some(p);
        }
        if !self.keep_tags.is_empty()
            && let Some(p) = pattern_problem("keep_tags", &self.keep_tags, true)
        {
            return Some(p);
        }
        if self.keep_last.is_none() && self.older_than_days.is_none() && !self.untagged {
            return Some(
                "says nothing to do: give keep_last, older_than_days or untagged \
                 (a rule with only keep_tags would remove every other tag)"
                    .into(),
            );
        }
        None
    }

    pub fn matches(&self, repo: &str) -> bool {
        any_match(&self.repositories, repo)
    }

    /// Whether a rule removes any tag at all (one with only `untagged` does not).
    pub fn prunes_tags(&self) -> bool {
        self.keep_last.is_some() || self.older_than_days.is_some()
    }
}

impl ImmutableRule {
    pub fn problem(&self) -> Option<String> {
        pattern_problem("repositories", &self.repositories, false)
            .or_else(|| pattern_problem("tags", &self.tags, true))
    }
}

/// The retention rules and immutable tags of a configuration.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    pub retention: Vec<RetentionRule>,
    pub immutable: Vec<ImmutableRule>,
}

/// A tag as retention sees it.
#[derive(Debug, Clone)]
pub struct TagAge {
    pub tag: String,
    /// `None`: the store cannot say (such a tag is never pruned for its age).
    pub pushed: Option<SystemTime>,
}

/// Why a tag stays (for `prune --dry-run`'s report), or that it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Go,
    Immutable(usize),
    KeepTag,
    KeepLast,
    Young,
    NoPushTime,
}

impl Lifecycle {
    /// The rule that names `tag` of `repo` immutable (its number, from 1).
    pub fn immutable_rule(&self, repo: &str, tag: &str) -> Option<usize> {
        self.immutable
            .iter()
            .position(|r| any_match(&r.repositories, repo) && any_match(&r.tags, tag))
            .map(|i| i + 1)
    }

    /// Whether any immutable rule covers `repo`.
    pub fn has_immutable(&self, repo: &str) -> bool {
        self.immutable
            .iter()
            .any(|r| any_match(&r.repositories, repo))
    }

    /// The retention rule for `repo`: the first that matches.
    pub fn retention_for(&self, repo: &str) -> Option<&RetentionRule> {
        self.retention.iter().find(|r| r.matches(repo))
    }

    /// What happens to each tag of `repo` under its rule, at `now`. Tags are taken
    /// newest first by push time (ties by name); the newest `keep_last` stay whatever
    /// else is said, then pinned and immutable tags, then tags younger than
    /// `older_than_days`.
    pub fn judge(&self, repo: &str, tags: &[TagAge], now: SystemTime) -> Vec<(String, Verdict)> {
        let Some(rule) = self.retention_for(repo).filter(|r| r.prunes_tags()) else {
            return Vec::new();
        };
        let mut order: Vec<&TagAge> = tags.iter().collect();
        // Unknown push times sort as the newest: they are never the ones to go.
        order.sort_by(|a, b| {
            let key = |t: &TagAge| {
                t.pushed.map_or(Duration::MAX, |p| {
                    p.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
                })
            };
            key(b).cmp(&key(a)).then_with(|| a.tag.cmp(&b.tag))
        });
        let max_age = rule
            .older_than_days
            .map(|d| Duration::from_secs(d.saturating_mul(86_400)));
        order
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let verdict = if rule.keep_last.is_some_and(|n| i < n) {
                    Verdict::KeepLast
                } else if let Some(n) = self.immutable_rule(repo, &t.tag) {
                    Verdict::Immutable(n)
                } else if any_match(&rule.keep_tags, &t.tag) {
                    Verdict::KeepTag
                } else if let Some(max) = max_age {
                    match t.pushed {
                        None => Verdict::NoPushTime,
                        Some(p) if now.duration_since(p).unwrap_or_default() <= max => {
                            Verdict::Young
                        }
                        Some(_) => Verdict::Go,
                    }
                } else {
                    Verdict::Go
                };
                (t.tag.clone(), verdict)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days_ago(now: SystemTime, d: u64) -> Option<SystemTime> {
        Some(now - Duration::from_secs(d * 86_400))
    }

    #[test]
    fn judging_tags() {
        let life = Lifecycle {
            retention: vec![RetentionRule {
                repositories: vec!["team/**".into()],
                keep_last: Some(2),
                keep_tags: vec!["latest".into(), "v*".into()],
                older_than_days: Some(30),
                untagged: false,
            }],
            immutable: vec![ImmutableRule {
                repositories: everything(),
                tags: vec!["release-*".into()],
            }],
        };
        let now = SystemTime::now();
        let tags = [
            ("new1", days_ago(now, 1)),
            ("new2", days_ago(now, 2)),
            ("mid", days_ago(now, 10)),
            ("old", days_ago(now, 40)),
            ("latest", days_ago(now, 90)),
            ("v1.0", days_ago(now, 99)),
            ("release-1", days_ago(now, 99)),
            ("unknown", None),
            ("older", days_ago(now, 50)),
        ]
        .map(|(t, p)| TagAge {
            tag: t.into(),
            pushed: p,
        });
        let verdicts: std::collections::HashMap<_, _> =
            life.judge("team/app", &tags, now).into_iter().collect();
        assert_eq!(
            verdicts["unknown"],
            Verdict::KeepLast,
            "unknown sorts newest"
        );
        assert_eq!(verdicts["new1"], Verdict::KeepLast);
        assert_eq!(verdicts["new2"], Verdict::Young);
        assert_eq!(verdicts["mid"], Verdict::Young);
        assert_eq!(verdicts["old"], Verdict::Go);
        assert_eq!(verdicts["older"], Verdict::Go);
        assert_eq!(verdicts["latest"], Verdict::KeepTag);
        assert_eq!(verdicts["v1.0"], Verdict::KeepTag);
        assert_eq!(verdicts["release-1"], Verdict::Immutable(1));
        assert!(life.judge("other/app", &tags, now).is_empty(), "no rule");
        assert_eq!(life.immutable_rule("x", "release-2"), Some(1));
        assert_eq!(life.immutable_rule("x", "v1"), None);
    }

    #[test]
    fn problems() {
        let rule = |keep_last, untagged| RetentionRule {
            repositories: everything(),
            keep_last,
            keep_tags: vec!["latest".into()],
            older_than_days: None,
            untagged,
        };
        assert!(rule(None, false).problem().is_some());
        assert!(rule(Some(3), false).problem().is_none());
        assert!(rule(None, true).problem().is_none());
        let imm = ImmutableRule {
            repositories: everything(),
            tags: vec!["a/b".into()],
        };
        assert!(imm.problem().is_some());
    }
}
