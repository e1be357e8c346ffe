//! Reading the small text files models come with (configs, indexes) with a size bound, so that
//! a hostile or broken model folder (a config linked to /dev/zero, a pipe, a huge file) fails
//! with a clear error instead of blocking or exhausting memory.

use std::io::Read;
use std::path::Path;

/// Configs, shard indexes and scheduler files are kilobytes; a tokenizer.json a few megabytes.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Reads a UTF-8 text file of at most `max_bytes`; a pipe, device or folder is refused
/// without being opened for reading.
pub fn read_text_file(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a pipe, device or folder is not read)",
        ));
    }
    let too_big = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("larger than the {max_bytes} bytes such a file can have"),
        )
    };
    if meta.len() > max_bytes {
        return Err(too_big());
    }
    let mut text = String::new();
    // The file may grow after the check: read at most one byte past the bound.
    std::fs::File::open(path)?
        .take(max_bytes + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max_bytes {
        return Err(too_big());
    }
    Ok(text)
}

/// Largest layer width a config may state: the largest models icedit runs are 4096 wide
/// (T5-XXL's feed-forward 10240); a config far beyond that is broken or hostile, and would
/// allocate gigabytes before any weight is checked.
pub const MAX_CONFIG_WIDTH: usize = 1 << 16;
/// Most layers (blocks) a config may state.
pub const MAX_CONFIG_LAYERS: usize = 1024;
/// Largest vocabulary a config may state.
pub const MAX_CONFIG_VOCAB: usize = 1 << 21;

/// Checks a config's sizes against their bounds: `(field, value, max)`. Zero is refused too.
pub fn check_config_sizes(fields: &[(&str, usize, usize)]) -> Result<(), String> {
    match fields.iter().find(|(_, v, max)| *v == 0 || v > max) {
        Some((name, value, max)) => Err(format!(
            "{name} is {value}; it must be between 1 and {max} (is this config.json broken?)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("config.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(read_text_file(&small, 10).unwrap(), "{}");
        let err = read_text_file(&small, 1).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        let err = read_text_file(dir.path(), 10).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        #[cfg(unix)]
        {
            let err = read_text_file(Path::new("/dev/zero"), 10).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }
}
