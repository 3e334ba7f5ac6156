//! Every fuzz corpus input (`fuzz/corpus/<target>/`) and every input a
//! fuzzer once failed on (`fuzz/regressions/<target>/`), replayed through
//! the same property checks the fuzz targets assert (`fuzz/src/lib.rs`),
//! on stable and without libFuzzer. `scripts/fuzz` runs the fuzzers.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod props;

/// Runs `check` on every input of `target`; fails naming each input whose
/// property does not hold.
fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = 0;
    let mut failed = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && kind == "regressions" => continue,
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        let mut paths: Vec<_> = entries
            .map(|e| {
                e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                    .path()
            })
            .collect();
        paths.sort();
        for path in paths {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            inputs += 1;
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(inputs > 0, "fuzz/corpus/{target} holds no input");
    assert!(
        failed.is_empty(),
        "{target}: properties fail on {failed:#?}"
    );
}

/// One test per fuzz target, named after it.
macro_rules! replays {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), props::$target);
            }
        )*
    };
}

replays!(
    route_body,
    schema_row,
    offline_file,
    flag_json,
    config_toml,
    rollout_plan
);
