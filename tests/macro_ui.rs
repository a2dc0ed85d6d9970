//! Compile-fail tests of `#[trainable_model]`: one file per diagnostic in `tests/ui/`,
//! with its expected `.stderr` (bless with `TRYBUILD=overwrite`), and expansions that
//! must compile warning-free in `tests/ui-pass/`. The stderr files are tied to the
//! toolchain pinned in `rust-toolchain.toml`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("../tests/ui/*.rs");
    t.pass("../tests/ui-pass/*.rs");
}
