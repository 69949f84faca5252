//! Files only the server's own user may read: the data dir (0700), and the
//! databases and secrets in it (0600). Messages and token secrets live
//! there, so other local accounts get nothing, whatever the umask.

use std::io;
use std::path::Path;

/// Creates `dir` (and its parents) if absent, and makes `dir` itself 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // An existing dir (or one made before this rule) is narrowed too.
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Makes sure the database file at `path` exists with mode 0600 before
/// SQLite opens it: SQLite gives the `-wal` and `-shm` files it creates the
/// mode of the database file, so all three stay private. An existing file
/// with a wider mode is narrowed.
pub fn prepare_private_file(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                create_private_dir(parent)?;
            }
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            match std::fs::metadata(file) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_data_dir_is_0700_even_when_it_existed_wider() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/data");
        create_private_dir(&dir).expect("created");
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        create_private_dir(&dir).expect("again");
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn database_files_are_0600_even_when_they_existed_wider() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = tmp.path().join("natter.db");
        prepare_private_file(&db).expect("prepared");
        assert_eq!(mode(&db), 0o600);
        assert_eq!(
            std::fs::metadata(&db).expect("exists").len(),
            0,
            "left empty"
        );
        let wal = tmp.path().join("natter.db-wal");
        std::fs::write(&wal, b"x").expect("write");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        prepare_private_file(&db).expect("again");
        assert_eq!((mode(&db), mode(&wal)), (0o600, 0o600));
    }
}
