//! A transformers model folder (`config.json` + `model.safetensors`, or a sharded
//! `model.safetensors.index.json`) and checked tensor reads from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use icedit_flux::{FluxError, SafetensorsSet, Sharding, TensorFiles};

use crate::error::{Result, TextError};

const CONFIG: &str = "config.json";

/// Maps a transformers tensor name to its name in the file (`None`: not stored there).
pub(crate) type Rename = fn(&str) -> Option<String>;

/// The weights of one model folder (or one file), read by transformers' names with the shape
/// its config implies.
pub(crate) struct ModelWeights {
    /// What the folder should hold, for error messages ("CLIP text encoder").
    model: &'static str,
    files: TensorFiles,
    /// File of each tensor, from the shard index (empty for a single file).
    shard_of: HashMap<String, PathBuf>,
    /// For files in another naming (llama.cpp's, in GGUF).
    rename: Option<Rename>,
}

impl ModelWeights {
    /// Opens `dir`: returns the path of its `config.json` (checked to exist) and its weights.
    pub(crate) fn open(dir: &Path, model: &'static str) -> Result<(PathBuf, Self)> {
        if !dir.is_dir() {
            return Err(TextError::MissingFile {
                what: "model folder",
                path: dir.to_path_buf(),
                hint: format!("expected the {model} folder of a diffusers pipeline"),
            });
        }
        let config = dir.join(CONFIG);
        if !config.is_file() {
            return Err(TextError::MissingFile {
                what: "model config",
                path: config,
                hint: format!("the {model} folder needs its config.json"),
            });
        }

        let set =
            SafetensorsSet::open(dir, "model", Sharding::SingleFirst).map_err(|e| match e {
                FluxError::MissingWeights { what, path, hint } => {
                    TextError::MissingFile { what, path, hint }
                }
                e => e.into(),
            })?;
        let (paths, shard_of) = (set.files, set.shard_of);

        let files = TensorFiles::open(&paths)?;
        Ok((
            config,
            Self {
                model,
                files,
                shard_of,
                rename: None,
            },
        ))
    }

    /// One weights file (safetensors or GGUF) whose tensors are named as `rename` says.
    pub(crate) fn open_file(path: &Path, model: &'static str, rename: Rename) -> Result<Self> {
        Ok(Self {
            model,
            files: TensorFiles::open(&[path.to_path_buf()])?,
            shard_of: HashMap::new(),
            rename: Some(rename),
        })
    }

    pub(crate) fn files(&self) -> &TensorFiles {
        &self.files
    }

    fn stored_name(&self, name: &str) -> String {
        self.rename
            .and_then(|rename| rename(name))
            .unwrap_or_else(|| name.to_string())
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.files.contains(&self.stored_name(name))
    }

    /// Reads `name`, checking that it has `shape`, converted to `dtype` on `device` (whatever
    /// dtype it is stored in).
    pub(crate) fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let stored = self.checked(name, shape)?;
        Ok(self.files.read(&stored, None, dtype, device)?)
    }

    /// The tensor's blocks as stored, when the file holds it quantized (a GGUF T5); `None`
    /// when it is stored dense.
    pub(crate) fn quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<QTensor>> {
        let stored = self.checked(name, shape)?;
        Ok(self.files.read_quantized(&stored, None, device)?)
    }

    /// The tensor's name in the file, once it is found there with `shape`.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<String> {
        let stored = self.stored_name(name);
        let name = stored.as_str();
        let Some(found) = self.files.shape(name) else {
            // A shard index that lists the tensor points at the file that should have it.
            let files = match self.shard_of.get(name) {
                Some(file) => vec![file.clone()],
                None => self.files.paths().to_vec(),
            };
            return Err(TextError::MissingTensor {
                name: name.to_string(),
                model: self.model,
                files,
            });
        };
        if found != shape {
            let file = self
                .shard_of
                .get(name)
                .cloned()
                .unwrap_or_else(|| self.files.paths()[0].clone());
            return Err(TextError::TensorShape {
                name: name.to_string(),
                file,
                expected: shape.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(stored)
    }
}
