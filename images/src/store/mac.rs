//! The store's step-key secret: `<root>/step-key`, 32 random bytes (mode 0600, made once), the
//! key of the HMAC that stands for a secret's value in a step key.
//!
//! A step that mounts a secret must rebuild when the secret changes, so its key depends on the
//! value; a plain hash of the value would let whoever reads the step records (or merely sees
//! which builds hit the cache) test guesses of it. A keyed digest tells nothing without this
//! file, which never leaves the store (stores do not share it: two stores give the same step
//! different keys).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use hmac::{KeyInit, Mac};

use super::{io_err, Store, StoreError};

/// The file name of the key under the store's root.
pub(super) const STEP_KEY: &str = "step-key";

const LEN: usize = 32;

/// The key, kept out of `Debug` output.
#[derive(Clone)]
pub(super) struct MacKey([u8; LEN]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// Read the key at `path`: a regular file of this user's (not a link), 32 bytes, readable by
/// nobody else.
fn read_key(path: &Path) -> io::Result<MacKey> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    let bad = |why: String| io::Error::other(format!("{}: {why}", path.display()));
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(bad(format!(
            "owned by uid {}, not by this process's user",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o}: others may read the key of the store's secret digests (it must be \
             0600; if others did read it, remove it: steps that use secrets then rebuild once)",
            meta.mode() & 0o7777
        )));
    }
    let mut key = [0u8; LEN];
    let mut rest = Vec::new();
    f.read_exact(&mut key)?;
    f.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes, not {LEN}", LEN + rest.len())));
    }
    Ok(MacKey(key))
}

/// Read the store's key, making it first when there is none: written whole under `tmp/`, then
/// linked into place (never over one another process made meanwhile: theirs wins).
fn load_or_create(store: &Store) -> Result<MacKey, StoreError> {
    let path = store.root.join(STEP_KEY);
    let what = || format!("the step key {}", path.display());
    match read_key(&path) {
        Ok(k) => return Ok(k),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(what())(e)),
    }
    let mut key = [0u8; LEN];
    getrandom::fill(&mut key).map_err(|e| StoreError::Backend(format!("{}: {e}", what())))?;
    let tmp = store.tmp_path("step-key");
    let made = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        match fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    made.map_err(io_err(format!("writing {}", what())))?;
    read_key(&path).map_err(io_err(what()))
}

impl Store {
    fn mac_key(&self) -> Result<&MacKey, StoreError> {
        if let Some(k) = self.mac_key.get() {
            return Ok(k);
        }
        let k = load_or_create(self)?;
        Ok(self.mac_key.get_or_init(|| k))
    }

    /// The keyed digest (HMAC-SHA256 with the store's [`STEP_KEY`]) of secret `id`'s `value`,
    /// in hex: what a step key holds of a secret.
    pub(crate) fn secret_digest(&self, id: &str, value: &[u8]) -> Result<String, StoreError> {
        let key = self.mac_key()?;
        let mut mac = hmac::Hmac::<sha2_11::Sha256>::new_from_slice(&key.0)
            .map_err(|e| StoreError::Backend(format!("the step key: {e}")))?;
        for part in [b"mistry secret v1".as_slice(), id.as_bytes(), value] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        Ok(hex::encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_made_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("tmp")).unwrap();
        let path = root.join(STEP_KEY);
        let a = read_key(&path);
        assert_eq!(a.unwrap_err().kind(), io::ErrorKind::NotFound);
        // What load_or_create does, without a whole store.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(&[7u8; LEN])
            .unwrap();
        assert_eq!(read_key(&path).unwrap().0, [7u8; LEN]);
        assert_eq!(format!("{:?}", read_key(&path).unwrap()), "MacKey(..)");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(e.contains("mode 640: others may read"), "{e}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(e.contains("33 bytes, not 32"), "{e}");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(read_key(&path).is_err());
    }
}
