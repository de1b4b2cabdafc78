//! Files replaced whole: through a temporary name and a rename, so a reader
//! sees the old file or the new one, never a part. The dataset's identity,
//! the log's base marker and the daemon's status files all go through here.

use std::path::Path;

use crate::error::{Result, VaultError};

/// Writes a file through a temporary name and a rename, syncing both.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    write_replace(path, body, true)
}

/// Replaces a file through a temporary name and a rename; with `durable`
/// the data and the directory are synced too. Status files skip the syncs:
/// they are rewritten every few hundred milliseconds and must not compete
/// with the log for the disk.
pub fn write_replace(path: &Path, body: &[u8], durable: bool) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(body)?;
            if durable {
                f.sync_all()?;
            }
            Ok(())
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    res.map_err(|e| VaultError::io("writing", path, e))?;
    if durable {
        if let Some(dir) = path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
    Ok(())
}
