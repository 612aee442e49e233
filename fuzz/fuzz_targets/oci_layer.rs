//! An image layer (tar, or gzip when it starts with gzip's magic), applied
//! twice to a root directory beside a canary directory:
//! `nova_images::oci::layer::apply_layer`.
//!
//! Properties: nothing panics; whatever the layer says, nothing appears
//! outside the root (the canary stays empty and the scratch directory holds
//! only the two); a refused layer is refused with an entry name.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use nova_images::oci::layer::{ApplyLayerError, ApplyOptions, apply_layer};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir_in(common::scratch()).expect("a scratch directory");
    let root = dir.path().join("root");
    let canary = dir.path().join("canary");
    std::fs::create_dir(&root).expect("the root");
    std::fs::create_dir(&canary).expect("the canary");
    // Owners are never changed here (the fuzzer may run as root).
    let options = ApplyOptions { keep_owners: false };
    for _ in 0..2 {
        match apply_layer(&root, data, options) {
            Err(ApplyLayerError::Unsafe { entry, reason }) => {
                assert!(!reason.is_empty(), "a refusal of {entry:?} says why");
            }
            Ok(_) | Err(_) => {}
        }
    }
    let canary_entries = std::fs::read_dir(&canary).expect("list the canary").count();
    assert_eq!(canary_entries, 0, "a layer wrote beside the root");
    let mut beside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list the scratch directory")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["canary", "root"], "a layer wrote beside the root");
});
