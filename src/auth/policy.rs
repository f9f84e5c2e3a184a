//! What an identity may do. Deny by default: only the three registry actions exist,
//! and each is granted explicitly.
//!
//! The default reproduces the Apache recipe: pull for everybody, push and delete for the
//! members of the push group. Without an `[auth]` section nobody can push (a read-only
//! mirror).

use crate::auth::Identity;
use crate::route::RepoName;

/// A registry action, as in token scopes (`repository:NAME:pull,push,delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
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
}

/// Who may do what.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Members of this group may push and delete; `None`: nobody may.
    push_group: Option<String>,
}

impl Policy {
    pub fn new(push_group: Option<String>) -> Self {
        Policy { push_group }
    }

    /// Whether `identity` may do `action` on `repo` (`None`: registry-wide endpoints).
    /// `is_member(user, group)` answers from the current group file.
    pub fn allows(
        &self,
        identity: &Identity,
        action: Action,
        _repo: Option<&RepoName>,
        is_member: impl Fn(&str, &str) -> bool,
    ) -> bool {
        match action {
            Action::Pull => true,
            Action::Push | Action::Delete => match (identity, &self.push_group) {
                (Identity::User(user), Some(group)) => is_member(user, group),
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_the_recipe() {
        let p = Policy::new(Some("pusher".into()));
        let member = |u: &str, g: &str| u == "mark" && g == "pusher";
        let anon = Identity::Anonymous;
        let mark = Identity::User("mark".into());
        let eve = Identity::User("eve".into());
        assert!(p.allows(&anon, Action::Pull, None, member));
        assert!(!p.allows(&anon, Action::Push, None, member));
        assert!(!p.allows(&anon, Action::Delete, None, member));
        assert!(p.allows(&mark, Action::Push, None, member));
        assert!(p.allows(&mark, Action::Delete, None, member));
        assert!(!p.allows(&eve, Action::Push, None, member));
        let mirror = Policy::new(None);
        assert!(!mirror.allows(&mark, Action::Push, None, member));
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
