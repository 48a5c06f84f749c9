//! Unit tests of the real host (moved from `host.rs` unchanged).

use super::*;

fn host(dir: &Path) -> LocalHost {
    LocalHost::new(dir, &[PathBuf::from("/etc")], None).unwrap()
}

#[test]
fn writes_stay_inside_the_base_dir() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    h.write_file("a/b.txt", "x").unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path().join("a/b.txt")).unwrap(),
        "x"
    );
    assert!(
        h.write_file("../escape.txt", "x")
            .unwrap_err()
            .contains("`..`")
    );
    assert!(
        h.write_file("/tmp/escape.txt", "x")
            .unwrap_err()
            .contains("inside the base directory")
    );
    std::os::unix::fs::symlink("/tmp", d.path().join("link")).unwrap();
    assert!(
        h.write_file("link/escape.txt", "x")
            .unwrap_err()
            .contains("is a symbolic link")
    );
    std::os::unix::fs::symlink("/tmp/target-file", d.path().join("flink")).unwrap();
    assert!(
        h.write_file("flink", "x")
            .unwrap_err()
            .contains("symbolic link")
    );
}

#[test]
fn reads_reach_read_roots_but_not_elsewhere() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    assert!(
        h.read_file("/etc/hostname", None, None).is_ok() || !Path::new("/etc/hostname").exists()
    );
    let e = h.read_file("/proc/self/status", None, None).unwrap_err();
    assert!(e.contains("outside the allowed roots"), "{e}");
    std::os::unix::fs::symlink("/proc/self/status", d.path().join("sneaky")).unwrap();
    let e = h.read_file("sneaky", None, None).unwrap_err();
    assert!(e.contains("outside the allowed roots"), "{e}");
}

#[test]
fn read_window_selects_lines() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "1\n2\n3\n4\n").unwrap();
    let mut h = host(d.path());
    assert_eq!(h.read_file("f", Some(2), Some(2)).unwrap(), "2\n3\n");
}

#[test]
fn shell_runs_scrubbed_in_base_dir_and_times_out() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    // SAFETY-free way to check the scrub: a variable from our environment must not leak.
    let out = h
        .shell(
            "pwd; echo \"[$CARGO_PKG_NAME]\"; exit 3",
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    let canonical = d.path().canonicalize().unwrap();
    assert!(
        out.stdout.starts_with(canonical.to_str().unwrap()),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("[]"),
        "environment not scrubbed: {}",
        out.stdout
    );
    let t = Instant::now();
    let e = h
        .shell("sleep 30", &[], Duration::from_millis(200))
        .unwrap_err();
    assert!(e.contains("timed out"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // A background child holding stdout must not hang the step.
    let t = Instant::now();
    let out = h
        .shell("sleep 30 & echo started", &[], Duration::from_secs(10))
        .unwrap();
    assert_eq!(out.stdout, "started\n");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Nor one that escaped the process group.
    let t = Instant::now();
    let out = h
        .shell(
            "setsid sleep 30 & echo escaped",
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(out.stdout, "escaped\n");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn simple_commands_run_without_the_shell_exactly_as_with_it() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    let env = vec![("TF_VAR_x".to_owned(), "two  words $HOME `id` *".to_owned())];
    let run = |h: &mut LocalHost, c: &str| h.shell(c, &env, Duration::from_secs(10)).unwrap();
    for command in [
        "/usr/bin/printf '[%s]' a 'b  c' \"${TF_VAR_x}\" '' x=y \"q\"'r's",
        "/usr/bin/env",
        "/bin/sh -c 'exit 7'",
        "cat missing-file",
    ] {
        assert!(
            tracefleet::shell::direct_argv(command, &env).is_some(),
            "{command}"
        );
        // A trailing `;` leaves the same command to the shell.
        let (direct, shell) = (run(&mut h, command), run(&mut h, &format!("{command};")));
        let sorted = |o: &str| {
            let mut l: Vec<&str> = o.lines().collect();
            l.sort_unstable();
            l.join("\n")
        };
        assert_eq!(sorted(&direct.stdout), sorted(&shell.stdout), "{command}");
        assert_eq!(direct.exit_code, shell.exit_code, "{command}");
        assert_eq!(
            direct.stderr.is_empty(),
            shell.stderr.is_empty(),
            "{command}"
        );
    }
    // Programs the shell must handle: one not found, and a script without `#!`.
    let out = run(&mut h, "no-such-program-anywhere --x");
    assert_eq!(out.exit_code, Some(127));
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    std::fs::write(d.path().join("script"), "echo from-script\n").unwrap();
    std::fs::set_permissions(
        d.path().join("script"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    assert_eq!(run(&mut h, "./script").stdout, "from-script\n");
}

#[test]
fn list_files_is_recursive_sorted_and_does_not_follow_symlinks() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    h.write_file("b/x.log", "1").unwrap();
    h.write_file("a.txt", "2").unwrap();
    std::os::unix::fs::symlink("/etc", d.path().join("etc-link")).unwrap();
    assert_eq!(h.list_files(".").unwrap(), vec!["a.txt", "b/x.log"]);
    assert!(
        h.list_files("/proc")
            .unwrap_err()
            .contains("outside the allowed roots")
    );
}

#[test]
fn fifo_is_refused_not_waited_on() {
    let d = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    nix::unistd::mkfifo(&d.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = h.read_file("pipe", None, None).unwrap_err();
    assert!(e.contains("expected a regular file"), "{e}");
    let e = h.read_file("pipe", Some(1), Some(1)).unwrap_err();
    assert!(e.contains("expected a regular file"), "{e}");
}

#[test]
fn write_through_a_symlinked_directory_creates_nothing_outside() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mut h = host(d.path());
    std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
    let e = h.write_file("link/new/f.txt", "x").unwrap_err();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(
        !outside.path().join("new").exists(),
        "created a directory outside"
    );
}
