//! Export a built image as an OCI image layout (one flattened layer), written with `oci-spec`'s
//! types. The layer is streamed: its tar is packed to a file, then read once, hashed (the
//! diff id) and gzipped into the layout's blob file while the compressed bytes are hashed (the
//! layer digest); no layer is ever held in memory.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use super::{BuildError, Builder, Image};
use crate::oci;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let path = what.into();
    move |source| BuildError::Read { path, source }
}

fn spec_err(e: impl std::fmt::Display) -> BuildError {
    BuildError::Base {
        image: "export".into(),
        message: e.to_string(),
    }
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    /// The inner writer, the `sha256:` digest and the size of what was written.
    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hash.finalize()));
        (self.inner, digest, self.size)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A blob file being written into `<out>/blobs/sha256/`, renamed to its digest when done.
struct BlobFile {
    tmp: PathBuf,
    out: PathBuf,
}

impl BlobFile {
    fn create(out: &Path) -> Result<(Self, File), BuildError> {
        let tmp = out
            .join("blobs/sha256")
            .join(format!(".tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(io_err(tmp.display().to_string()))?;
        Ok((
            BlobFile {
                tmp,
                out: out.to_path_buf(),
            },
            file,
        ))
    }

    fn commit(self, digest: &str) -> Result<(), BuildError> {
        let dst = self
            .out
            .join("blobs/sha256")
            .join(oci::digest_hex(digest).map_err(spec_err)?);
        fs::rename(&self.tmp, &dst).map_err(io_err(dst.display().to_string()))
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        // After a successful commit the file is gone already.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Gzip the uncompressed layer tar at `tar` into a blob of `out`: (diff id, digest, size).
fn write_layer(tar: &Path, out: &Path) -> Result<(String, String, u64), BuildError> {
    let mut src = File::open(tar).map_err(io_err("export tar"))?;
    let (blob, file) = BlobFile::create(out)?;
    let gz = flate2::write::GzEncoder::new(
        Hashing::new(io::BufWriter::new(file)),
        flate2::Compression::default(),
    );
    // The tar's own digest (the diff id) while it is compressed.
    let mut tee = Hashing::new(gz);
    io::copy(&mut src, &mut tee).map_err(io_err("compressing"))?;
    let (gz, diff_id, _) = tee.finish();
    let (buffered, digest, size) = gz.finish().map_err(io_err("compressing"))?.finish();
    buffered
        .into_inner()
        .map_err(|e| io_err("compressing")(e.into_error()))?
        .sync_all()
        .map_err(io_err("compressing"))?;
    blob.commit(&digest)?;
    Ok((diff_id, digest, size))
}

/// Write a JSON document as a blob of `out` and describe it.
fn write_json(
    out: &Path,
    media_type: MediaType,
    value: &impl serde::Serialize,
) -> Result<Descriptor, BuildError> {
    let bytes = serde_json::to_vec(value).map_err(spec_err)?;
    let (digest, size) = oci::write_blob(out, &bytes).map_err(spec_err)?;
    descriptor(media_type, &digest, size, None)
}

fn descriptor(
    media_type: MediaType,
    digest: &str,
    size: u64,
    annotations: Option<HashMap<String, String>>,
) -> Result<Descriptor, BuildError> {
    let mut d = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.parse::<Digest>().map_err(spec_err)?)
        .size(size)
        .build()
        .map_err(spec_err)?;
    d.set_annotations(annotations);
    Ok(d)
}

/// Export an image as an OCI layout at `out` with tag `tag` (one flattened layer); returns the
/// manifest's digest.
pub(crate) fn export(
    builder: &Builder,
    image: &Image,
    out: &Path,
    tag: &str,
) -> Result<String, BuildError> {
    let store = &builder.store;
    fs::create_dir_all(out.join("blobs/sha256")).map_err(io_err(out.display().to_string()))?;
    let tar_path = store.tmp_path("export.tar");
    let packed = match &image.snapshot {
        Some(s) => store
            .tools()
            .pack(&store.view(s), &store.tmp_path("view"), &tar_path)
            .map_err(BuildError::from),
        None => File::create(&tar_path)
            .and_then(|f| tar::Builder::new(f).into_inner().map(drop))
            .map_err(io_err("export tar")),
    };
    let layer = packed.and_then(|()| write_layer(&tar_path, out));
    let _ = fs::remove_file(&tar_path);
    let (diff_id, layer_digest, layer_size) = layer?;

    let (os, arch) = oci::host_platform();
    let config = ImageConfigurationBuilder::default()
        .architecture(arch)
        .os(os)
        .config(image.config.to_oci())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()
                .map_err(spec_err)?,
        )
        .history(vec![HistoryBuilder::default()
            .created_by("mistry")
            .build()
            .map_err(spec_err)?])
        .build()
        .map_err(spec_err)?;
    let config = write_json(out, MediaType::ImageConfig, &config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(vec![descriptor(
            MediaType::ImageLayerGzip,
            &layer_digest,
            layer_size,
            None,
        )?])
        .build()
        .map_err(spec_err)?;
    let manifest = write_json(out, MediaType::ImageManifest, &manifest)?;
    let manifest_digest = manifest.digest().to_string();
    let tagged = descriptor(
        MediaType::ImageManifest,
        &manifest_digest,
        manifest.size(),
        Some(HashMap::from([(
            "org.opencontainers.image.ref.name".to_string(),
            tag.to_string(),
        )])),
    )?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .manifests(vec![tagged])
        .build()
        .map_err(spec_err)?;
    let index_path = out.join("index.json");
    index
        .to_file(&index_path)
        .map_err(|e| spec_err(format!("{}: {e}", index_path.display())))?;
    OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec_err)?
        .to_file(out.join("oci-layout"))
        .map_err(spec_err)?;
    Ok(manifest_digest)
}
