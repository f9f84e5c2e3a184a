//! Apache `AuthGroupFile`: which users belong to which groups.
//!
//! Owns the file format only; `auth::policy` decides what a group may do. A line is
//! `group: user1 user2 …` (members separated by any whitespace). A group may appear on
//! several lines; its members are merged. Blank lines and lines starting with `#` are
//! skipped; CRLF and surrounding whitespace are tolerated.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::htpasswd::{LoadError, read_text};

/// A parsed group file: group name to its members.
#[derive(Clone, Debug, Default)]
pub struct Groups {
    members: BTreeMap<String, BTreeSet<String>>,
}

impl Groups {
    /// Parses group-file text; `path` is used only in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Groups, LoadError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let fail = |reason: &str| LoadError::Line {
                path: path.to_owned(),
                line: index + 1,
                reason: reason.to_owned(),
            };
            let Some(parsed) = split_group_line(raw) else {
                continue;
            };
            let (group, users) = parsed.ok_or_else(|| fail("no ':' after the group name"))?;
            if group.is_empty() {
                return Err(fail("empty group name"));
            }
            members
                .entry(group.to_owned())
                .or_default()
                .extend(users.split_whitespace().map(str::to_owned));
        }
        Ok(Groups { members })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Groups, LoadError> {
        Groups::parse(&read_text(path)?, path)
    }

    pub fn is_member(&self, user: &str, group: &str) -> bool {
        self.members
            .get(group)
            .is_some_and(|users| users.contains(user))
    }

    /// The groups `user` belongs to, sorted.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, users)| users.contains(user))
            .map(|(group, _)| group.clone())
            .collect()
    }

    /// The members of `group`, sorted; empty for an unknown group.
    pub fn members(&self, group: &str) -> Vec<String> {
        self.members
            .get(group)
            .map(|users| users.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// All group names, sorted, including groups without members.
    pub fn groups(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }
}

/// Splits one group-file line. `None`: blank or comment. `Some(None)`: no colon.
/// Otherwise the trimmed group name and the member list after the colon.
pub(crate) fn split_group_line(raw: &str) -> Option<Option<(&str, &str)>> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    Some(
        line.split_once(':')
            .map(|(group, users)| (group.trim(), users)),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/etc/registry-gate/httpd.groups")
    }

    #[test]
    fn parses_merges_and_answers() {
        let text = "\u{feff}# who may push\r\npusher: alice bob\r\n\r\n  readers:carol\t dave  \n\
                    pusher:   erin\talice\nempty:\n";
        let groups = Groups::parse(text, path()).unwrap();
        assert!(groups.is_member("alice", "pusher"));
        assert!(groups.is_member("erin", "pusher"));
        assert!(groups.is_member("dave", "readers"));
        assert!(!groups.is_member("carol", "pusher"));
        assert!(!groups.is_member("alice", "nosuch"));
        assert!(!groups.is_member("#", "pusher"));
        assert_eq!(groups.groups_of("alice"), ["pusher"]);
        assert_eq!(groups.groups_of("nobody"), Vec::<String>::new());
        assert_eq!(groups.members("pusher"), ["alice", "bob", "erin"]);
        assert_eq!(groups.groups(), ["empty", "pusher", "readers"]);
        assert!(groups.members("empty").is_empty());
    }

    #[test]
    fn groups_of_is_sorted() {
        let groups = Groups::parse("z: u\na: u\nm: v u\n", path()).unwrap();
        assert_eq!(groups.groups_of("u"), ["a", "m", "z"]);
    }

    #[test]
    fn bad_lines_are_line_errors() {
        for (text, line, why) in [
            ("pusher: a\nno colon here\n", 2, "no ':'"),
            ("# c\r\n\r\n: alice\r\n", 3, "empty group name"),
            ("a: b\n  \t : c\n", 2, "empty group name"),
        ] {
            match Groups::parse(text, path()) {
                Err(err @ LoadError::Line { .. }) => {
                    let message = err.to_string();
                    let expected = format!("{}:{line}: {why}", path().display());
                    assert!(message.starts_with(&expected), "{message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("groups");
        std::fs::write(&file, "pusher: mark\n").unwrap();
        assert!(Groups::load(&file).unwrap().is_member("mark", "pusher"));
        let err = Groups::load(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{err}");
    }
}
