//! `Range` of a blob GET and `Content-Range` of an upload PATCH: any header value,
//! against any content length, resolves to a range inside the content or to
//! whole/unsatisfiable, never a panic.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use registry_gate::registry::fuzzing::{RangeRequest, content_range, parse_range};

fuzz_target!(|data: &[u8]| {
    let (len, value) = match data.split_first_chunk::<8>() {
        Some((len, rest)) => (u64::from_le_bytes(*len), rest),
        None => (0, data),
    };
    // Small lengths matter most (0, 1, a few bytes): fold half the inputs there.
    let len = if len & 1 == 0 {
        len >> 1
    } else {
        (len >> 1) % 64
    };
    if let Ok(v) = HeaderValue::from_bytes(value) {
        match parse_range(Some(&v), len) {
            RangeRequest::Part { start, end } => {
                assert!(start <= end, "{v:?} {len}: {start}-{end}");
                assert!(end < len, "{v:?} {len}: {start}-{end}");
            }
            RangeRequest::Whole | RangeRequest::Unsatisfiable => {}
        }
    }
    assert_eq!(parse_range(None, len), RangeRequest::Whole);
    if let Some((start, end)) = content_range(value) {
        assert!(start <= end);
    }
});
