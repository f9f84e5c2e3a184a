//! What a caller may do. Deny by default: only the three registry actions exist, and a
//! rule names who gets each; a rule that does not name an action grants it to nobody.
//!
//! Rules match repository names with globs (`*` within one path component, `**`
//! across components); the first matching rule decides. After the configured rules
//! comes the default, which reproduces the Apache recipe: pull for everybody, push and
//! delete for the push group. Without an `[auth]` section nobody can push (a read-only
//! mirror). Basic and token requests are decided here, in one place.

use serde::{Deserialize, Serialize};

use crate::route::RepoName;

/// A registry action, as in token scopes (`repository:NAME:pull,push,delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    /// The action a request method asks for; `None` for methods the gate never passes.
    /// Methods are case-sensitive (RFC 9110): `get` is not `GET`.
    pub fn for_method(method: &http::Method) -> Option<Action> {
        match *method {
            http::Method::GET | http::Method::HEAD => Some(Action::Pull),
            http::Method::POST | http::Method::PUT | http::Method::PATCH => Some(Action::Push),
            http::Method::DELETE => Some(Action::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// Who a rule grants an action to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Everybody, with or without credentials.
    Anonymous,
    /// Every user with a verified password.
    Authenticated,
    /// Members of a group in the group file.
    Group(String),
}

impl Principal {
    fn parse(s: &str) -> Principal {
        match s {
            "anonymous" => Principal::Anonymous,
            "authenticated" => Principal::Authenticated,
            group => Principal::Group(group.to_owned()),
        }
    }
}

/// A rule as written in the configuration:
///
/// ```toml
/// [[rules]]
/// repositories = ["team-a/**"]
/// pull = ["authenticated"]
/// push = ["team-a"]
/// delete = ["team-a"]
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub repositories: Vec<String>,
    #[serde(default)]
    pub pull: Vec<String>,
    #[serde(default)]
    pub push: Vec<String>,
    #[serde(default)]
    pub delete: Vec<String>,
}

impl RuleConfig {
    /// Why this rule cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.repositories.is_empty() {
            return Some("repositories must name at least one pattern".into());
        }
        for p in &self.repositories {
            let ok = !p.is_empty()
                && p.bytes().all(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, b'.' | b'_' | b'-' | b'/' | b'*')
                });
            if !ok {
                return Some(format!(
                    "pattern {p:?}: use repository name characters, '/', '*' and '**'"
                ));
            }
        }
        for who in self.pull.iter().chain(&self.push).chain(&self.delete) {
            if who.is_empty() || who.contains(char::is_whitespace) || who.contains(':') {
                return Some(format!(
                    "{who:?} is not 'anonymous', 'authenticated' or a group name"
                ));
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
struct Rule {
    patterns: Vec<String>,
    pull: Vec<Principal>,
    push: Vec<Principal>,
    delete: Vec<Principal>,
}

impl Rule {
    fn from_config(c: &RuleConfig) -> Rule {
        let list = |v: &Vec<String>| v.iter().map(|s| Principal::parse(s)).collect();
        Rule {
            patterns: c.repositories.clone(),
            pull: list(&c.pull),
            push: list(&c.push),
            delete: list(&c.delete),
        }
    }

    fn principals(&self, action: Action) -> &[Principal] {
        match action {
            Action::Pull => &self.pull,
            Action::Push => &self.push,
            Action::Delete => &self.delete,
        }
    }

    fn matches(&self, repo: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob(p.as_bytes(), repo.as_bytes()))
    }
}

/// `*` matches within one path component, `**` across components.
pub(crate) fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern {
        [] => name.is_empty(),
        [b'*', b'*', rest @ ..] => {
            // `**/` may also match nothing at all (`a/**/b` matches `a/b`).
            if let [b'/', after @ ..] = rest
                && glob(after, name)
            {
                return true;
            }
            (0..=name.len()).any(|i| glob(rest, &name[i..]))
        }
        [b'*', rest @ ..] => {
            for i in 0..=name.len() {
                if glob(rest, &name[i..]) {
                    return true;
                }
                if i < name.len() && name[i] == b'/' {
                    break;
                }
            }
            false
        }
        [c, rest @ ..] => name.first() == Some(c) && glob(rest, &name[1..]),
    }
}

/// The caller as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    Anonymous,
    User(&'a str),
}

/// Who may do what.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    default: Rule,
}

impl Policy {
    /// The configured rules, then the default (pull: everybody; push and delete: the
    /// push group, or nobody when there is none).
    pub fn new(push_group: Option<String>, rules: &[RuleConfig]) -> Self {
        let writers: Vec<Principal> = push_group.into_iter().map(Principal::Group).collect();
        Policy {
            rules: rules.iter().map(Rule::from_config).collect(),
            default: Rule {
                patterns: vec!["**".into()],
                pull: vec![Principal::Anonymous],
                push: writers.clone(),
                delete: writers,
            },
        }
    }

    fn rule_for(&self, repo: Option<&RepoName>) -> &Rule {
        match repo {
            Some(r) => self
                .rules
                .iter()
                .find(|rule| rule.matches(r.as_str()))
                .unwrap_or(&self.default),
            // Registry-wide endpoints (the catalog) follow the rule for the whole
            // registry: the first rule written for `**`, else the default.
            None => self
                .rules
                .iter()
                .find(|rule| rule.patterns.iter().any(|p| p == "**"))
                .unwrap_or(&self.default),
        }
    }

    /// Whether `caller` may do `action` on `repo` (`None`: registry-wide endpoints).
    /// `is_member(user, group)` answers from the current group file.
    pub fn allows(
        &self,
        caller: Caller<'_>,
        action: Action,
        repo: Option<&RepoName>,
        is_member: impl Fn(&str, &str) -> bool,
    ) -> bool {
        self.rule_for(repo)
            .principals(action)
            .iter()
            .any(|p| match (p, caller) {
                (Principal::Anonymous, _) => true,
                (Principal::Authenticated, Caller::User(_)) => true,
                (Principal::Group(g), Caller::User(u)) => is_member(u, g),
                _ => false,
            })
    }

    /// Whether some rule could refuse a pull to somebody (then the catalog is filtered).
    pub fn restricts_pull(&self) -> bool {
        self.rules
            .iter()
            .chain(std::iter::once(&self.default))
            .any(|r| !r.pull.contains(&Principal::Anonymous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).expect("name")
    }

    #[test]
    fn default_policy_is_the_recipe() {
        let p = Policy::new(Some("pusher".into()), &[]);
        let member = |u: &str, g: &str| u == "mark" && g == "pusher";
        let r = repo("x");
        let r = Some(&r);
        assert!(p.allows(Caller::Anonymous, Action::Pull, r, member));
        assert!(!p.allows(Caller::Anonymous, Action::Push, r, member));
        assert!(!p.allows(Caller::Anonymous, Action::Delete, r, member));
        assert!(p.allows(Caller::User("mark"), Action::Push, r, member));
        assert!(p.allows(Caller::User("mark"), Action::Delete, r, member));
        assert!(!p.allows(Caller::User("eve"), Action::Push, r, member));
        assert!(p.allows(Caller::Anonymous, Action::Pull, None, member));
        let mirror = Policy::new(None, &[]);
        assert!(!mirror.allows(Caller::User("mark"), Action::Push, r, member));
        assert!(!p.restricts_pull());
    }

    #[test]
    fn rules_first_match_wins() {
        let rules = vec![
            RuleConfig {
                repositories: vec!["team-a/**".into()],
                pull: vec!["authenticated".into()],
                push: vec!["team-a".into()],
                delete: vec![],
            },
            RuleConfig {
                repositories: vec!["public/*".into()],
                pull: vec!["anonymous".into()],
                push: vec!["authenticated".into()],
                delete: vec![],
            },
        ];
        let p = Policy::new(Some("pusher".into()), &rules);
        let member =
            |u: &str, g: &str| (u, g) == ("alice", "team-a") || (u, g) == ("mark", "pusher");
        let a = repo("team-a/app");
        let deep = repo("team-a/x/y");
        let public = repo("public/x");
        let public_deep = repo("public/x/y");
        assert!(!p.allows(Caller::Anonymous, Action::Pull, Some(&a), member));
        assert!(p.allows(Caller::User("eve"), Action::Pull, Some(&a), member));
        assert!(p.allows(Caller::User("alice"), Action::Push, Some(&deep), member));
        assert!(!p.allows(Caller::User("mark"), Action::Push, Some(&a), member));
        assert!(!p.allows(Caller::User("alice"), Action::Delete, Some(&a), member));
        assert!(p.allows(Caller::User("eve"), Action::Push, Some(&public), member));
        // `*` stays within a component: public/x/y falls through to the default.
        assert!(!p.allows(
            Caller::User("eve"),
            Action::Push,
            Some(&public_deep),
            member
        ));
        assert!(p.allows(
            Caller::User("mark"),
            Action::Push,
            Some(&public_deep),
            member
        ));
        assert!(p.restricts_pull());
    }

    #[test]
    fn globs() {
        assert!(glob(b"**", b"a/b/c"));
        assert!(glob(b"a/*", b"a/b"));
        assert!(!glob(b"a/*", b"a/b/c"));
        assert!(glob(b"a/**", b"a/b/c"));
        assert!(glob(b"a/**/c", b"a/c"));
        assert!(glob(b"a/**/c", b"a/x/y/c"));
        assert!(glob(b"*-dev", b"app-dev"));
        assert!(!glob(b"*-dev", b"x/app-dev"));
        assert!(!glob(b"a", b"ab"));
    }

    #[test]
    fn rule_problems() {
        let bad = RuleConfig {
            repositories: vec!["Team/*".into()],
            pull: vec![],
            push: vec![],
            delete: vec![],
        };
        assert!(bad.problem().is_some());
        let empty = RuleConfig {
            repositories: vec![],
            ..bad.clone()
        };
        assert!(empty.problem().is_some());
    }

    #[test]
    fn methods() {
        use http::Method;
        assert_eq!(Action::for_method(&Method::GET), Some(Action::Pull));
        assert_eq!(Action::for_method(&Method::PATCH), Some(Action::Push));
        assert_eq!(Action::for_method(&Method::DELETE), Some(Action::Delete));
        for m in [
            "get", "Delete", "OPTIONS", "TRACE", "PROPFIND", "CONNECT", "MKCOL",
        ] {
            let m = Method::from_bytes(m.as_bytes()).expect("method");
            assert_eq!(Action::for_method(&m), None, "{m}");
        }
    }
}
