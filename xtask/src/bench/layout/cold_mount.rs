//! A file system whose page cache holds only what faults read: the trace's view of which
//! pages of the agent ran.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run_step;

/// An ext4 file system in an image file, mounted with read-ahead off: what is read from it
/// after `empty_page_cache` is exactly what faults asked for. Unmounted and removed on drop.
#[derive(Debug)]
pub(super) struct ColdMount {
    image: PathBuf,
    pub(super) dir: PathBuf,
}

impl ColdMount {
    pub(super) fn create(work: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(work)?;
        let image = work.join("trace.ext4");
        let dir = work.join("mnt");
        // A mount left by an interrupted trace goes first.
        let _ = Command::new("umount")
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        fs::create_dir_all(&dir)?;
        fs::File::create(&image)?.set_len(512 << 20)?;
        run_step(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let mount = Self { image, dir };
        mount.mount()?;
        Ok(mount)
    }

    fn mount(&self) -> anyhow::Result<()> {
        run_step(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&self.image)
                .arg(&self.dir),
        )
    }

    /// Unmounts (which drops the file system's pages from the cache) and mounts again with
    /// read-ahead off on its loop device.
    pub(super) fn empty_page_cache(&self) -> anyhow::Result<()> {
        run_step(Command::new("umount").arg(&self.dir))?;
        self.mount()?;
        let source = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.dir)
            .output()?;
        let device = String::from_utf8_lossy(&source.stdout).trim().to_owned();
        let name = Path::new(&device)
            .file_name()
            .with_context(|| format!("no loop device behind {}", self.dir.display()))?;
        let knob = Path::new("/sys/block")
            .join(name)
            .join("queue/read_ahead_kb");
        fs::write(&knob, "0").with_context(|| format!("cannot write {}", knob.display()))
    }
}

impl Drop for ColdMount {
    fn drop(&mut self) {
        if let Err(e) = run_step(Command::new("umount").arg(&self.dir)) {
            eprintln!("warning: {e:#}; unmount {} by hand", self.dir.display());
        }
        let _ = fs::remove_file(&self.image);
    }
}
