//! Writing a blob into `blobs/sha256/`: streamed through a temp file in `tmp/` that is hashed
//! as it is written, checked against the digest and size a manifest gives, fsynced and only
//! then renamed into place. No blob is ever held in memory whole: layers run to gigabytes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::Store;
use super::digest::Digest;
use crate::error::{Context, Error, Result};

/// A blob being written; `finish` puts it in the store.
pub struct BlobWriter {
    file: BufWriter<File>,
    tmp: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub fn new(store: &Store) -> Result<BlobWriter> {
        let tmp = store.tmp().join(format!(
            "blob-{}-{}",
            std::process::id(),
            super::rand_suffix()
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx(format!("writing {}", tmp.display()))?;
        Ok(BlobWriter {
            file: BufWriter::with_capacity(1 << 20, file),
            tmp,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Check what was written against `expected` and `size` where known, make it durable
    /// and store it; returns its digest. On any error (or a drop unfinished) the temp file
    /// goes.
    pub fn finish(
        mut self,
        store: &Store,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<Digest> {
        let d = Digest::from_hasher(std::mem::take(&mut self.hasher));
        let named = expected.unwrap_or(&d);
        if let Some(s) = size
            && self.len != s
        {
            return Err(Error::msg(format!(
                "blob {named} is {} bytes, the manifest says {s} (truncated?)",
                self.len
            )));
        }
        if expected.is_some_and(|e| e != &d) {
            return Err(Error::msg(format!(
                "blob {named} does not match its digest (corrupt)"
            )));
        }
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        let dest = store.blob_path(&d);
        if !dest.exists() {
            fs::rename(&self.tmp, &dest).ctx(format!("storing blob {d}"))?;
            if let Some(dir) = dest.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(d)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Gone already once renamed into place.
        let _ = fs::remove_file(&self.tmp);
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A blob's first four bytes: the magic of its compression (zstd, gzip), if any.
pub fn magic(path: &Path) -> Result<[u8; 4]> {
    let mut head = [0u8; 4];
    let mut f = File::open(path).ctx(format!("reading {}", path.display()))?;
    let _ = io::Read::read(&mut f, &mut head)?;
    Ok(head)
}

impl Store {
    /// Store the file `src` as a blob, checked against the digest and size a manifest gives;
    /// returns its digest. A blob already stored under `expected` is not read again.
    pub fn put_blob_file(
        &self,
        src: &Path,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<Digest> {
        if let Some(d) = expected
            && self.blob_path(d).is_file()
        {
            return Ok(d.clone());
        }
        let mut f = File::open(src).ctx(format!("reading {}", src.display()))?;
        self.put_blob_reader(&mut f, src, expected, size)
    }

    /// Store what `src` (read from `what`, maybe through a decoder) reads as a blob, checked
    /// as `put_blob_file` checks it.
    pub fn put_blob_reader(
        &self,
        src: &mut dyn io::Read,
        what: &Path,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<Digest> {
        let mut w = BlobWriter::new(self)?;
        io::copy(src, &mut w).map_err(|e| match e.raw_os_error() {
            Some(_) => Error::from(e).context(format!("reading {}", what.display())),
            // A decoder's own words (a bad checksum, a stream cut short).
            None => Error::msg(format!("{}: {e}", what.display())),
        })?;
        w.finish(self, expected, size)
    }

    /// Store in-memory bytes (a config, a manifest) as a blob.
    pub fn put_blob(&self, d: &Digest, data: &[u8]) -> Result<()> {
        if !self.blob_path(d).exists() {
            let mut w = BlobWriter::new(self)?;
            w.write_all(data)?;
            w.finish(self, Some(d), None)?;
        }
        Ok(())
    }
}
