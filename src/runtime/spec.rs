//! An OCI runtime spec (config.json) for a container, from its image's config, with the
//! defaults of `runc spec` (namespaces, mounts, masked paths, capabilities).

use serde_json::{Value, json};

use super::users::Ids;
use crate::error::{Error, Result};

/// What the caller decides beyond the image config.
pub struct RunOptions<'a> {
    pub hostname: &'a str,
    /// Absolute path of the container's mounted rootfs.
    pub rootfs: &'a str,
    /// Replaces the image's Cmd (Entrypoint still applies), as `docker run IMAGE ARGS`.
    pub args: &'a [String],
    pub tty: bool,
}

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The process arguments: Entrypoint + (args, or the image's Cmd).
pub fn process_args(cfg: &Value, args: &[String]) -> Result<Vec<String>> {
    let mut v = strings(&cfg["Entrypoint"]);
    if args.is_empty() {
        v.extend(strings(&cfg["Cmd"]));
    } else {
        v.extend(args.iter().cloned());
    }
    if v.is_empty() {
        return Err(Error::msg(
            "the image has no Entrypoint or Cmd: give a command after --",
        ));
    }
    Ok(v)
}

/// The environment: the image's, plus PATH and HOSTNAME when it lacks them (as docker).
fn env(cfg: &Value, o: &RunOptions<'_>) -> Vec<String> {
    let mut env = strings(&cfg["Env"]);
    let has = |env: &[String], k: &str| env.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&env, "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !has(&env, "HOSTNAME") {
        env.push(format!("HOSTNAME={}", o.hostname));
    }
    if o.tty && !has(&env, "TERM") {
        env.push("TERM=xterm".into());
    }
    env
}

/// The whole config.json for image config `image_config` (the image's config blob; its
/// `config` object holds Env, Entrypoint, Cmd, WorkingDir, User, Labels).
pub fn build(image_config: &Value, ids: &Ids, o: &RunOptions<'_>) -> Result<Value> {
    let cfg = &image_config["config"];
    let cwd = cfg["WorkingDir"]
        .as_str()
        .filter(|w| w.starts_with('/'))
        .unwrap_or("/");
    let caps = json!(CAPS);
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": o.tty,
            "user": {"uid": ids.uid, "gid": ids.gid, "additionalGids": ids.additional_gids},
            "args": process_args(cfg, o.args)?,
            "env": env(cfg, o),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": o.rootfs, "readonly": false},
        "hostname": o.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        },
        "annotations": cfg["Labels"].as_object().cloned().unwrap_or_default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts<'a>(args: &'a [String]) -> RunOptions<'a> {
        RunOptions {
            hostname: "c1",
            rootfs: "/r",
            args,
            tty: false,
        }
    }

    #[test]
    fn entrypoint_cmd_env_cwd_user_and_labels_come_from_the_image() {
        let ids = Ids {
            uid: 33,
            gid: 44,
            additional_gids: vec![50],
        };
        let img = json!({"config": {
            "Entrypoint": ["/bin/tini", "--"], "Cmd": ["sh"], "Env": ["A=1"],
            "WorkingDir": "/srv", "Labels": {"k": "v"}
        }});
        let c = build(&img, &ids, &opts(&[])).unwrap();
        assert_eq!(c["process"]["args"], json!(["/bin/tini", "--", "sh"]));
        assert_eq!(c["process"]["cwd"], "/srv");
        assert_eq!(c["process"]["terminal"], false);
        assert_eq!(c["process"]["user"]["uid"], 33);
        assert_eq!(c["process"]["user"]["additionalGids"], json!([50]));
        assert_eq!(c["annotations"]["k"], "v");
        assert_eq!(c["root"]["path"], "/r");
        let env = strings(&c["process"]["env"]);
        assert!(env.contains(&"A=1".to_string()) && env.iter().any(|e| e.starts_with("PATH=")));
        // Arguments replace Cmd, keep Entrypoint.
        let args = vec!["echo".to_string(), "hi".to_string()];
        let c = build(&img, &ids, &opts(&args)).unwrap();
        assert_eq!(
            c["process"]["args"],
            json!(["/bin/tini", "--", "echo", "hi"])
        );
        // Nothing to run at all: a clear error.
        let e = build(&json!({"config": {}}), &ids, &opts(&[])).unwrap_err();
        assert!(e.to_string().contains("give a command after --"));
    }
}
