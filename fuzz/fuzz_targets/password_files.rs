//! Apache htpasswd and group files: any text parses or is refused with a line error,
//! never a panic; cheap hash schemes are also verified against a password taken from
//! the input (bcrypt and SHA-crypt are skipped: their cost comes from the file).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use registry_gate::auth::groups::Groups;
use registry_gate::auth::htpasswd::{Htpasswd, Scheme};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz");
    // The last line doubles as a password to check.
    let password = text.lines().last().unwrap_or("").as_bytes();
    if let Ok(file) = Htpasswd::parse(text, path) {
        assert_eq!(file.len(), file.users().len());
        let cheap =
            |s: Option<Scheme>| matches!(s, Some(Scheme::Sha1 | Scheme::Md5Crypt | Scheme::AprMd5));
        let users = file.users();
        for user in &users {
            assert!(file.contains(user));
        }
        // An unknown user is checked against a dummy of the file's most common kind.
        if users.iter().all(|u| cheap(file.scheme(u))) {
            for user in &users {
                let _ = file.verify(user, password);
            }
            let _ = file.verify("no such user \u{0}", password);
        }
    }
    if let Ok(groups) = Groups::parse(text, path) {
        for group in groups.groups() {
            for member in groups.members(&group) {
                assert!(groups.is_member(&member, &group));
                assert!(groups.groups_of(&member).contains(&group));
            }
        }
    }
});
