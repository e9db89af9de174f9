//! fio with its nbd engine and crc32c verification: job arguments, running fio under a time
//! bound, and checking its JSON report.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Arguments for one verified fio job `name` against the NBD export at `url`, then `extra`.
pub fn args(url: &str, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a = super::strings(&[
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        // No verify-state files in the working directory.
        "--verify_state_save=0",
        "--time_based=0",
        "--output-format=json",
    ]);
    a.extend(super::strings(extra));
    a
}

/// The same job, only verifying what an earlier run with `args` wrote.
pub fn verify_only(args: &[String]) -> Vec<String> {
    let mut v = args.to_vec();
    v.push("--verify_only".into());
    v
}

/// Starts fio with `args`, killed if it runs longer than `limit`; stdout and stderr piped.
pub fn spawn(args: &[String], limit: Duration) -> Child {
    Command::new("timeout")
        .args(["-k", "5", &limit.as_secs().to_string(), "fio"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Checks a finished fio: every job wrote `write` bytes (if given), read `read` bytes back
/// (the verification pass) and reported neither an error nor a verify failure.
pub fn check(out: Output, args: &[String], write: Option<u64>, read: u64) {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "fio {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    assert!(
        !stderr.contains("verify") && !stderr.contains("bad magic") && !stderr.contains("crc"),
        "fio {args:?} reported verify problems:\n{stderr}"
    );
    let v = json_after_chatter(&stdout);
    let jobs = v["jobs"].as_array().expect("fio jobs");
    assert!(!jobs.is_empty(), "{v}");
    for j in jobs {
        let name = &j["jobname"];
        assert_eq!(j["error"].as_u64(), Some(0), "fio job {name}: {j}");
        // (with --verify_only fio counts the writes it skipped, so there is nothing to check)
        if let Some(write) = write {
            assert_eq!(
                j["write"]["io_bytes"].as_u64(),
                Some(write),
                "fio job {name} bytes written"
            );
        }
        assert_eq!(
            j["read"]["io_bytes"].as_u64(),
            Some(read),
            "fio job {name} bytes read (verified)"
        );
    }
}

/// Parses JSON printed after some lines of chatter (fio prints "fio: connected to NBD server"
/// before its JSON report).
pub fn json_after_chatter(text: &str) -> Value {
    let start = if text.starts_with('{') || text.starts_with('[') {
        0
    } else {
        text.find("\n{")
            .or_else(|| text.find("\n["))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("no JSON in:\n{text}"))
    };
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}
