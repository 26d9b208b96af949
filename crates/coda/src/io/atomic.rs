//! Atomic writes: data goes to a temporary file in the destination's folder, which is then
//! renamed over the destination. A crash leaves either the old file or the new one, never half.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Write to `path` atomically through a writer callback.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".coda-tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // tempfile creates 0600; outputs get the mode of an ordinary new file: 0666 less the umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // The rename is durable only once the directory entry is: sync the folder too.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Write a whole folder atomically: `fill` writes into a temporary sibling folder, which then
/// replaces `dir` in one step (Linux `renameat2(RENAME_EXCHANGE)` where the filesystem has it,
/// else two renames with a window of microseconds in which `dir` is absent). A crash leaves the
/// old folder or the new one, never a mix, plus at most a `.coda-tmp-*` sibling that
/// [`remove_temp_siblings`] clears. An existing `dir` is replaced whole; it must be a folder that
/// holds `marker` (e.g. a tokenizer's config.json) or be empty, so that a mistyped path never
/// deletes unrelated files.
pub fn write_dir_atomic(
    dir: &Path,
    marker: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_none();
        if !empty && !dir.join(marker).exists() {
            return Err(Error::Invalid(format!(
                "{} exists and is not a folder this command writes (no {marker}); choose another output folder",
                dir.display()
            )));
        }
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".coda-tmp-{name}-"))
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            tmp.path(),
            std::fs::Permissions::from_mode(0o777 & !umask()),
        );
    }
    fill(tmp.path())?;
    super::failpoint("folder-written", 0);
    let tmp = tmp.keep();
    let swapped = dir.exists() && exchange(&tmp, dir);
    if swapped {
        // `tmp` now holds the old folder.
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Swap two paths atomically; false where the kernel or filesystem cannot.
fn exchange(a: &Path, b: &Path) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(ca), Ok(cb)) = (
            std::ffi::CString::new(a.as_os_str().as_bytes()),
            std::ffi::CString::new(b.as_os_str().as_bytes()),
        ) else {
            return false;
        };
        // SAFETY: two valid NUL-terminated paths relative to the working directory.
        unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            ) == 0
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        false
    }
}

/// Remove the `.coda-tmp-*` files and folders a killed writer left in `dir`.
pub fn remove_temp_siblings(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".coda-tmp-") {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|err| Error::io(&p, err))?;
        }
    }
    Ok(())
}

/// The process umask, read without changing it (`/proc/self/status`, Linux >= 4.7; setting and
/// restoring it would race with other threads creating files). 0o022 where it cannot be read.
#[cfg(unix)]
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let err = write_atomic_with(&target, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("simulated crash"))
        });
        assert!(err.is_err());
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp file left behind"
        );
    }

    #[test]
    fn folders_are_replaced_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tok");
        write_dir_atomic(&dir, "config.json", |d| {
            std::fs::write(d.join("config.json"), "1").map_err(|e| Error::io(d, e))?;
            std::fs::write(d.join("stale.bin"), "x").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        // A second write replaces the folder: the old extra file is gone.
        write_dir_atomic(&dir, "config.json", |d| {
            std::fs::write(d.join("config.json"), "2").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "2"
        );
        assert!(!dir.join("stale.bin").exists());
        // A failing writer leaves the previous folder and no temporary sibling.
        let err = write_dir_atomic(&dir, "config.json", |d| {
            std::fs::write(d.join("config.json"), "3").map_err(|e| Error::io(d, e))?;
            Err(Error::Invalid("simulated failure".into()))
        });
        assert!(err.is_err());
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "2"
        );
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tok")]);
        // A folder of other files is never replaced.
        let other = root.path().join("photos");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("a.jpg"), "keep").unwrap();
        let err = write_dir_atomic(&other, "config.json", |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
        assert!(other.join("a.jpg").exists());
    }

    #[test]
    fn write_replaces_existing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }
}
