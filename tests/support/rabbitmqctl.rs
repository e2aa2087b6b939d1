//! rabbitmqctl on the broker of `scripts/services.sh`, bounded in time: for the tests
//! that raise alarms, stop the app or list what the broker holds, and put it back.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::fresh;

/// How long one rabbitmqctl command may take.
pub const CTL_WITHIN: Duration = Duration::from_secs(60);

/// rabbitmqctl through scripts/services.sh, bounded by CTL_WITHIN: its stdout, or why it
/// failed.
pub async fn ctl(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || ctl_blocking(&args))
        .await
        .unwrap()
}

pub fn ctl_blocking(args: &[String]) -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    // To files, not pipes: a long listing can't block the command.
    let out = std::env::temp_dir().join(fresh("chaos-ctl-out"));
    let err = std::env::temp_dir().join(fresh("chaos-ctl-err"));
    let files = (std::fs::File::create(&out), std::fs::File::create(&err));
    let (Ok(out_file), Ok(err_file)) = files else {
        return Err("temporary files".into());
    };
    let spawned = Command::new(script)
        .args(["rabbitmqctl", "-q"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn();
    let result = match spawned {
        Err(e) => Err(e.to_string()),
        Ok(mut child) => {
            let deadline = std::time::Instant::now() + CTL_WITHIN;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => {
                        break Ok(std::fs::read_to_string(&out).unwrap_or_default());
                    }
                    Ok(Some(status)) => {
                        let e = std::fs::read_to_string(&err).unwrap_or_default();
                        break Err(format!("{status}: {e}"));
                    }
                    _ if std::time::Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break Err(format!("not done within {CTL_WITHIN:?}"));
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    };
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&err);
    result.map_err(|e| format!("rabbitmqctl {}: {e}", args.join(" ")))
}

pub const RESTORE_WATERMARK: &str = "vm_memory_monitor:set_vm_memory_high_watermark(\
     element(2, application:get_env(rabbit, vm_memory_high_watermark))).";

/// The configured memory high watermark again (what the node's configuration says).
pub async fn restore_watermark() -> Result<String, String> {
    ctl(&["eval", RESTORE_WATERMARK]).await
}
