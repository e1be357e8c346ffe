//! Where a command writes, checked before any work: every output against every input (by path
//! and by file identity, so links are caught), against the other outputs, inside the model
//! folders and the Hub cache, and its folder existing and writable. Nothing is downloaded or
//! loaded before this passes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What a command reads: files it must never overwrite and folders it never writes into.
#[derive(Default)]
pub struct Inputs {
    files: Vec<(String, PathBuf)>,
    folders: Vec<(String, PathBuf)>,
}

impl Inputs {
    /// A file read by the command (image, mask, latents, adapter, manifest).
    pub fn file(&mut self, what: &str, path: &Path) {
        self.files.push((what.to_string(), path.to_path_buf()));
    }

    /// A folder read by the command (a local model, the Hub cache): no output goes inside.
    pub fn folder(&mut self, what: &str, path: &Path) {
        self.folders.push((what.to_string(), path.to_path_buf()));
    }
}

/// Every file a command may write.
#[derive(Default)]
pub struct Outputs {
    files: Vec<(String, PathBuf)>,
    /// Folders the command creates files in, with a test for the names it writes there.
    folders: Vec<(String, PathBuf, fn(&str) -> bool)>,
}

impl Outputs {
    pub fn file(&mut self, what: &str, path: &Path) {
        self.files.push((what.to_string(), path.to_path_buf()));
    }

    /// A folder (created when missing) that receives files whose names `writes` accepts.
    pub fn folder(&mut self, what: &str, path: &Path, writes: fn(&str) -> bool) {
        self.folders
            .push((what.to_string(), path.to_path_buf(), writes));
    }

    /// Refuses, with the reason and the fix, any output that would replace an input or another
    /// output, land in a model folder or the cache, or cannot be written.
    pub fn check(&self, inputs: &Inputs) -> Result<()> {
        let input_files: Vec<(&str, PathBuf, Option<FileId>)> = inputs
            .files
            .iter()
            .map(|(what, path)| {
                let canonical = path.canonicalize().unwrap_or_else(|_| absolute(path));
                (what.as_str(), canonical, FileId::of(path))
            })
            .collect();
        let input_folders: Vec<(&str, PathBuf)> = inputs
            .folders
            .iter()
            .filter_map(|(what, path)| Some((what.as_str(), path.canonicalize().ok()?)))
            .collect();
        let overwrites_input = |target: &Path, id: Option<FileId>| {
            input_files.iter().find(|(_, canonical, input_id)| {
                canonical == target || (id.is_some() && id == *input_id)
            })
        };

        let mut targets: HashMap<PathBuf, &str> = HashMap::new();
        for (what, path) in &self.files {
            let target = writable_target(what, path)?;
            let id = FileId::of(path);
            if let Some((input, _, _)) = overwrites_input(&target, id) {
                bail!(
                    "{what} {} is the {input} (the same file{}); icedit never overwrites its \
                     inputs: choose another name",
                    path.display(),
                    if id.is_some() {
                        ", or a link to it"
                    } else {
                        ""
                    }
                );
            }
            if let Some((folder_what, _)) =
                input_folders.iter().find(|(_, f)| target.starts_with(f))
            {
                bail!(
                    "{what} {} is inside the {folder_what}; icedit never writes there: choose \
                     another folder",
                    path.display()
                );
            }
            if let Some(other) = targets.insert(target, what) {
                bail!(
                    "{what} and {other} would both be written to {}; choose names that differ",
                    path.display()
                );
            }
        }
        for (what, dir, writes) in &self.folders {
            let dir = check_output_folder(what, dir)?;
            if let Some((folder_what, _)) = input_folders.iter().find(|(_, f)| dir.starts_with(f)) {
                bail!(
                    "{what} {} is inside the {folder_what}; icedit never writes there: choose \
                     another folder",
                    dir.display()
                );
            }
            let clashes = |target: &Path| {
                target.parent() == Some(dir.as_path())
                    && target
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(writes)
            };
            if let Some((input, path, _)) = input_files.iter().find(|(_, p, _)| clashes(p)) {
                bail!(
                    "{what} {} would overwrite the {input} {}: choose another folder",
                    dir.display(),
                    path.display()
                );
            }
            if let Some((target, other)) = targets.iter().find(|(t, _)| clashes(t)) {
                bail!(
                    "{what} {} would overwrite the {other} {}: choose another folder",
                    dir.display(),
                    target.display()
                );
            }
            // Files already there under names icedit writes may be links to an input.
            let existing = match std::fs::read_dir(&dir) {
                Ok(entries) => entries.flatten().collect(),
                Err(_) => Vec::new(), // created later: nothing in it yet
            };
            for entry in existing {
                let name = entry.file_name();
                if !name.to_str().is_some_and(writes) {
                    continue;
                }
                let id = FileId::of(&entry.path());
                if let Some((input, _, _)) = overwrites_input(&entry.path(), id) {
                    bail!(
                        "{what}: {} is the {input} (a link to it); icedit never overwrites its \
                         inputs: choose another folder",
                        entry.path().display()
                    );
                }
            }
        }
        Ok(())
    }
}

/// The file an output path will land on: the canonical path of an existing file (links
/// followed), else the canonical folder joined with the name. Checks that the folder exists
/// and takes files, and that an existing file may be replaced.
fn writable_target(what: &str, path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{what} {} names no file", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let canonical_dir = match dir.canonicalize() {
        Ok(d) if d.is_dir() => d,
        Ok(_) => bail!(
            "{what} {}: {} is a file, not a folder",
            path.display(),
            dir.display()
        ),
        Err(_) => bail!(
            "{what} {}: the folder {} does not exist; create it first",
            path.display(),
            dir.display()
        ),
    };
    check_writable_dir(what, &canonical_dir)?;
    let existing = std::fs::metadata(path);
    if let Ok(meta) = &existing {
        if !meta.is_file() {
            bail!(
                "{what} {} exists and is not a regular file; choose another name",
                path.display()
            );
        }
        if meta.permissions().readonly() {
            bail!(
                "{what} {} exists and is read-only; icedit does not replace it: remove it or \
                 choose another name",
                path.display()
            );
        }
    }
    Ok(match existing {
        Ok(_) => path.canonicalize()?,
        Err(_) => canonical_dir.join(name),
    })
}

/// A folder that will receive files: an existing folder, or a path whose nearest existing
/// ancestor is a folder icedit can create it in. Returns where it is (or will be), canonical.
fn check_output_folder(what: &str, dir: &Path) -> Result<PathBuf> {
    let mut nearest = dir;
    let mut missing = Vec::new();
    let found = loop {
        match std::fs::metadata(nearest) {
            Ok(meta) if meta.is_dir() => break nearest,
            Ok(_) => bail!(
                "{what} {}: {} is a file, not a folder; choose another path",
                dir.display(),
                nearest.display()
            ),
            Err(_) => {
                missing.extend(nearest.file_name());
                match nearest.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => nearest = parent,
                    _ => break Path::new("."),
                }
            }
        }
    };
    check_writable_dir(what, found)?;
    let mut canonical = found.canonicalize()?;
    canonical.extend(missing.iter().rev());
    Ok(canonical)
}

/// Creates (and at once drops) a nameless file, which is what writing there needs.
fn check_writable_dir(what: &str, dir: &Path) -> Result<()> {
    tempfile::tempfile_in(dir)
        .map(drop)
        .with_context(|| format!("{what}: cannot write in the folder {}", dir.display()))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A file's identity: the same for every name and link of one file.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Self(m.dev(), m.ino()))
    }

    /// Elsewhere canonical paths (which follow links) are the identity.
    #[cfg(not(unix))]
    fn of(_path: &Path) -> Option<Self> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs_of(files: &[&Path]) -> Inputs {
        let mut inputs = Inputs::default();
        for f in files {
            inputs.file("image", f);
        }
        inputs
    }

    #[test]
    fn outputs_never_replace_inputs_by_name_or_link() {
        let dir = tempfile::tempdir().unwrap();
        let photo = dir.path().join("photo-diptych.png");
        std::fs::write(&photo, b"photo").unwrap();
        let inputs = inputs_of(&[&photo]);
        let mut outputs = Outputs::default();
        outputs.file("--out", &dir.path().join("photo.png"));
        outputs.file("--save-diptych", &dir.path().join("photo-diptych.png"));
        let err = outputs.check(&inputs).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");

        // A hard link and a symbolic link to the photo under other names.
        let hard = dir.path().join("hard.png");
        std::fs::hard_link(&photo, &hard).unwrap();
        let mut outputs = Outputs::default();
        outputs.file("--out", &hard);
        assert!(outputs.check(&inputs).is_err());
        #[cfg(unix)]
        {
            let soft = dir.path().join("soft.png");
            std::os::unix::fs::symlink(&photo, &soft).unwrap();
            let mut outputs = Outputs::default();
            outputs.file("--out", &soft);
            assert!(outputs.check(&inputs).is_err());
        }
        // Another spelling of the same path.
        let mut outputs = Outputs::default();
        outputs.file("--out", &dir.path().join(".").join("photo-diptych.png"));
        assert!(outputs.check(&inputs).is_err());
        assert_eq!(std::fs::read(&photo).unwrap(), b"photo");
    }

    #[test]
    fn output_locations_are_checked_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let none = Inputs::default();
        let check = |path: PathBuf| {
            let mut outputs = Outputs::default();
            outputs.file("--out", &path);
            outputs.check(&none).map_err(|e| e.to_string())
        };
        let err = check(dir.path().join("missing/out.png")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = check(file.join("out.png")).unwrap_err();
        assert!(err.contains("not a folder"), "{err}");
        let err = check(dir.path().to_path_buf()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let read_only = dir.path().join("ro.png");
        std::fs::write(&read_only, b"keep").unwrap();
        let mut perms = std::fs::metadata(&read_only).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&read_only, perms).unwrap();
        let err = check(read_only).unwrap_err();
        assert!(err.contains("read-only"), "{err}");
        assert!(check(dir.path().join("fine.png")).is_ok());

        // Two outputs on one file.
        let mut outputs = Outputs::default();
        outputs.file("--out", &dir.path().join("a.png"));
        outputs.file("--save-diptych", &dir.path().join("a.png"));
        let err = outputs.check(&none).unwrap_err().to_string();
        assert!(err.contains("both be written"), "{err}");
    }

    #[test]
    fn output_folders_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let is_png = |n: &str| n.ends_with(".png");
        let check = |folder: PathBuf, inputs: &Inputs| {
            let mut outputs = Outputs::default();
            outputs.folder("--save-candidates", &folder, is_png);
            outputs.check(inputs).map_err(|e| e.to_string())
        };
        let none = Inputs::default();
        assert!(check(file.clone(), &none)
            .unwrap_err()
            .contains("is a file"));
        assert!(check(file.join("sub"), &none)
            .unwrap_err()
            .contains("is a file"));
        assert!(check(dir.path().join("new/deeper"), &none).is_ok());
        // An input in the folder under a name icedit writes there.
        let photo = dir.path().join("winner.png");
        std::fs::write(&photo, b"p").unwrap();
        let err = check(dir.path().to_path_buf(), &inputs_of(&[&photo])).unwrap_err();
        assert!(err.contains("would overwrite"), "{err}");
        // A model folder or the cache never receives outputs.
        let mut inputs = Inputs::default();
        inputs.folder("model folder", dir.path());
        let err = check(dir.path().join("sub"), &inputs).unwrap_err();
        assert!(err.contains("inside the model folder"), "{err}");
        let mut outputs = Outputs::default();
        outputs.file("--out", &dir.path().join("x.png"));
        assert!(outputs.check(&inputs).is_err());
    }
}
