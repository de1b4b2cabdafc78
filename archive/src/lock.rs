//! S3 Object Lock: the archive's history written so that nobody, this
//! site's own credentials included, can destroy it inside a retention
//! window.
//!
//! `object_store` cannot send the Object Lock headers on a put (its extra
//! headers are added after signing, and S3 refuses unsigned `x-amz-*`
//! headers), so the few requests Object Lock needs are made here and signed
//! with `object_store`'s own SigV4 signer and credential chain:
//! - a put carrying `x-amz-object-lock-mode`,
//!   `x-amz-object-lock-retain-until-date` and `Content-MD5` (which S3
//!   requires on any upload with a retention period), all signed;
//! - the bucket's lock configuration, checked when the store is opened: a
//!   bucket without Object Lock fails at once, naming the fix, rather than
//!   appearing protected;
//! - the delete markers under a prefix, and removing them: a plain delete
//!   in a versioned bucket only hides the current version behind a marker,
//!   and removing the marker brings the locked version back.
//!
//! Everything read from the store here is bounded (listing pages, error
//! bodies) like every other read.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use md5::Digest as _;
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpRequest, HttpResponse};
use serde::Deserialize;

/// Who may shorten or lift a lock before it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Users granted `s3:BypassGovernanceRetention` may delete early.
    Governance,
    /// Nobody may, not even the bucket's root account.
    Compliance,
}

impl LockMode {
    fn header(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// `[archive] object_lock`: every history object (log piece, chunk,
/// snapshot page and manifest) is locked for `period` from its upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub period: Duration,
}

impl ObjectLock {
    /// Whether an object uploaded at `modified` is still locked at `now`.
    pub fn holds(&self, modified: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let period = chrono::Duration::from_std(self.period).unwrap_or(chrono::Duration::MAX);
        modified
            .checked_add_signed(period)
            .is_none_or(|until| until > now)
    }
}

/// A delete marker: a plain delete that hides a version.
#[derive(Debug, Clone)]
pub struct DeleteMarker {
    /// Full key in the bucket.
    pub key: String,
    pub version_id: String,
    pub modified: DateTime<Utc>,
}

/// Most bytes of one listing page or error body read from the store (a
/// page of 1000 versions is about 400 KB).
const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// S3's limit for one PUT.
const MAX_PUT_BYTES: usize = 5 << 30;

/// The signed requests Object Lock needs, against one bucket.
pub(crate) struct Locker {
    client: HttpClient,
    credentials: AwsCredentialProvider,
    region: String,
    /// The bucket's URL, ending in `/`: `endpoint/bucket/` (path-style) or
    /// the virtual host.
    base: url::Url,
    lock: ObjectLock,
    max_retries: usize,
}

/// Why a request failed: the status (when one came back) and the store's
/// words, for the caller to put into an [`crate::ArchiveError`].
#[derive(Debug)]
pub struct LockError {
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for LockError {}

fn lock_err(status: Option<u16>, message: impl Into<String>) -> LockError {
    LockError {
        status,
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockConfiguration {
    object_lock_enabled: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListVersions {
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_version_id_marker: Option<String>,
    #[serde(default, rename = "DeleteMarker")]
    delete_markers: Vec<ListedMarker>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedMarker {
    key: String,
    version_id: String,
    #[serde(default)]
    is_latest: bool,
    last_modified: String,
}

impl Locker {
    pub(crate) fn new(
        client: HttpClient,
        credentials: AwsCredentialProvider,
        region: String,
        base: url::Url,
        lock: ObjectLock,
        max_retries: usize,
    ) -> Locker {
        Locker {
            client,
            credentials,
            region,
            base,
            lock,
            max_retries,
        }
    }

    pub(crate) fn lock(&self) -> ObjectLock {
        self.lock
    }

    fn url(&self, key: &str, query: &[(&str, &str)]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.pop_if_empty();
            segs.extend(key.split('/'));
        }
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        u
    }

    /// Sends a signed request, retrying what may pass on a second try
    /// (5xx, 429, the connection), with the same backoff as `object_store`.
    async fn send(
        &self,
        method: http::Method,
        url: url::Url,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), LockError> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let credential = self
                .credentials
                .get_credential()
                .await
                .map_err(|e| lock_err(None, format!("getting the store's credentials: {e}")))?;
            let mut req: HttpRequest = http::Request::builder()
                .method(method.clone())
                .uri(url.as_str())
                .body(body.clone().into())
                .map_err(|e| lock_err(None, e.to_string()))?;
            for (name, value) in headers {
                let v = http::HeaderValue::from_str(value)
                    .map_err(|e| lock_err(None, format!("header {name}: {e}")))?;
                req.headers_mut().insert(*name, v);
            }
            AwsAuthorizer::new(&credential, "s3", &self.region).authorize(&mut req, None);
            let retryable = match self.client.execute(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = read_bounded(resp).await?;
                    if (200..300).contains(&status) {
                        return Ok((status, text));
                    }
                    let err = lock_err(Some(status), error_words(&text));
                    if !(status >= 500 || status == 429) {
                        return Err(err);
                    }
                    err
                }
                Err(e) => lock_err(None, e.to_string()),
            };
            attempt += 1;
            if attempt > self.max_retries {
                return Err(retryable);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    /// Fails unless the bucket has Object Lock enabled: it can only be
    /// turned on when a bucket is created (or by AWS support), so the
    /// error says so.
    pub(crate) async fn check_bucket(&self) -> Result<(), LockError> {
        let url = self.url("", &[("object-lock", "")]);
        let not_enabled = || {
            lock_err(
                None,
                "the bucket does not have Object Lock enabled, so archive.object_lock cannot \
                 protect anything: create a bucket with Object Lock enabled (it cannot be \
                 added to an existing bucket on most stores) and point archive.url at it, or \
                 remove archive.object_lock",
            )
        };
        let (_, body) = match self.send(http::Method::GET, url, &[], Bytes::new()).await {
            Ok(r) => r,
            Err(e) if e.message.contains("ObjectLockConfigurationNotFound") => {
                return Err(not_enabled())
            }
            Err(e) => return Err(e),
        };
        let cfg: LockConfiguration = quick_xml::de::from_reader(body.as_ref())
            .map_err(|e| lock_err(None, format!("the lock configuration does not parse: {e}")))?;
        if cfg.object_lock_enabled.as_deref() != Some("Enabled") {
            return Err(not_enabled());
        }
        Ok(())
    }

    /// Writes `bytes` at `key` (full key in the bucket), locked until
    /// now + the period.
    pub(crate) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), LockError> {
        if bytes.len() > MAX_PUT_BYTES {
            return Err(lock_err(
                None,
                format!(
                    "{} bytes is more than one locked upload may carry ({MAX_PUT_BYTES})",
                    bytes.len()
                ),
            ));
        }
        let until = Utc::now()
            + chrono::Duration::from_std(self.lock.period).unwrap_or(chrono::Duration::MAX);
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes));
        let headers = [
            ("content-md5", md5),
            (
                "x-amz-object-lock-mode",
                self.lock.mode.header().to_string(),
            ),
            (
                "x-amz-object-lock-retain-until-date",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ];
        self.send(
            http::Method::PUT,
            self.url(key, &[]),
            &headers,
            Bytes::from(bytes),
        )
        .await
        .map(|_| ())
    }

    /// The delete markers that hide the current version of keys under
    /// `prefix` (full key), oldest first.
    pub(crate) async fn delete_markers(
        &self,
        prefix: &str,
    ) -> Result<Vec<DeleteMarker>, LockError> {
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = vec![("versions", ""), ("prefix", prefix)];
            if let Some((k, v)) = &markers {
                query.push(("key-marker", k));
                query.push(("version-id-marker", v));
            }
            let url = self.url("", &query);
            let (_, body) = self.send(http::Method::GET, url, &[], Bytes::new()).await?;
            let page: ListVersions = quick_xml::de::from_reader(body.as_ref())
                .map_err(|e| lock_err(None, format!("a version listing does not parse: {e}")))?;
            for m in page.delete_markers.into_iter().filter(|m| m.is_latest) {
                let modified = DateTime::parse_from_rfc3339(&m.last_modified)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        lock_err(
                            None,
                            format!(
                                "delete marker of {}: time {:?}: {e}",
                                m.key, m.last_modified
                            ),
                        )
                    })?;
                out.push(DeleteMarker {
                    key: m.key,
                    version_id: m.version_id,
                    modified,
                });
            }
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_version_id_marker,
            ) {
                (true, Some(k), Some(v)) => {
                    // A store that hands back the same page would loop for ever.
                    if markers.as_ref() == Some(&(k.clone(), v.clone())) {
                        return Err(lock_err(None, "the version listing does not advance"));
                    }
                    markers = Some((k, v));
                }
                _ => break,
            }
        }
        out.sort_by_key(|m| m.modified);
        Ok(out)
    }

    /// Removes one version (here: a delete marker, which no lock covers).
    pub(crate) async fn delete_version(&self, key: &str, version: &str) -> Result<(), LockError> {
        let url = self.url(key, &[("versionId", version)]);
        self.send(http::Method::DELETE, url, &[], Bytes::new())
            .await
            .map(|_| ())
    }
}

async fn read_bounded(resp: HttpResponse) -> Result<Bytes, LockError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut body = resp.into_body().bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.map_err(|e| lock_err(None, format!("reading the answer: {e}")))?;
        if out.len() + part.len() > MAX_RESPONSE_BYTES {
            return Err(lock_err(
                None,
                format!("the store's answer is over {MAX_RESPONSE_BYTES} bytes"),
            ));
        }
        out.extend_from_slice(&part);
    }
    Ok(Bytes::from(out))
}

/// The `<Code>` and `<Message>` of an S3 error body, or its start.
fn error_words(body: &[u8]) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct S3Error {
        code: Option<String>,
        message: Option<String>,
    }
    match quick_xml::de::from_reader::<_, S3Error>(body) {
        Ok(S3Error {
            code: Some(c),
            message,
        }) => match message {
            Some(m) => format!("{c}: {m}"),
            None => c,
        },
        _ => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holds_for_its_period_from_the_upload() {
        let lock = ObjectLock {
            mode: LockMode::Compliance,
            period: Duration::from_secs(3600),
        };
        let t = Utc::now();
        assert!(lock.holds(t, t + chrono::Duration::seconds(3599)));
        assert!(!lock.holds(t, t + chrono::Duration::seconds(3600)));
        // A period too long to add holds for ever rather than overflowing.
        let forever = ObjectLock {
            period: Duration::from_secs(u64::MAX),
            ..lock
        };
        assert!(forever.holds(t, t + chrono::Duration::days(36500)));
    }

    #[test]
    fn version_listings_and_errors_parse() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/</Prefix><IsTruncated>true</IsTruncated>
  <NextKeyMarker>p/b</NextKeyMarker><NextVersionIdMarker>v2</NextVersionIdMarker>
  <Version><Key>p/a</Key><VersionId>v0</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:00.000Z</LastModified></Version>
  <DeleteMarker><Key>p/a</Key><VersionId>v1</VersionId><IsLatest>true</IsLatest><LastModified>2026-01-02T00:00:00.000Z</LastModified></DeleteMarker>
  <Version><Key>p/b</Key><VersionId>v3</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:00.000Z</LastModified></Version>
  <DeleteMarker><Key>p/b</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest><LastModified>2026-01-03T00:00:00.000Z</LastModified></DeleteMarker>
</ListVersionsResult>"#;
        let page: ListVersions = quick_xml::de::from_reader(&xml[..]).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_version_id_marker.as_deref(), Some("v2"));
        let ids: Vec<&str> = page
            .delete_markers
            .iter()
            .map(|m| m.version_id.as_str())
            .collect();
        assert_eq!(ids, ["v1", "v2"]);
        assert_eq!(
            error_words(b"<Error><Code>AccessDenied</Code><Message>locked</Message></Error>"),
            "AccessDenied: locked"
        );
        assert_eq!(error_words(b"plain words"), "plain words");
    }
}
