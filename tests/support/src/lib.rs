//! What icedit's tests share. The committed fixtures live in the workspace's `tests/fixtures`
//! (made by the generators in `tests/reference`); every test finds them here, whichever crate
//! it belongs to. The CLI and HTTP helpers (`cli.rs`, `http.rs`) and the fuzzing helpers
//! (`fuzz.rs`) beside this crate are included with `#[path]` by the tests that use them: the
//! CLI ones name the test's own `icedit` binary, which only its crate's tests know.

use std::path::PathBuf;

/// The workspace's committed fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A fixture by its path under `tests/fixtures` (`flux/fill_diptych`, `gguf/source.png`).
pub fn fixture(relative: &str) -> PathBuf {
    fixtures().join(relative)
}
