//! What a new container location *is*, so that one file, device or export is never two
//! containers and nothing the controller keeps for itself becomes one.
//!
//! A path is only a spelling: `..`, symlinks, hard links and a second device node reach the
//! same bytes. So a local location is resolved (symlinks followed, `..` removed) and
//! identified by what `stat` says: a file by device and inode, a block device by its device
//! number. An NBD URI is compared by server (host in lower case, default port filled in,
//! socket path resolved) and export. What this cannot see (two hosts' names for one server,
//! one disk behind two device numbers) the container's label catches (`crate::label`).
//!
//! The data directory holds the metadata (`tabula.redb`, `tabula.wal`): nothing in it may
//! become a container, except files directly in its `containers/` folder, where the
//! default container lives.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tabula_api::ControlError;
use tabula_container::{Location, NbdAddr, NbdUri};

/// The longest container location accepted (Linux's `PATH_MAX`).
pub(super) const MAX_LOCATION: usize = 4096;

/// What a local path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ident {
    File { dev: u64, ino: u64 },
    Block { rdev: u64 },
}

impl Ident {
    fn of(md: &std::fs::Metadata) -> Option<Ident> {
        let t = md.file_type();
        if t.is_block_device() {
            Some(Ident::Block { rdev: md.rdev() })
        } else if t.is_file() {
            Some(Ident::File {
                dev: md.dev(),
                ino: md.ino(),
            })
        } else {
            None
        }
    }

    /// What a stored or given path is now, following symlinks; `None` if it cannot be
    /// stat'ed or is neither a file nor a block device.
    pub(super) fn of_path(p: &Path) -> Option<Ident> {
        std::fs::metadata(p).ok().as_ref().and_then(Ident::of)
    }

    fn kind(self) -> &'static str {
        match self {
            Ident::File { .. } => "file",
            Ident::Block { .. } => "block device",
        }
    }
}

/// Refuses location text no file system or URI parser should see: NUL bytes, or longer
/// than [`MAX_LOCATION`].
pub(super) fn check_text(location: &str) -> Result<(), ControlError> {
    if location.contains('\0') {
        return Err(ControlError::Invalid(
            "the container path contains a NUL byte; give a file or block device path, or an NBD URI".into(),
        ));
    }
    if location.len() > MAX_LOCATION {
        return Err(ControlError::Invalid(format!(
            "the container path is {} bytes long; the longest accepted is {MAX_LOCATION}",
            location.len()
        )));
    }
    Ok(())
}

/// A local location, resolved.
#[derive(Debug)]
pub(super) struct Local {
    /// Symlinks and `..` resolved (for a file still to be created: its folder resolved).
    pub(super) real: PathBuf,
    /// What it is, if it exists.
    pub(super) ident: Option<Ident>,
    /// The device of the file system it is (or will be) on.
    pub(super) fs_dev: u64,
}

fn bad_path(p: &Path, e: &std::io::Error) -> ControlError {
    ControlError::Invalid(format!("container path {}: {e}", p.display()))
}

/// Resolves an absolute path that may not exist yet (a file to create).
pub(super) fn resolve(abs: &Path) -> Result<Local, ControlError> {
    match std::fs::symlink_metadata(abs) {
        Ok(_) => {
            let real = std::fs::canonicalize(abs).map_err(|e| {
                ControlError::Invalid(format!(
                    "container path {} cannot be resolved ({e}): is it a symlink to nothing?",
                    abs.display()
                ))
            })?;
            let md = std::fs::metadata(&real).map_err(|e| bad_path(abs, &e))?;
            Ok(Local {
                ident: Ident::of(&md),
                fs_dev: md.dev(),
                real,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
                return Err(bad_path(abs, &e));
            };
            let dir = std::fs::canonicalize(parent).map_err(|e| {
                ControlError::Invalid(format!(
                    "cannot create container file {}: its folder {}: {e}",
                    abs.display(),
                    parent.display()
                ))
            })?;
            let md = std::fs::metadata(&dir).map_err(|e| bad_path(parent, &e))?;
            Ok(Local {
                real: dir.join(name),
                ident: None,
                fs_dev: md.dev(),
            })
        }
        Err(e) => Err(bad_path(abs, &e)),
    }
}

/// Refuses `new` if it is inside the data directory (but for files directly in its
/// `containers/` folder), is one of the metadata files by another path, or is the block
/// device the data directory lives on.
pub(super) fn check_data_dir(
    new: &Local,
    shown: &str,
    data_dir: &Path,
) -> Result<(), ControlError> {
    let Ok(data) = std::fs::canonicalize(data_dir) else {
        return Ok(());
    };
    let containers = std::fs::canonicalize(data.join("containers")).ok();
    let db = data.join(super::DB_FILE);
    let wal = crate::store::wal_path(&db);
    let metadata = format!(
        "the controller's data directory {}, which holds its metadata ({}, {})",
        data.display(),
        super::DB_FILE,
        wal.file_name().unwrap_or_default().to_string_lossy()
    );
    if new.real.starts_with(&data) && new.real.parent() != containers.as_deref() {
        return Err(ControlError::Invalid(format!(
            "{shown} is inside {metadata}: a container there could overwrite it. Put container files elsewhere, or directly in {}",
            data.join("containers").display()
        )));
    }
    for f in [&db, &wal] {
        if new.ident.is_some() && new.ident == Ident::of_path(f) {
            return Err(ControlError::Invalid(format!(
                "{shown} is the controller's metadata file {} (by another path): a container there would overwrite it",
                f.display()
            )));
        }
    }
    if let Some(Ident::Block { rdev }) = new.ident {
        if std::fs::metadata(&data).is_ok_and(|m| overlap(m.dev(), rdev)) {
            return Err(ControlError::Invalid(format!(
                "block device {shown} holds the file system of {metadata}: using it as a container would destroy it"
            )));
        }
    }
    Ok(())
}

/// Refuses `new` if it is the same file or device as the container `name` stored at
/// `stored`, or if one holds the other's file system.
pub(super) fn check_local_against(
    new: &Local,
    shown: &str,
    name: &str,
    stored: &Path,
) -> Result<(), ControlError> {
    let Ok(md) = std::fs::metadata(stored) else {
        // Gone or unreachable: its label still stops it coming back under another name.
        return Ok(());
    };
    let old = Ident::of(&md);
    match (new.ident, old) {
        (Some(a), Some(b)) if a == b => Err(ControlError::Exists(format!(
            "{shown} is container '{name}' ({}): the same {} by another path. A container can be added once",
            stored.display(),
            a.kind()
        ))),
        (Some(Ident::Block { rdev: a }), Some(Ident::Block { rdev: b })) if overlap(a, b) => {
            Err(ControlError::Exists(format!(
                "block device {shown} overlaps container '{name}' ({}): one is a partition of the other",
                stored.display()
            )))
        }
        (Some(Ident::Block { rdev }), Some(Ident::File { .. })) if overlap(rdev, md.dev()) => {
            Err(ControlError::Exists(format!(
                "block device {shown} holds the file system of container '{name}' ({}): using it would destroy that container",
                stored.display()
            )))
        }
        (_, Some(Ident::Block { rdev }))
            if new.ident.is_none_or(|i| i.kind() == "file") && overlap(new.fs_dev, rdev) =>
        {
            Err(ControlError::Exists(format!(
                "{shown} is on the file system of block device {}, which is container '{name}': writing it would destroy that container",
                stored.display()
            )))
        }
        _ => Ok(()),
    }
}

/// Whether block devices `a` and `b` share bytes: the same device, or a disk and one of
/// its partitions (their sysfs directories nest).
fn overlap(a: u64, b: u64) -> bool {
    a == b || matches!((sysfs_dir(a), sysfs_dir(b)), (Some(x), Some(y)) if nested(&x, &y))
}

/// Whether one sysfs device directory is inside the other (a partition of a disk is).
fn nested(x: &Path, y: &Path) -> bool {
    x.starts_with(y) || y.starts_with(x)
}

/// The sysfs directory of block device number `dev` (glibc's major/minor encoding).
fn sysfs_dir(dev: u64) -> Option<PathBuf> {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()
}

/// An NBD URI as a comparable key: one server and export, however it is spelled.
pub(super) fn nbd_key(uri: &NbdUri) -> (String, String) {
    let server = match &uri.addr {
        NbdAddr::Tcp { host, port } => format!(
            "tcp:{}:{}",
            host.trim_end_matches('.').to_ascii_lowercase(),
            port.unwrap_or(tabula_container::NBD_DEFAULT_PORT)
        ),
        NbdAddr::Unix(p) => format!(
            "unix:{}",
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
        ),
    };
    (server, uri.export.clone())
}

/// Refuses an NBD location that is the same export as the container `name` at `stored`.
pub(super) fn check_nbd_against(
    new: &NbdUri,
    name: &str,
    stored: &str,
) -> Result<(), ControlError> {
    if let Ok(Location::Nbd(old)) = Location::parse(stored) {
        if nbd_key(&old) == nbd_key(new) {
            return Err(ControlError::Exists(format!(
                "{new} is container '{name}' ({stored}): the same NBD export by another spelling. A container can be added once"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_and_its_partitions_nest_and_two_disks_do_not() {
        let disk = Path::new(
            "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
        );
        let part = disk.join("sda1");
        let other = Path::new(
            "/sys/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb",
        );
        assert!(nested(disk, &part) && nested(&part, disk));
        assert!(!nested(disk, other) && !nested(&part, &disk.join("sda2")));
        // Real devices: every block device overlaps itself.
        if let Ok(md) = std::fs::metadata("/dev/loop0") {
            assert!(overlap(md.rdev(), md.rdev()));
        }
    }

    #[test]
    fn nbd_uris_compare_by_server_and_export() {
        let key = |s: &str| match Location::parse(s).unwrap() {
            Location::Nbd(u) => nbd_key(&u),
            Location::Path(_) => panic!("{s}"),
        };
        assert_eq!(
            key("nbd://Storage.Example./disk0"),
            key("nbd://storage.example:10809/disk0")
        );
        assert_ne!(
            key("nbd://storage.example/disk0"),
            key("nbd://storage.example/disk1")
        );
        assert_ne!(
            key("nbd://storage.example/disk0"),
            key("nbd://storage.example:10810/disk0")
        );
    }
}
