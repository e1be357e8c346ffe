//! Recursive file listings with repo-style relative paths (`dir/file`, always `/`).

use std::io;
use std::path::Path;

/// Deep enough for any model layout, shallow enough to stop a symlink loop.
const MAX_DEPTH: usize = 32;

/// The files under `root`, relative, with `/` separators, sorted.
///
/// Symlinks are followed (cache snapshots are made of them). Hidden folders such as
/// `.git` or the `.cache` that `huggingface-cli download --local-dir` leaves are skipped.
pub(crate) fn list_files(root: &Path) -> io::Result<Vec<String>> {
    let mut files = Vec::new();
    collect(root, "", 0, &mut files)?;
    files.sort();
    Ok(files)
}

fn collect(dir: &Path, prefix: &str, depth: usize, files: &mut Vec<String>) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue; // not representable as a repo path
        };
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        // `metadata` follows symlinks; a dangling one is neither file nor folder.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            if !name.starts_with('.') {
                collect(&path, &format!("{relative}/"), depth + 1, files)?;
            }
        } else if metadata.is_file() {
            files.push(relative);
        }
    }
    Ok(())
}
