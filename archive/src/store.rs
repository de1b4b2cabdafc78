//! The object store a site archives into, through `object_store`: S3 and
//! S3-compatible servers (MinIO, RustFS, Ceph RGW, s3s) or a local directory
//! (`file://`, the embedded default).
//!
//! Retries with exponential backoff on 5xx answers, timeouts and dropped
//! connections come from `object_store`'s own retry layer; concurrency is
//! bounded by its `LimitStore`. This wrapper adds what operators need on top:
//! keys relative to the configured prefix, multipart uploads for large
//! objects, Object Lock on history objects ([`crate::lock`]), and errors
//! that name the store, the object and the likely fix.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::HttpConnector;
use object_store::limit::LimitStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig, WriteMultipart,
};
use serde::Deserialize;

use crate::error::{ArchiveError, Result, StoreCause};
use crate::lock::{DeleteMarker, Locker, ObjectLock};

/// Objects above this size are uploaded in parts.
const MULTIPART_ABOVE: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;

/// Where and how to reach a site's object store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// `s3://bucket/prefix` or `file:///absolute/dir`.
    pub url: String,
    /// S3 endpoint, e.g. `http://minio.internal:9000`; AWS when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// TOML file with `access_key_id` and `secret_access_key`; without it the
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment is used.
    pub credentials_file: Option<PathBuf>,
    /// Virtual-hosted-style requests (`bucket.host`); default path-style,
    /// which MinIO, RustFS, Ceph and s3s all accept.
    pub virtual_hosted: bool,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries of a failed request before giving up.
    pub max_retries: usize,
    /// Lock history objects for a period (S3 only).
    pub object_lock: Option<ObjectLock>,
}

/// Requests in flight at once unless configured.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Time limit of one request unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl StoreConfig {
    pub fn new(url: &str) -> StoreConfig {
        StoreConfig {
            url: url.to_string(),
            endpoint: None,
            region: None,
            credentials_file: None,
            virtual_hosted: false,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            max_retries: 10,
            object_lock: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// The bucket's URL for signed requests, as `object_store` addresses it:
/// `endpoint/bucket/` path-style, the endpoint itself virtual-hosted, or
/// AWS's regional host.
fn bucket_url(cfg: &StoreConfig, bucket: &str, region: &str) -> Result<url::Url, String> {
    let text = match (&cfg.endpoint, cfg.virtual_hosted) {
        (Some(e), false) => format!("{}/{bucket}/", e.trim_end_matches('/')),
        (Some(e), true) => format!("{}/", e.trim_end_matches('/')),
        (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}/"),
        (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com/"),
    };
    url::Url::parse(&text).map_err(|e| format!("bucket URL {text}: {e}"))
}

/// One object as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the store's prefix.
    pub key: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// An opened object store with a key prefix.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    /// For `file://`: the directory, whose files triad fsyncs itself
    /// (object_store's local store does not).
    local_root: Option<PathBuf>,
    /// With `object_lock`: the signed requests it needs.
    locker: Option<Locker>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    pub fn open(cfg: &StoreConfig) -> Result<Store> {
        let bad = |m: String| ArchiveError::Config(format!("archive.url {:?}: {m}", cfg.url));
        let url = url::Url::parse(&cfg.url).map_err(|e| bad(e.to_string()))?;
        let mut local_root = None;
        let mut locker = None;
        let (inner, prefix): (Arc<dyn ObjectStore>, String) = match url.scheme() {
            "file" if cfg.object_lock.is_some() => {
                return Err(bad(
                    "archive.object_lock needs an S3 store with Object Lock; a file:// archive \
                     cannot lock its objects"
                        .into(),
                ))
            }
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| bad("file:// needs an absolute path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ArchiveError::io("creating the archive directory", &dir, e))?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                local_root = Some(dir);
                (Arc::new(fs), String::new())
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("s3:// needs a bucket: s3://bucket/prefix".into()))?;
                let client_options = ClientOptions::new()
                    .with_timeout(cfg.timeout)
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_allow_http(true);
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(cfg.virtual_hosted)
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(15),
                            base: 2.0,
                        },
                        max_retries: cfg.max_retries,
                        retry_timeout: Duration::from_secs(300),
                    })
                    .with_client_options(client_options.clone());
                let region = cfg.region.as_deref().unwrap_or("us-east-1");
                b = b.with_region(region);
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(path) = &cfg.credentials_file {
                    use std::os::unix::fs::PermissionsExt;
                    if let Ok(m) = std::fs::metadata(path) {
                        if m.permissions().mode() & 0o077 != 0 {
                            tracing::warn!(path = %path.display(), "the credentials file can be read by other users: chmod 600 it");
                        }
                    }
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        ArchiveError::Config(format!(
                            "archive.credentials_file {}: {e}",
                            path.display()
                        ))
                    })?;
                    // The parse error is not shown: it could quote a secret.
                    let c: Credentials = toml::from_str(&text).map_err(|_| {
                        ArchiveError::Config(format!(
                            "archive.credentials_file {}: expected TOML with access_key_id and \
                             secret_access_key (strings), and optionally session_token",
                            path.display()
                        ))
                    })?;
                    b = b
                        .with_access_key_id(c.access_key_id)
                        .with_secret_access_key(c.secret_access_key);
                    if let Some(t) = c.session_token {
                        b = b.with_token(t);
                    }
                }
                let s3 = b.build().map_err(|e| bad(e.to_string()))?;
                if let Some(lock) = cfg.object_lock {
                    let base = bucket_url(cfg, bucket, region).map_err(bad)?;
                    let client = object_store::client::ReqwestConnector::default()
                        .connect(&client_options)
                        .map_err(|e| bad(e.to_string()))?;
                    locker = Some(Locker::new(
                        client,
                        Arc::clone(s3.credentials()),
                        region.to_string(),
                        base,
                        lock,
                        cfg.max_retries,
                    ));
                }
                (Arc::new(s3), url.path().trim_matches('/').to_string())
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other}:// (use s3:// or file://)"
                )))
            }
        };
        let inner: Arc<dyn ObjectStore> = Arc::new(LimitStore::new(inner, cfg.concurrency.max(1)));
        Ok(Store {
            inner,
            prefix,
            url: cfg.url.clone(),
            local_root,
            locker,
        })
    }

    /// The lock history objects get, if any.
    pub fn object_lock(&self) -> Option<ObjectLock> {
        self.locker.as_ref().map(|l| l.lock())
    }

    /// With `object_lock`: fails unless the bucket has Object Lock enabled.
    pub async fn check_object_lock(&self) -> Result<()> {
        match &self.locker {
            Some(l) => l.check_bucket().await.map_err(|e| {
                self.lock_err("checking the Object Lock configuration of", "the bucket", e)
            }),
            None => Ok(()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// An object's full name for messages: the store's URL and the key.
    pub fn locate(&self, key: &str) -> String {
        format!("{}/{key}", self.url.trim_end_matches('/'))
    }

    /// Names damaged or missing objects by their full location, so an
    /// operator can find them in the bucket.
    pub fn locate_err(&self, e: ArchiveError) -> ArchiveError {
        match e {
            ArchiveError::Damaged { key, reason } => ArchiveError::Damaged {
                key: self.locate(&key),
                reason,
            },
            ArchiveError::Missing { key, reason } => ArchiveError::Missing {
                key: self.locate(&key),
                reason,
            },
            other => other,
        }
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn relative(&self, p: &ObjPath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> ArchiveError {
        let hint = match &e {
            object_store::Error::Unauthenticated { .. } => {
                " (the store rejected the credentials: check archive.credentials_file or \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            }
            object_store::Error::PermissionDenied { .. } => {
                " (access denied: check the credentials and the bucket policy)"
            }
            _ => {
                let s = e.to_string();
                if s.contains("NoSuchBucket") {
                    " (the bucket does not exist: create it, or fix archive.url)"
                } else if crate::error::PERMANENT_CODES.iter().any(|c| s.contains(c)) {
                    " (the store refused the request: check the credentials in \
                     archive.credentials_file or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and the \
                     bucket policy)"
                } else {
                    ""
                }
            }
        };
        ArchiveError::Store {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            cause: Box::new(StoreCause::Client(e)),
            hint,
        }
    }

    /// Writes an object whole; large ones go in parts. The object becomes
    /// visible only when complete.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key);
        if bytes.len() <= MULTIPART_ABOVE {
            self.inner
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| self.err("writing", key, e))?;
        } else {
            let upload = self
                .inner
                .put_multipart(&path)
                .await
                .map_err(|e| self.err("starting a multipart upload of", key, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for part in bytes.chunks(PART_SIZE) {
                if let Err(e) = w.wait_for_capacity(4).await {
                    // Leave no incomplete upload behind in the bucket.
                    let _ = w.abort().await;
                    return Err(self.err("uploading a part of", key, e));
                }
                w.write(part);
            }
            w.finish()
                .await
                .map_err(|e| self.err("completing the multipart upload of", key, e))?;
        }
        self.sync_local(key).await
    }

    /// Writes an object of the archive's history (a log piece, chunk,
    /// snapshot page or manifest): locked for the configured period when
    /// `object_lock` is set, else as [`Store::put`].
    pub async fn put_history(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        match &self.locker {
            Some(l) => l
                .put(self.path(key).as_ref(), bytes)
                .await
                .map_err(|e| self.lock_err("writing (locked)", key, e)),
            None => self.put(key, bytes).await,
        }
    }

    fn lock_err(&self, op: &'static str, key: &str, e: crate::lock::LockError) -> ArchiveError {
        ArchiveError::Store {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            cause: Box::new(StoreCause::Lock(e)),
            hint: "",
        }
    }

    /// The delete markers hiding objects under `prefix` (relative keys),
    /// oldest first. Empty without `object_lock`: the store may not keep
    /// versions at all.
    pub async fn delete_markers(&self, prefix: &str) -> Result<Vec<DeleteMarker>> {
        let Some(l) = &self.locker else {
            return Ok(Vec::new());
        };
        let full = format!("{}/", self.path(prefix.trim_end_matches('/')).as_ref());
        let mut found = l
            .delete_markers(&full)
            .await
            .map_err(|e| self.lock_err("listing the delete markers under", prefix, e))?;
        for m in &mut found {
            m.key = self.relative(&ObjPath::from(m.key.as_str()));
        }
        Ok(found)
    }

    /// Removes a delete marker, so the version it hid is current again.
    pub async fn remove_delete_marker(&self, m: &DeleteMarker) -> Result<()> {
        match &self.locker {
            Some(l) => l
                .delete_version(self.path(&m.key).as_ref(), &m.version_id)
                .await
                .map_err(|e| self.lock_err("removing the delete marker of", &m.key, e)),
            None => Ok(()),
        }
    }

    /// For `file://`: makes the object and its directory durable before the
    /// put counts as done (a manifest must never outlive its chunks).
    async fn sync_local(&self, key: &str) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let file = root.join(key);
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| ArchiveError::io("syncing an archived object", &file, e))?;
            // Every directory from the object's up to the root: any of them
            // may have been created by this put.
            for dir in file
                .ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(&root))
            {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| ArchiveError::io("syncing an archive directory", dir, e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ArchiveError::Stopped(e.to_string()))?
    }

    /// Reads an object of at most `max` bytes; None when it does not exist.
    /// The size the store reports is checked before the body is read, and
    /// the body is read no further than `max` whatever the store said, so
    /// an object someone replaced with a huge one costs nothing to refuse.
    pub async fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let r = match self.inner.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("reading", key, e)),
        };
        let too_big = |n: u64| ArchiveError::Damaged {
            key: self.locate(key),
            reason: format!(
                "{n} bytes, more than the {max} expected of it; refused without reading it"
            ),
        };
        let size = r.meta.size as u64;
        if size > max {
            return Err(too_big(size));
        }
        self.read_capped(key, r, size, max, too_big).await.map(Some)
    }

    /// Reads a body no further than `max` bytes whatever the store sends
    /// (`too_big` names the overrun); `expect` sizes the buffer.
    async fn read_capped(
        &self,
        key: &str,
        r: object_store::GetResult,
        expect: u64,
        max: u64,
        too_big: impl Fn(u64) -> ArchiveError,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(expect.min(max) as usize);
        let mut body = r.into_stream();
        while let Some(part) = body
            .try_next()
            .await
            .map_err(|e| self.err("reading", key, e))?
        {
            if (out.len() + part.len()) as u64 > max {
                return Err(too_big((out.len() + part.len()) as u64));
            }
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    /// Reads bytes `range` of an object that must exist (`what` names it
    /// in the error). The store returns exactly the range or fails, so the
    /// caller's bound on the range bounds what is read.
    pub async fn get_range(
        &self,
        key: &str,
        what: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>> {
        let want = range.end.saturating_sub(range.start);
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let r = match self.inner.get_opts(&self.path(key), opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ArchiveError::Missing {
                    key: self.locate(key),
                    reason: format!("{what} is not in {}", self.url),
                })
            }
            Err(e) => return Err(self.err("reading", key, e)),
        };
        let wrong = |n: u64| ArchiveError::Damaged {
            key: self.locate(key),
            reason: format!(
                "asked for bytes {}..{}, the store sent {n}",
                range.start, range.end
            ),
        };
        let out = self.read_capped(key, r, want, want, &wrong).await?;
        if out.len() as u64 != want {
            return Err(wrong(out.len() as u64));
        }
        Ok(out)
    }

    /// Copies an object inside the store (no bytes pass through this
    /// site); false when there is nothing to copy.
    pub async fn copy_if_exists(&self, from: &str, to: &str) -> Result<bool> {
        match self.inner.copy(&self.path(from), &self.path(to)).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("copying", from, e)),
        }
    }

    /// Reads an object that must exist, of at most `max` bytes.
    pub async fn get_required(&self, key: &str, what: &str, max: u64) -> Result<Vec<u8>> {
        self.get(key, max)
            .await?
            .ok_or_else(|| ArchiveError::Missing {
                key: self.locate(key),
                reason: format!("{what} is not in {}", self.url),
            })
    }

    /// Every object under `prefix` (relative keys), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let p = self.path(prefix.trim_end_matches('/'));
        let mut out: Vec<Listed> = self
            .inner
            .list(Some(&p))
            .map_ok(|m| Listed {
                key: self.relative(&m.location),
                size: m.size,
                modified: m.last_modified,
            })
            .try_collect()
            .await
            .map_err(|e| self.err("listing", prefix, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes an object; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", key, e)),
        }
    }
}
