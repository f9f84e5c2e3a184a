//! `registry-gate user add|del|passwd|groups|list`: edits the htpasswd and group files in place.
//!
//! Owns the editing only; the formats belong to `auth::htpasswd` and `auth::groups`,
//! and the command line to `main.rs`. Each edit keeps every other line as it was
//! (comments, order, line endings), refuses to touch a file that does not parse, and
//! replaces the file atomically: a temporary file in the same directory is written,
//! synced, given the original's mode and owner, and renamed over the original. A
//! symlinked path is followed, so the link stays a link.
//!
//! The two files are written one after the other, in the order that fails safe: `add`
//! writes the password before the group membership, `del` removes the membership before
//! the password, so a crash in between never leaves a stale name in a privileged group.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use crate::auth::groups::{self, Groups};
use crate::auth::htpasswd::{self, Htpasswd, LoadError};

/// Mode of a password or group file this module creates.
#[cfg(unix)]
const NEW_FILE_MODE: u32 = 0o640;

/// bcrypt uses the first 72 bytes of a password and ignores the rest.
const MAX_PASSWORD_BYTES: usize = 72;

/// The longest line read from a non-terminal stdin.
const MAX_STDIN_LINE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A file exists but does not parse (message: `file:line: reason`), or cannot be read.
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid user name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid group name {group:?}: {reason}")]
    InvalidGroup { group: String, reason: &'static str },
    #[error("empty password refused")]
    EmptyPassword,
    #[error("password refused: {0}")]
    InvalidPassword(&'static str),
    #[error("the passwords do not match")]
    PasswordMismatch,
    #[error("no password on standard input")]
    NoPassword,
    #[error("cannot read the password: {0}")]
    ReadPassword(#[source] io::Error),
    #[error("cannot hash the password: {0}")]
    Hash(#[from] bcrypt::BcryptError),
    #[error("{path}: no user {name:?}")]
    NoSuchUser { path: PathBuf, name: String },
}

/// Adds `name` or replaces its password, and adds it to each group in `add_to`.
///
/// Creates either file when missing (mode 0640 on unix). Group membership is only ever
/// added here, never removed; `del_user` removes it.
pub fn add_user(
    htpasswd: &Path,
    groups: &Path,
    name: &str,
    password: &str,
    add_to: &[String],
    bcrypt_cost: u32,
) -> Result<(), UserError> {
    check_user_name(name)?;
    for group in add_to {
        check_group_name(group)?;
    }
    check_new_password(password)?;
    let password_text = read_optional(htpasswd)?.unwrap_or_default();
    Htpasswd::parse(&password_text, htpasswd)?;
    let group_text = read_optional(groups)?;
    let parsed_groups = Groups::parse(group_text.as_deref().unwrap_or(""), groups)?;

    let hash = htpasswd::hash_bcrypt(password, bcrypt_cost)?;
    let entry = format!("{name}:{hash}");
    let mut lines = Lines::new(&password_text);
    match lines.position(|line| entry_user(line) == Some(name)) {
        Some(index) => lines.set(index, entry),
        None => lines.push(entry),
    }
    write_atomic(htpasswd, &lines.to_text())?;

    let mut lines = Lines::new(group_text.as_deref().unwrap_or(""));
    let mut changed = group_text.is_none();
    let mut done = std::collections::BTreeSet::new();
    for group in add_to {
        if parsed_groups.is_member(name, group) || !done.insert(group) {
            continue;
        }
        changed = true;
        match lines.position(|line| group_name(line) == Some(group)) {
            Some(index) => {
                let line = format!("{} {name}", lines.get(index).trim_end());
                lines.set(index, line);
            }
            None => lines.push(format!("{group}: {name}")),
        }
    }
    if changed {
        write_atomic(groups, &lines.to_text())?;
    }
    Ok(())
}

/// Removes `name` from the password file and from every group.
///
/// Fails with [`UserError::NoSuchUser`] when the name is in neither file. A missing
/// group file is left missing.
pub fn del_user(htpasswd: &Path, groups: &Path, name: &str) -> Result<(), UserError> {
    check_user_name(name)?;
    let password_text = read_optional(htpasswd)?;
    let users = Htpasswd::parse(password_text.as_deref().unwrap_or(""), htpasswd)?;
    let group_text = read_optional(groups)?;
    let parsed_groups = Groups::parse(group_text.as_deref().unwrap_or(""), groups)?;
    let in_groups = !parsed_groups.groups_of(name).is_empty();
    if !users.contains(name) && !in_groups {
        return Err(UserError::NoSuchUser {
            path: htpasswd.to_owned(),
            name: name.to_owned(),
        });
    }

    if let (true, Some(text)) = (in_groups, &group_text) {
        let mut lines = Lines::new(text);
        drop_member(&mut lines, name, |_| true);
        write_atomic(groups, &lines.to_text())?;
    }

    if let (true, Some(text)) = (users.contains(name), &password_text) {
        let mut lines = Lines::new(text);
        lines.retain(|line| entry_user(line) != Some(name));
        let mut text = lines.to_text();
        // A running gate takes an emptied file for a broken write and keeps the users
        // it had; a comment makes "no users any more" deliberate.
        if text.trim().is_empty() {
            text = format!("{NO_USERS_COMMENT}\n");
        }
        write_atomic(htpasswd, &text)?;
    }
    Ok(())
}

/// Sets a new password for an existing user; its groups stay as they are.
pub fn set_password(
    htpasswd: &Path,
    name: &str,
    password: &str,
    bcrypt_cost: u32,
) -> Result<(), UserError> {
    check_user_name(name)?;
    check_new_password(password)?;
    let text = read_optional(htpasswd)?.unwrap_or_default();
    if !Htpasswd::parse(&text, htpasswd)?.contains(name) {
        return Err(UserError::NoSuchUser {
            path: htpasswd.to_owned(),
            name: name.to_owned(),
        });
    }
    let hash = htpasswd::hash_bcrypt(password, bcrypt_cost)?;
    let mut lines = Lines::new(&text);
    if let Some(index) = lines.position(|line| entry_user(line) == Some(name)) {
        lines.set(index, format!("{name}:{hash}"));
    }
    write_atomic(htpasswd, &lines.to_text())
}

/// Adds an existing user to the groups in `add` and removes it from those in
/// `remove`; the password stays. Other members and lines are kept as they were.
pub fn set_groups(
    htpasswd: &Path,
    groups: &Path,
    name: &str,
    add: &[String],
    remove: &[String],
) -> Result<(), UserError> {
    check_user_name(name)?;
    for group in add.iter().chain(remove) {
        check_group_name(group)?;
    }
    if !Htpasswd::load(htpasswd)?.contains(name) {
        return Err(UserError::NoSuchUser {
            path: htpasswd.to_owned(),
            name: name.to_owned(),
        });
    }
    let group_text = read_optional(groups)?.unwrap_or_default();
    Groups::parse(&group_text, groups)?;
    let mut lines = Lines::new(&group_text);
    drop_member(&mut lines, name, |group| remove.iter().any(|r| r == group));
    let mut done = std::collections::BTreeSet::new();
    for group in add {
        if !done.insert(group) {
            continue;
        }
        match lines.position(|line| group_name(line) == Some(group)) {
            Some(index) => {
                let member = groups::split_group_line(lines.get(index))
                    .flatten()
                    .is_some_and(|(_, m)| m.split_whitespace().any(|m| m == name));
                if !member {
                    let line = format!("{} {name}", lines.get(index).trim_end());
                    lines.set(index, line);
                }
            }
            None => lines.push(format!("{group}: {name}")),
        }
    }
    write_atomic(groups, &lines.to_text())
}

/// Remove `name` from the member lists of the groups `which` picks; lines where it
/// is not a member stay as they were.
fn drop_member(lines: &mut Lines, name: &str, which: impl Fn(&str) -> bool) {
    for index in 0..lines.len() {
        let Some(Some((group, members))) = groups::split_group_line(lines.get(index)) else {
            continue;
        };
        if !which(group) || !members.split_whitespace().any(|m| m == name) {
            continue;
        }
        let kept: Vec<&str> = members.split_whitespace().filter(|&m| m != name).collect();
        let line = match kept.is_empty() {
            true => format!("{group}:"),
            false => format!("{group}: {}", kept.join(" ")),
        };
        lines.set(index, line);
    }
}

/// What `user del` leaves in a password file when it removes the last user.
pub const NO_USERS_COMMENT: &str = "# no users (registry-gate user del removed the last one)";

/// One user as `user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub scheme: Option<htpasswd::Scheme>,
    /// Sorted.
    pub groups: Vec<String>,
}

/// Every user in the password file, sorted, with its hash type and the groups it
/// belongs to. A missing group file means no groups; a missing password file is an
/// error.
pub fn list_users(htpasswd: &Path, groups: &Path) -> Result<Vec<Listed>, UserError> {
    let users = Htpasswd::load(htpasswd)?;
    let group_text = read_optional(groups)?;
    let groups = Groups::parse(group_text.as_deref().unwrap_or(""), groups)?;
    Ok(users
        .users()
        .into_iter()
        .map(|name| Listed {
            scheme: users.scheme(&name),
            groups: groups.groups_of(&name),
            name,
        })
        .collect())
}

/// Reads a new password: from the terminal without echo when stdin is a terminal
/// (asking twice when `confirm`), otherwise one line from stdin without its line ending.
pub fn read_password(confirm: bool) -> Result<String, UserError> {
    use std::io::IsTerminal;
    let password = if io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(UserError::ReadPassword)?;
        if confirm {
            let again =
                rpassword::prompt_password("Repeat password: ").map_err(UserError::ReadPassword)?;
            if first != again {
                return Err(UserError::PasswordMismatch);
            }
        }
        first
    } else {
        read_password_line(io::stdin().lock())?
    };
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    Ok(password)
}

/// One line from `reader`, without `\n` or `\r\n`.
fn read_password_line(reader: impl BufRead) -> Result<String, UserError> {
    let mut line = String::new();
    let read = reader
        .take(MAX_STDIN_LINE)
        .read_line(&mut line)
        .map_err(UserError::ReadPassword)?;
    if read == 0 {
        return Err(UserError::NoPassword);
    }
    if let Some(stripped) = line.strip_suffix('\n') {
        line.truncate(stripped.strip_suffix('\r').unwrap_or(stripped).len());
    }
    Ok(line)
}

fn check_user_name(name: &str) -> Result<(), UserError> {
    match name_problem(name) {
        Some(reason) => Err(UserError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_group_name(group: &str) -> Result<(), UserError> {
    match name_problem(group) {
        Some(reason) => Err(UserError::InvalidGroup {
            group: group.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What keeps `name` from being written into a password or group file, if anything.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.contains(':') {
        Some("contains ':'")
    } else if name.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.starts_with('#') {
        Some("starts with '#', which would make the line a comment")
    } else {
        None
    }
}

fn check_new_password(password: &str) -> Result<(), UserError> {
    if password.is_empty() {
        Err(UserError::EmptyPassword)
    } else if password.contains('\0') {
        Err(UserError::InvalidPassword("contains a NUL byte"))
    } else if password.len() > MAX_PASSWORD_BYTES {
        Err(UserError::InvalidPassword(
            "longer than 72 bytes, and bcrypt would ignore the rest",
        ))
    } else {
        Ok(())
    }
}

/// The user an htpasswd line defines, if it defines one.
fn entry_user(line: &str) -> Option<&str> {
    htpasswd::split_entry(line).map(|(user, _)| user)
}

/// The group a group-file line adds to, if it is such a line.
fn group_name(line: &str) -> Option<&str> {
    groups::split_group_line(line)
        .flatten()
        .map(|(group, _)| group)
}

/// The file's text, or `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, UserError> {
    match htpasswd::read_text(path) {
        Ok(text) => Ok(Some(text)),
        Err(LoadError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// A file's lines with their original endings, for editing a few in place.
struct Lines {
    lines: Vec<(String, &'static str)>,
    /// The ending for added lines: the file's own style.
    newline: &'static str,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
        let lines = text
            .split_inclusive('\n')
            .map(|line| {
                if let Some(body) = line.strip_suffix("\r\n") {
                    (body.to_owned(), "\r\n")
                } else if let Some(body) = line.strip_suffix('\n') {
                    (body.to_owned(), "\n")
                } else {
                    (line.to_owned(), "")
                }
            })
            .collect();
        Lines { lines, newline }
    }

    fn len(&self) -> usize {
        self.lines.len()
    }

    fn get(&self, index: usize) -> &str {
        self.lines.get(index).map_or("", |(line, _)| line)
    }

    fn position(&self, mut matches: impl FnMut(&str) -> bool) -> Option<usize> {
        self.lines.iter().position(|(line, _)| matches(line))
    }

    fn set(&mut self, index: usize, text: String) {
        if let Some(slot) = self.lines.get_mut(index) {
            slot.0 = text;
        }
    }

    /// Appends a line, first ending an unterminated last line.
    fn push(&mut self, text: String) {
        let newline = self.newline;
        if let Some(last) = self.lines.last_mut().filter(|(_, end)| end.is_empty()) {
            last.1 = newline;
        }
        self.lines.push((text, newline));
    }

    fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.lines.retain(|(line, _)| keep(line));
    }

    fn to_text(&self) -> String {
        self.lines
            .iter()
            .flat_map(|(line, end)| [line.as_str(), end])
            .collect()
    }
}

/// Replaces the file at `path` with `contents` so that readers see the old file or the
/// new one, never a mixture: write a new file beside it, sync, rename over.
fn write_atomic(path: &Path, contents: &str) -> Result<(), UserError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| UserError::Io {
            path: path.clone(),
            source,
        }
    };
    // Follow a symlink so the rename replaces its target, not the link.
    let target = match fs::canonicalize(path) {
        Ok(target) => target,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(path).is_ok() {
                return Err(UserError::Io {
                    path: path.to_owned(),
                    source: io::Error::new(io::ErrorKind::NotFound, "dangling symbolic link"),
                });
            }
            path.to_owned()
        }
        Err(err) => return Err(io_error(path)(err)),
    };
    let existing = match fs::metadata(&target) {
        Ok(meta) => Some(meta),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_error(&target)(err)),
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = TempFile(Some(
        dir.join(format!(".{file_name}.{:016x}.tmp", rand::random::<u64>())),
    ));
    let temp_path = temp.0.as_deref().unwrap_or(&target);

    // Errors name the file being replaced, which is what the user knows about.
    let fail = io_error(&target);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(temp_path).map_err(&fail)?;
    file.write_all(contents.as_bytes()).map_err(&fail)?;
    copy_permissions(&file, existing.as_ref()).map_err(&fail)?;
    file.sync_all().map_err(&fail)?;
    drop(file);
    fs::rename(temp_path, &target).map_err(&fail)?;
    temp.keep();
    // Make the rename itself durable. The new file is already in place, so a failure
    // here is not worth reporting as a failed edit.
    #[cfg(unix)]
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Gives the new file the original's mode and owner, or the default mode when new.
/// Failing to keep the owner is an error: the server might no longer read the file.
fn copy_permissions(file: &File, original: Option<&fs::Metadata>) -> io::Result<()> {
    match original {
        Some(meta) => {
            file.set_permissions(meta.permissions())?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let mine = file.metadata()?;
                if (mine.uid(), mine.gid()) != (meta.uid(), meta.gid()) {
                    std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())).map_err(
                        |err| {
                            io::Error::new(
                                err.kind(),
                                format!(
                                    "cannot give the new file the owner {}:{} of the old one \
                                     ({err}); run as that user or as root",
                                    meta.uid(),
                                    meta.gid()
                                ),
                            )
                        },
                    )?;
                    // chown may clear set-id bits; set the mode again.
                    file.set_permissions(meta.permissions())?;
                }
            }
            Ok(())
        }
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(fs::Permissions::from_mode(NEW_FILE_MODE))?;
            }
            Ok(())
        }
    }
}

/// A temporary file removed on drop, unless kept (renamed into place).
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pairs(listed: Vec<Listed>) -> Vec<(String, Vec<String>)> {
        listed.into_iter().map(|u| (u.name, u.groups)).collect()
    }

    const COST: u32 = 4;
    /// `htpasswd -nbm bob hunter2`
    const BOB: &str = "bob:$apr1$vTqeZwmb$1td8BuP18R92uwtMW3Ls.0";
    /// `htpasswd -nbs carol 'p@ss:word'`
    const CAROL: &str = "carol:{SHA}XVo4QKYxOH2OeKuETjdaW6SkHls=";

    struct Files {
        dir: tempfile::TempDir,
        htpasswd: PathBuf,
        groups: PathBuf,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("httpd.htpasswd");
        let groups = dir.path().join("httpd.groups");
        Files {
            dir,
            htpasswd,
            groups,
        }
    }

    impl Files {
        fn add(&self, name: &str, password: &str, groups: &[&str]) -> Result<(), UserError> {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            add_user(&self.htpasswd, &self.groups, name, password, &groups, COST)
        }
        fn users(&self) -> Htpasswd {
            Htpasswd::load(&self.htpasswd).unwrap()
        }
        fn groups(&self) -> Groups {
            Groups::load(&self.groups).unwrap()
        }
        fn read(&self, path: &Path) -> String {
            fs::read_to_string(path).unwrap()
        }
        /// Fails if a temporary file was left behind.
        fn assert_clean(&self) {
            let names: Vec<String> = fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(names.is_empty(), "left behind: {names:?}");
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn deleting_the_last_user_leaves_a_comment_not_an_empty_file() {
        let f = files();
        f.add("mark", "pw", &["pusher"]).unwrap();
        del_user(&f.htpasswd, &f.groups, "mark").unwrap();
        assert_eq!(f.read(&f.htpasswd), format!("{NO_USERS_COMMENT}\n"));
        assert!(f.users().is_empty());
    }

    #[test]
    fn add_creates_both_files_with_a_verifying_bcrypt() {
        let f = files();
        f.add("mark", "s3cret pass", &["pusher"]).unwrap();
        let text = f.read(&f.htpasswd);
        assert!(
            text.starts_with("mark:$2y$04$") && text.ends_with('\n'),
            "{text}"
        );
        let users = f.users();
        assert!(users.verify("mark", b"s3cret pass"));
        assert!(!users.verify("mark", b"s3cret pas"));
        assert_eq!(f.read(&f.groups), "pusher: mark\n");
        #[cfg(unix)]
        {
            assert_eq!(mode(&f.htpasswd), 0o640);
            assert_eq!(mode(&f.groups), 0o640);
        }
        f.assert_clean();
    }

    #[test]
    fn passwd_and_groups_change_one_thing_each() {
        let f = files();
        fs::write(
            &f.htpasswd,
            format!("{BOB}\nmark:{{SHA}}AAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"),
        )
        .unwrap();
        fs::write(&f.groups, "# teams\npusher: bob\nreaders: mark bob\n").unwrap();
        let listed = list_users(&f.htpasswd, &f.groups).unwrap();
        assert_eq!(listed[1].name, "mark");
        assert_eq!(listed[1].scheme, Some(htpasswd::Scheme::Sha1));
        // groups: the password line stays byte for byte.
        let before = f.read(&f.htpasswd);
        let s = |v: &[&str]| v.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
        set_groups(
            &f.htpasswd,
            &f.groups,
            "mark",
            &s(&["pusher", "ops"]),
            &s(&["readers"]),
        )
        .unwrap();
        assert_eq!(f.read(&f.htpasswd), before);
        assert_eq!(
            f.read(&f.groups),
            "# teams\npusher: bob mark\nreaders: bob\nops: mark\n"
        );
        // Adding again changes nothing; an unknown user is refused.
        set_groups(&f.htpasswd, &f.groups, "mark", &s(&["pusher"]), &[]).unwrap();
        assert_eq!(
            f.read(&f.groups),
            "# teams\npusher: bob mark\nreaders: bob\nops: mark\n"
        );
        assert!(matches!(
            set_groups(&f.htpasswd, &f.groups, "nobody", &s(&["pusher"]), &[]),
            Err(UserError::NoSuchUser { .. })
        ));
        // passwd: bcrypt now, groups untouched, other users untouched.
        let groups_before = f.read(&f.groups);
        set_password(&f.htpasswd, "mark", "new one", 4).unwrap();
        assert_eq!(f.read(&f.groups), groups_before);
        let users = f.users();
        assert!(users.verify("mark", b"new one"));
        assert_eq!(users.scheme("mark"), Some(htpasswd::Scheme::Bcrypt));
        assert!(f.read(&f.htpasswd).starts_with(&format!("{BOB}\n")));
        assert!(matches!(
            set_password(&f.htpasswd, "nobody", "pw", 4),
            Err(UserError::NoSuchUser { .. })
        ));
        f.assert_clean();
    }

    #[test]
    fn add_without_groups_still_creates_an_empty_group_file() {
        let f = files();
        f.add("mark", "pw", &[]).unwrap();
        assert_eq!(f.read(&f.groups), "");
        assert_eq!(
            pairs(list_users(&f.htpasswd, &f.groups).unwrap()),
            [("mark".into(), vec![])]
        );
    }

    #[test]
    fn replace_keeps_every_other_line_and_the_line_endings() {
        let f = files();
        let before =
            format!("# users\r\n{BOB}\r\n\r\nmark:{{SHA}}AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n{CAROL}");
        fs::write(&f.htpasswd, &before).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&f.htpasswd, fs::Permissions::from_mode(0o600)).unwrap();
        }
        f.add("mark", "new one", &[]).unwrap();
        let after = f.read(&f.htpasswd);
        let lines: Vec<&str> = after.split("\r\n").collect();
        assert_eq!(lines.len(), 5, "{after:?}");
        assert_eq!(lines[..3], ["# users", BOB, ""]);
        assert!(lines[3].starts_with("mark:$2y$"));
        assert_eq!(lines[4], CAROL);
        let users = f.users();
        assert!(users.verify("mark", b"new one"));
        assert!(users.verify("bob", b"hunter2"));
        assert!(users.verify("carol", b"p@ss:word"));

        // A new user goes at the end, in the file's own line ending style.
        f.add("zoe", "pw", &[]).unwrap();
        let after = f.read(&f.htpasswd);
        assert!(after.contains(&format!("{CAROL}\r\nzoe:$2y$")) && after.ends_with("\r\n"));
        #[cfg(unix)]
        assert_eq!(mode(&f.htpasswd), 0o600, "the original's mode is kept");
        f.assert_clean();
    }

    #[test]
    fn groups_are_merged_without_duplicates() {
        let f = files();
        fs::write(&f.htpasswd, format!("{BOB}\n")).unwrap();
        fs::write(
            &f.groups,
            "# groups\npusher: alice\nreaders: carol\nreaders:\tbob\n",
        )
        .unwrap();
        f.add("bob", "pw", &["pusher", "readers", "admins", "pusher"])
            .unwrap();
        assert_eq!(
            f.read(&f.groups),
            "# groups\npusher: alice bob\nreaders: carol\nreaders:\tbob\nadmins: bob\n"
        );
        // Adding again changes nothing.
        f.add("bob", "pw2", &["pusher", "admins", "readers"])
            .unwrap();
        assert_eq!(
            f.read(&f.groups),
            "# groups\npusher: alice bob\nreaders: carol\nreaders:\tbob\nadmins: bob\n"
        );
        assert_eq!(f.groups().groups_of("bob"), ["admins", "pusher", "readers"]);
        assert!(f.users().verify("bob", b"pw2"));
        f.assert_clean();
    }

    #[test]
    fn del_removes_the_user_everywhere() {
        let f = files();
        fs::write(&f.htpasswd, format!("# keep\n{BOB}\n{CAROL}\n")).unwrap();
        fs::write(&f.groups, "pusher: bob carol\r\nonly: bob\r\n# bob\r\n").unwrap();
        del_user(&f.htpasswd, &f.groups, "bob").unwrap();
        assert_eq!(f.read(&f.htpasswd), format!("# keep\n{CAROL}\n"));
        assert_eq!(f.read(&f.groups), "pusher: carol\r\nonly:\r\n# bob\r\n");
        let err = del_user(&f.htpasswd, &f.groups, "bob").unwrap_err();
        assert!(matches!(err, UserError::NoSuchUser { .. }), "{err}");
        assert!(err.to_string().contains("httpd.htpasswd"));
        f.assert_clean();
    }

    #[test]
    fn del_cleans_a_name_left_only_in_groups_and_keeps_a_missing_group_file_missing() {
        let f = files();
        fs::write(&f.htpasswd, format!("{CAROL}\n")).unwrap();
        fs::write(&f.groups, "pusher: ghost carol\n").unwrap();
        del_user(&f.htpasswd, &f.groups, "ghost").unwrap();
        assert_eq!(f.read(&f.groups), "pusher: carol\n");
        assert_eq!(f.read(&f.htpasswd), format!("{CAROL}\n"));

        fs::remove_file(&f.groups).unwrap();
        del_user(&f.htpasswd, &f.groups, "carol").unwrap();
        assert_eq!(f.read(&f.htpasswd), format!("{NO_USERS_COMMENT}\n"));
        assert!(!f.groups.exists());
    }

    #[test]
    fn list_is_sorted_with_groups() {
        let f = files();
        fs::write(&f.htpasswd, format!("{CAROL}\n{BOB}\n")).unwrap();
        assert_eq!(
            pairs(list_users(&f.htpasswd, &f.groups).unwrap()),
            [("bob".into(), vec![]), ("carol".into(), vec![])]
        );
        fs::write(&f.groups, "z: bob\npusher: bob carol\n").unwrap();
        assert_eq!(
            pairs(list_users(&f.htpasswd, &f.groups).unwrap()),
            [
                (
                    "bob".to_string(),
                    vec!["pusher".to_string(), "z".to_string()]
                ),
                ("carol".to_string(), vec!["pusher".to_string()])
            ]
        );
        let missing = f.dir.path().join("nope");
        let err = list_users(&missing, &f.groups).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn broken_files_are_not_touched() {
        let f = files();
        let broken = format!("{BOB}\nfrank:oP4biXIOWzYuA\n");
        fs::write(&f.htpasswd, &broken).unwrap();
        let err = f.add("mark", "pw", &[]).unwrap_err();
        let expected = format!("{}:2: ", f.htpasswd.display());
        assert!(err.to_string().starts_with(&expected), "{err}");
        assert!(err.to_string().contains("DES"), "{err}");
        assert_eq!(f.read(&f.htpasswd), broken);
        assert!(!f.groups.exists());

        fs::write(&f.htpasswd, format!("{BOB}\n")).unwrap();
        fs::write(&f.groups, "pusher bob\n").unwrap();
        for err in [
            f.add("bob", "pw", &["pusher"]).unwrap_err(),
            del_user(&f.htpasswd, &f.groups, "bob").unwrap_err(),
            list_users(&f.htpasswd, &f.groups).unwrap_err(),
        ] {
            let expected = format!("{}:1: no ':'", f.groups.display());
            assert!(err.to_string().starts_with(&expected), "{err}");
        }
        assert_eq!(
            f.read(&f.htpasswd),
            format!("{BOB}\n"),
            "htpasswd untouched too"
        );
        f.assert_clean();
    }

    #[test]
    fn bad_names_and_passwords_are_refused() {
        let f = files();
        for name in [
            "",
            "a:b",
            "a b",
            "tab\there",
            "bell\u{7}",
            "#root",
            "nbsp\u{a0}x",
        ] {
            let err = f.add(name, "pw", &[]).unwrap_err();
            assert!(
                matches!(err, UserError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
        for group in ["", "a:b", "a b", "#g"] {
            let err = f.add("ok", "pw", &[group]).unwrap_err();
            assert!(
                matches!(err, UserError::InvalidGroup { .. }),
                "{group:?}: {err}"
            );
        }
        assert!(matches!(
            f.add("ok", "", &[]),
            Err(UserError::EmptyPassword)
        ));
        assert!(matches!(
            f.add("ok", "a\0b", &[]),
            Err(UserError::InvalidPassword(_))
        ));
        assert!(matches!(
            f.add("ok", &"x".repeat(73), &[]),
            Err(UserError::InvalidPassword(_))
        ));
        assert!(
            !f.htpasswd.exists() && !f.groups.exists(),
            "refusals write nothing"
        );
        f.add("ok72", &"x".repeat(72), &[]).unwrap();
        assert!(f.users().verify("ok72", "x".repeat(72).as_bytes()));
        assert!(matches!(
            add_user(&f.htpasswd, &f.groups, "c", "pw", &[], 99),
            Err(UserError::Hash(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_followed_not_replaced() {
        let f = files();
        let real = f.dir.path().join("real.htpasswd");
        fs::write(&real, format!("{BOB}\n")).unwrap();
        std::os::unix::fs::symlink(&real, &f.htpasswd).unwrap();
        f.add("mark", "pw", &[]).unwrap();
        assert!(
            fs::symlink_metadata(&f.htpasswd)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(Htpasswd::load(&real).unwrap().verify("mark", b"pw"));

        let dangling = f.dir.path().join("dangling");
        std::os::unix::fs::symlink(f.dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_atomic(&dangling, "x").is_err());
        assert!(!f.dir.path().join("nowhere").exists());
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let f = files();
        // A non-empty directory cannot be replaced by a file.
        let target = f.dir.path().join("a-directory");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "x").unwrap();
        let err = write_atomic(&target, "new contents").unwrap_err();
        assert!(err.to_string().contains("a-directory"), "{err}");
        assert!(target.is_dir());
        f.assert_clean();
    }

    #[test]
    fn password_lines_lose_their_ending_only() {
        let read = |input: &str| read_password_line(io::Cursor::new(input.to_owned()));
        assert_eq!(read("pw\r\n").unwrap(), "pw");
        assert_eq!(read("pw\nsecond line\n").unwrap(), "pw");
        assert_eq!(read("pw").unwrap(), "pw");
        assert_eq!(read(" spaced pw \t\n").unwrap(), " spaced pw \t");
        assert_eq!(read("pw\r").unwrap(), "pw\r");
        assert_eq!(read("\n").unwrap(), "");
        assert!(matches!(read(""), Err(UserError::NoPassword)));
    }
}
