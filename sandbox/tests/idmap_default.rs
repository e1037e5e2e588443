//! `sandbox::set_default_id_mapping` changes what `IdMapping::Auto` means for the whole process, so
//! it has a test binary of its own (tests of one binary share the process).

mod support;

use sandbox::IdMap as Mapping;
use sandbox::{ExitStatus, IdMapping};
use support::{fixture, run, text};

#[test]
fn the_process_default_mapping_applies_to_auto_sandboxes() {
    if !support::full_map_or_skip() {
        return;
    }
    let f = fixture();
    std::fs::set_permissions(
        f.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let first_line = |sb: sandbox::Sandbox| {
        let out = run(sb.command(["head", "-1", "/proc/self/uid_map"]));
        assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
        text(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Built in: sandbox root is the caller.
    assert_eq!(sandbox::default_id_mapping(), IdMapping::Auto);
    assert_eq!(first_line(f.sandbox()), ["0", &uid.to_string(), "1"]);

    sandbox::set_default_id_mapping(IdMapping::Subordinate);
    assert_eq!(sandbox::default_id_mapping(), IdMapping::Subordinate);
    let (mapping, why) = sandbox::try_choose_id_map(IdMapping::Auto).unwrap();
    assert!(why.is_none());
    let Mapping::Subordinate { subuid, .. } = mapping else {
        panic!("{mapping:?}");
    };
    assert_eq!(
        first_line(f.sandbox()),
        ["0", &subuid.start.to_string(), "65536"]
    );
    // An explicit choice still wins.
    assert_eq!(
        first_line(f.sandbox().id_mapping(IdMapping::Single)),
        ["0", &uid.to_string(), "1"]
    );
    sandbox::set_default_id_mapping(IdMapping::Auto);
    assert_eq!(first_line(f.sandbox()), ["0", &uid.to_string(), "1"]);
}
