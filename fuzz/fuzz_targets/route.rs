//! The `/v2` URL grammar: any request path is refused or routed, never a panic;
//! `normalize` is idempotent and its output never holds a dot segment, a `%` or a
//! control byte; the typed identifiers parse any string safely.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_gate::route::{self, Digest, Reference, RepoName, UploadId};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(normal) = route::normalize(&text) {
        assert_eq!(route::normalize(&normal).as_deref(), Ok(&*normal));
        assert!(!normal.contains('%') && !normal.contains("/../") && !normal.contains("/./"));
        assert!(normal.bytes().all(|b| b > 0x20 && b < 0x7f));
        if let Ok(r) = route::parse(&normal) {
            let _ = r.family();
            if let Some(repo) = r.repository() {
                assert_eq!(RepoName::parse(repo.as_str()).as_ref(), Ok(repo));
            }
        }
    }
    let _ = route::parse(&text);
    if let Ok(d) = Digest::parse(&text) {
        assert_eq!(format!("{}:{}", d.algorithm(), d.encoded()), d.as_str());
    }
    if let Ok(r) = Reference::parse(&text) {
        let _ = r.to_string();
    }
    let _ = RepoName::parse(&text);
    let _ = UploadId::parse(&text);
});
