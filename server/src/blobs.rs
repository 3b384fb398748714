//! Blobs — job files, outputs — content-addressed (`sha256/ab/abcdef…`) in an object store:
//! object_store's local file system under `DATA/blobs` by default (S3 later, the same code).
//! An upload is streamed into a private temporary file under `DATA/tmp` while it is hashed and
//! counted (cut off past its limit), then published under its hash: a blob is visible whole or
//! not at all, and equal blobs are stored once. The server computes every digest itself.

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    tmp: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the upload is larger than {limit} bytes")]
    TooBig { limit: u64 },
    #[error("the upload was cut short: {0}")]
    Body(String),
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("blob storage: {0}")]
    Store(#[from] object_store::Error),
}

/// An upload received whole into a temporary file (removed when this is dropped).
pub struct Received {
    pub file: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
}

impl Blobs {
    /// The local store under `data`.
    pub fn open_local(data: &Path) -> Result<Blobs, BlobError> {
        let root = data.join("blobs");
        let tmp = data.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        // Whatever a dead server left half received.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // fsync on publish: an acknowledged blob survives a power loss like its database row.
        let store = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
        Ok(Blobs {
            store: Arc::new(store),
            tmp,
        })
    }

    fn key(sha256: &str) -> StorePath {
        StorePath::from(format!(
            "sha256/{}/{sha256}",
            &sha256[..2.min(sha256.len())]
        ))
    }

    /// Streams `body` into a temporary file, hashing it, refusing it once past `limit` bytes.
    pub async fn receive(&self, body: Body, limit: u64) -> Result<Received, BlobError> {
        let named = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&self.tmp)?;
        let (std_file, path) = named.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(BlobError::TooBig { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(Received {
            file: path,
            sha256: crate::tokens::hex(&hasher.finalize()),
            size,
        })
    }

    /// Publishes a received upload under its hash (once: an equal blob is already there).
    pub async fn publish(&self, received: &Received) -> Result<(), BlobError> {
        let key = Self::key(&received.sha256);
        if self.store.head(&key).await.is_ok() {
            return Ok(());
        }
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut file = tokio::fs::File::open(&received.file).await?;
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // At most two parts in flight: the file is read no faster than it is written.
            writer.wait_for_capacity(2).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// The blob's bytes, streamed.
    pub async fn read(
        &self,
        sha256: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>> + use<>, BlobError> {
        let result = self.store.get(&Self::key(sha256)).await?;
        Ok(result.into_stream().map_err(|e| e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uploads_are_hashed_capped_published_once_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let data = vec![7u8; 3 << 20];
        let r = blobs
            .receive(Body::from(data.clone()), 4 << 20)
            .await
            .unwrap();
        assert_eq!(r.size, 3 << 20);
        assert_eq!(r.sha256, crate::tokens::hex(&Sha256::digest(&data)));
        blobs.publish(&r).await.unwrap();
        blobs.publish(&r).await.unwrap();
        let back: Vec<u8> = blobs
            .read(&r.sha256)
            .await
            .unwrap()
            .try_fold(Vec::new(), |mut v, b| async move {
                v.extend_from_slice(&b);
                Ok(v)
            })
            .await
            .unwrap();
        assert_eq!(back, data);
        let too_big = blobs.receive(Body::from(data.clone()), 1 << 20).await;
        assert!(matches!(too_big, Err(BlobError::TooBig { .. })));
        drop(r);
        assert_eq!(
            std::fs::read_dir(d.path().join("tmp")).unwrap().count(),
            0,
            "no temporary file is left"
        );
    }
}
