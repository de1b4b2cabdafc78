//! The local archive index: which chunks this site has already put in its
//! object store, so a snapshot uploads only new chunks without asking the
//! store (one HEAD per chunk would dominate an incremental snapshot).
//!
//! It is a cache of the store's `chunks/` listing, in its own small RocksDB
//! next to the dataset (`<dataset>/archive-index/`). Losing it costs one
//! listing: an index that is missing or was never filled is rebuilt from the
//! store. It must never claim a chunk the store lacks, so prune removes
//! entries (synced) before it deletes objects, and entries are added only
//! after the upload finished.

use std::path::{Path, PathBuf};

use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use vault::ChunkId;

use crate::error::{ArchiveError, Result};

const FILLED: &[u8] = b"!filled";
const URL: &[u8] = b"!url";

pub struct Index {
    db: DB,
    path: PathBuf,
    /// Counts the times entries were removed or the whole index cleared,
    /// in this process: a snapshot may reuse the pages of the one before
    /// only if the index lost nothing since (a lost entry is a chunk the
    /// next snapshot must upload again).
    losses: std::sync::atomic::AtomicU64,
}

impl Index {
    pub fn open(path: &Path) -> Result<Index> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.set_keep_log_file_num(2);
        // Ids only, looked up once per chunk a snapshot or piece names: a
        // small cache, not RocksDB's default of 32 MiB.
        let mut bb = rocksdb::BlockBasedOptions::default();
        bb.set_block_cache(&rocksdb::Cache::new_lru_cache(8 << 20));
        bb.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&bb);
        // A million chunk ids fill RocksDB's default 64 MiB memtable (two
        // of them while one flushes) before any reaches disk: the daemon's
        // memory grew with the archive.
        o.set_write_buffer_size(8 << 20);
        let db = DB::open(&o, path).map_err(|e| ArchiveError::Index {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
            losses: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn err(&self, e: rocksdb::Error) -> ArchiveError {
        ArchiveError::Index {
            path: self.path.clone(),
            source: e,
        }
    }

    /// True once the index was filled from a listing of the store at `url`
    /// (an index of another store is no index of this one).
    pub fn filled_for(&self, url: &str) -> Result<bool> {
        let filled = self.db.get(FILLED).map_err(|e| self.err(e))?.is_some();
        let same = self.db.get(URL).map_err(|e| self.err(e))?.as_deref() == Some(url.as_bytes());
        Ok(filled && same)
    }

    pub fn set_filled_for(&self, url: &str) -> Result<()> {
        self.write(
            |b| {
                b.put(FILLED, b"");
                b.put(URL, url.as_bytes());
            },
            true,
        )
    }

    pub fn has(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.db.get_pinned(id.0).map_err(|e| self.err(e))?.is_some())
    }

    /// [`Index::has`] of many ids in one batched read.
    pub fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        self.db
            .multi_get(ids.iter().map(|id| id.0))
            .into_iter()
            .map(|r| Ok(r.map_err(|e| self.err(e))?.is_some()))
            .collect()
    }

    pub fn add(&self, ids: &[ChunkId]) -> Result<()> {
        self.write(
            |b| {
                for id in ids {
                    b.put(id.0, b"");
                }
            },
            false,
        )
    }

    /// See `losses`.
    pub fn losses(&self) -> u64 {
        self.losses.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Removes entries durably: called before the objects are deleted.
    pub fn remove(&self, ids: &[ChunkId]) -> Result<()> {
        if !ids.is_empty() {
            self.losses
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.write(
            |b| {
                for id in ids {
                    b.delete(id.0);
                }
            },
            true,
        )
    }

    /// Forgets everything (the store was found to disagree).
    pub fn clear(&self) -> Result<()> {
        self.losses
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let keys: Vec<Box<[u8]>> = self
            .db
            .iterator(rocksdb::IteratorMode::Start)
            .filter_map(|r| r.ok().map(|(k, _)| k))
            .collect();
        self.write(
            |b| {
                for k in &keys {
                    b.delete(k);
                }
            },
            true,
        )
    }

    fn write(&self, f: impl FnOnce(&mut WriteBatch), sync: bool) -> Result<()> {
        let mut b = WriteBatch::default();
        f(&mut b);
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(b, &wo).map_err(|e| self.err(e))
    }
}
