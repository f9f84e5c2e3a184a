//! Manifest validation: any body under any of the media types a client may send is
//! accepted or refused with MANIFEST_INVALID, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_gate::registry::fuzzing::validate_manifest;

const TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let _ = validate_manifest(body, TYPES[pick as usize % TYPES.len()]);
});
