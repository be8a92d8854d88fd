//! The file loaders read `NEARPATH_*` from the process environment. This binary holds a single
//! test, so changing the environment cannot race with another test reading it.

use nearpath_config::*;
use std::io::Write as _;

#[test]
fn loaders_apply_the_process_environment() {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    writeln!(file, "[quic]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"").unwrap();

    let err = load_gateway_for_run(file.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: admin.token: required: set it in the file or in the environment variable \
             NEARPATH_ADMIN__TOKEN",
            file.path().display()
        )
    );

    std::env::set_var("NEARPATH_ADMIN__TOKEN", "process-env-token-0001");
    std::env::set_var("NEARPATH_STORE__PATH", "/tmp/from-env.db");
    let cfg = load_gateway_for_run(file.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.admin.token.as_deref(), Some("process-env-token-0001"));
    assert_eq!(cfg.store.path, std::path::Path::new("/tmp/from-env.db"));
    // The check-only loader applies the same environment.
    assert_eq!(load_gateway(file.path()).unwrap(), cfg);

    std::env::set_var("NEARPATH_ADMIN__BOGUS", "1");
    let err = load_gateway(file.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("admin.bogus: unknown key (expected `listen` or `token`) (from environment variable NEARPATH_ADMIN__BOGUS)"),
        "{err}"
    );
    std::env::remove_var("NEARPATH_ADMIN__BOGUS");
    std::env::remove_var("NEARPATH_ADMIN__TOKEN");
    std::env::remove_var("NEARPATH_STORE__PATH");
}
