//! The two prompt tokenizers, built the way transformers 5.23 builds them for diffusers.
//!
//! transformers does not run a folder's `tokenizer.json` as-is for these two classes:
//! `CLIPTokenizer` and `T5Tokenizer` take only the vocabulary (and merges, and T5's
//! SentencePiece charsmap) from the files and assemble their own normalizer, pre-tokenizer
//! and post-processor around it. Running T5's `tokenizer.json` directly gives other ids for
//! tabs, newlines, runs of spaces and NFKC-sensitive characters, so both are rebuilt here the
//! same way.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::{
    AddedToken, DecoderWrapper, Encoding, NormalizerWrapper, PaddingDirection,
    PostProcessorWrapper, PreTokenizerWrapper, Tokenizer, TruncationDirection,
};

use crate::error::{read_json, Result, TextError};

/// Which of FLUX's two tokenizers; named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    Clip,
    T5,
}

impl TokenizerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Clip => "CLIP",
            Self::T5 => "T5",
        }
    }
}

/// A prompt as the text encoder sees it: padded (or truncated) to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `max_length` ids, special tokens included, padded at the end.
    pub ids: Vec<u32>,
    pub max_length: usize,
    /// How many ids the prompt takes untruncated, special tokens included.
    pub untruncated_len: usize,
    pub truncated: bool,
    /// The end of the prompt that did not fit, as written in the prompt.
    pub dropped_text: Option<String>,
    pub tokenizer: TokenizerKind,
}

impl Encoded {
    /// The ids as a `[1, max_length]` u32 tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.ids.as_slice(), device)?.unsqueeze(0)?)
    }

    /// A line for the user when the prompt was cut, e.g.
    /// `CLIP prompt truncated to 77 tokens (it takes 130); dropped text: "..."`.
    pub fn truncation_warning(&self) -> Option<String> {
        if !self.truncated {
            return None;
        }
        let dropped = self
            .dropped_text
            .as_deref()
            .map(|text| format!("; dropped text: \"{text}\""))
            .unwrap_or_default();
        Some(format!(
            "{} prompt truncated to {} tokens (it takes {}){dropped}",
            self.tokenizer.name(),
            self.max_length,
            self.untruncated_len,
        ))
    }
}

/// A CLIP or T5 prompt tokenizer matching transformers' `CLIPTokenizer` / `T5Tokenizer`
/// (called with `padding="max_length", truncation=True`).
pub struct PromptTokenizer {
    kind: TokenizerKind,
    /// Without truncation or padding: [`PromptTokenizer::encode`] applies both itself.
    tokenizer: Tokenizer,
    pad_id: u32,
    pad_token: String,
    model_max_length: usize,
    /// Special tokens the post-processor adds to one sequence (2 for CLIP, 1 for T5).
    added_per_sequence: usize,
}

impl PromptTokenizer {
    /// Loads diffusers' `tokenizer/` folder: `vocab.json` + `merges.txt` (the FLUX repos'
    /// layout), or the vocabulary and merges of a `tokenizer.json` when there is one;
    /// special tokens and `model_max_length` from `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    pub fn clip(dir: &Path) -> Result<Self> {
        let settings = Settings::read(dir)?;
        let bos = settings.token("bos_token", "<|startoftext|>");
        let eos = settings.token("eos_token", "<|endoftext|>");
        let pad = settings.token("pad_token", "<|endoftext|>");
        let unk = settings.token("unk_token", "<|endoftext|>");

        let json_path = dir.join("tokenizer.json");
        let (vocab, merges, source) = if json_path.is_file() {
            let (vocab, merges) = bpe_from_tokenizer_json(&json_path)?;
            (vocab, merges, json_path)
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            for (path, what) in [
                (&vocab_path, "CLIP vocabulary"),
                (&merges_path, "CLIP merges"),
            ] {
                if !path.is_file() {
                    return Err(TextError::MissingFile {
                        what,
                        path: path.clone(),
                        hint: "the CLIP tokenizer folder needs vocab.json and merges.txt, or a tokenizer.json".into(),
                    });
                }
            }
            let (vocab, merges) = BPE::read_file(&path_str(&vocab_path), &path_str(&merges_path))
                .map_err(|e| TextError::Tokenizer {
                which: "CLIP",
                path: dir.to_path_buf(),
                message: format!("reading vocab.json and merges.txt: {e}"),
            })?;
            (vocab, merges, vocab_path)
        };
        let fail = |e: tokenizers::Error| tokenizer_error(TokenizerKind::Clip, &source, e);

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk.content.clone())
            .fuse_unk(false)
            .build()
            .map_err(fail)?;
        let mut tokenizer = Tokenizer::new(bpe);
        // transformers' CLIPTokenizer.__init__, component by component.
        tokenizer
            .with_normalizer(Some(component::<NormalizerWrapper>(
                json!({
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "NFC"},
                        {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                        {"type": "Lowercase"}
                    ]
                }),
                TokenizerKind::Clip,
                &source,
            )?))
            .map_err(fail)?;
        tokenizer.with_pre_tokenizer(Some(component::<PreTokenizerWrapper>(json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"},
                    "behavior": "Removed",
                    "invert": true
                },
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]
        }), TokenizerKind::Clip, &source)?));
        tokenizer.with_decoder(Some(component::<DecoderWrapper>(json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        }), TokenizerKind::Clip, &source)?));

        // transformers 5.23 ends up matching `<|startoftext|>` after normalization (as
        // special_tokens_map.json asks) but `<|endoftext|>` only verbatim;
        // `added_tokens_decoder` in tokenizer_config.json overrides both.
        let mut specials = vec![settings.added_token(&bos, bos.normalized)];
        for token in [&eos, &unk, &pad] {
            if specials.iter().all(|t| t.content != token.content) {
                specials.push(settings.added_token(token, false));
            }
        }
        tokenizer.add_special_tokens(specials).map_err(fail)?;

        let bos_id = token_id(&tokenizer, &bos.content, TokenizerKind::Clip, &source)?;
        let eos_id = token_id(&tokenizer, &eos.content, TokenizerKind::Clip, &source)?;
        let pad_id = token_id(&tokenizer, &pad.content, TokenizerKind::Clip, &source)?;
        tokenizer.with_post_processor(Some(component::<PostProcessorWrapper>(
            json!({
                "type": "RobertaProcessing",
                "sep": [eos.content, eos_id],
                "cls": [bos.content, bos_id],
                "trim_offsets": false,
                "add_prefix_space": false
            }),
            TokenizerKind::Clip,
            &source,
        )?));

        Ok(Self {
            kind: TokenizerKind::Clip,
            tokenizer,
            pad_id,
            pad_token: pad.content,
            // Absent, transformers would pad to 1e30; 77 is every CLIP's position limit.
            model_max_length: settings.model_max_length().unwrap_or(77),
            added_per_sequence: 2,
        })
    }

    /// Loads diffusers' `tokenizer_2/` folder: the Unigram vocabulary and SentencePiece
    /// charsmap of its `tokenizer.json`, special tokens from `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    pub fn t5(dir: &Path) -> Result<Self> {
        let settings = Settings::read(dir)?;
        let json_path = dir.join("tokenizer.json");
        if !json_path.is_file() {
            return Err(TextError::MissingFile {
                what: "T5 tokenizer",
                path: json_path,
                hint: "the T5 tokenizer folder needs tokenizer.json; a SentencePiece spiece.model alone is not supported".into(),
            });
        }
        let fail = |e: tokenizers::Error| tokenizer_error(TokenizerKind::T5, &json_path, e);
        let file: Value = read_json(&json_path)?;
        let model = &file["model"];
        if model["type"] != "Unigram" {
            return Err(TextError::Tokenizer {
                which: "T5",
                path: json_path.clone(),
                message: format!("expected a Unigram model, found {}", model["type"]),
            });
        }
        let vocab: Vec<(String, f64)> =
            serde_json::from_value(model["vocab"].clone()).map_err(|e| TextError::Tokenizer {
                which: "T5",
                path: json_path.clone(),
                message: format!("model.vocab is not a list of [piece, score]: {e}"),
            })?;
        // transformers' T5Tokenizer fixes the unknown token at id 2, without byte fallback.
        let unigram = Unigram::from(vocab, Some(2), false).map_err(fail)?;
        let mut tokenizer = Tokenizer::new(unigram);

        // Only a SentencePiece `Precompiled` normalizer is kept (T5 v1.1 has one), whatever
        // else the file's normalizer holds.
        if let Some(precompiled) = find_precompiled(&file["normalizer"]) {
            tokenizer
                .with_normalizer(Some(component::<NormalizerWrapper>(
                    precompiled.clone(),
                    TokenizerKind::T5,
                    &json_path,
                )?))
                .map_err(fail)?;
        }
        tokenizer.with_pre_tokenizer(Some(component::<PreTokenizerWrapper>(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}
            ]
        }), TokenizerKind::T5, &json_path)?));
        tokenizer.with_decoder(Some(component::<DecoderWrapper>(
            json!({
                "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true
            }),
            TokenizerKind::T5,
            &json_path,
        )?));

        let eos = settings.token("eos_token", "</s>");
        let pad = settings.token("pad_token", "<pad>");
        let unk = settings.token("unk_token", "<unk>");
        let mut specials: Vec<AddedToken> = settings.added_tokens_decoder();
        let mut extra: Vec<SpecialToken> = [eos.clone(), unk, pad.clone()].into();
        extra.extend(settings.additional_special_tokens());
        // Sentinels `<extra_id_N>` (T5Tokenizer's `extra_ids`, 100 unless configured).
        if !extra.iter().any(|t| t.content.starts_with("<extra_id_")) {
            let extra_ids = settings
                .get("extra_ids")
                .and_then(Value::as_u64)
                .unwrap_or(100);
            extra.extend((0..extra_ids).map(|i| SpecialToken::plain(format!("<extra_id_{i}>"))));
        }
        for token in extra {
            if specials.iter().all(|t| t.content != token.content) {
                specials.push(settings.added_token(&token, false));
            }
        }
        tokenizer.add_special_tokens(specials).map_err(fail)?;

        let eos_id = token_id(&tokenizer, &eos.content, TokenizerKind::T5, &json_path)?;
        let pad_id = token_id(&tokenizer, &pad.content, TokenizerKind::T5, &json_path)?;
        tokenizer.with_post_processor(Some(component::<PostProcessorWrapper>(json!({
            "type": "TemplateProcessing",
            "single": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": eos.content, "type_id": 0}}
            ],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": eos.content, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 0}},
                {"SpecialToken": {"id": eos.content, "type_id": 0}}
            ],
            "special_tokens": {
                eos.content.clone(): {"id": eos.content, "ids": [eos_id], "tokens": [eos.content]}
            }
        }), TokenizerKind::T5, &json_path)?));

        Ok(Self {
            kind: TokenizerKind::T5,
            tokenizer,
            pad_id,
            pad_token: pad.content,
            model_max_length: settings.model_max_length().unwrap_or(512),
            added_per_sequence: 1,
        })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// `model_max_length` from tokenizer_config.json (77 for CLIP, 512 for T5).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// The underlying `tokenizers` tokenizer (no padding or truncation set).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes `prompt` to exactly `max_length` ids: special tokens added, the text cut to
    /// fit (`truncation=True`), then padded with the pad token (`padding="max_length"`).
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<Encoded> {
        let which = self.kind.name();
        if max_length <= self.added_per_sequence {
            return Err(TextError::Input(format!(
                "{which} max_length must be more than {} (its special tokens), got {max_length}",
                self.added_per_sequence
            )));
        }
        let tokenize_error = |e: tokenizers::Error| TextError::Tokenize {
            which,
            message: e.to_string(),
        };
        let mut content: Encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(tokenize_error)?;
        let untruncated_len = content.len() + self.added_per_sequence;
        let keep = max_length - self.added_per_sequence;
        let truncated = content.len() > keep;
        let dropped_text = if truncated {
            let start = content.get_offsets()[keep].0;
            prompt.get(start..).map(|rest| rest.trim().to_string())
        } else {
            None
        };
        content.truncate(keep, 0, TruncationDirection::Right);
        let mut encoding = self
            .tokenizer
            .post_process(content, None, true)
            .map_err(tokenize_error)?;
        encoding.pad(
            max_length,
            self.pad_id,
            0,
            &self.pad_token,
            PaddingDirection::Right,
        );
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            max_length,
            untruncated_len,
            truncated,
            dropped_text,
            tokenizer: self.kind,
        })
    }
}

/// One of the named special tokens, as tokenizer_config.json or special_tokens_map.json give
/// it (a string, or an object with `content` and flags).
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    /// The file's `normalized` flag (false when given as a plain string).
    normalized: bool,
}

impl SpecialToken {
    fn plain(content: String) -> Self {
        Self {
            content,
            normalized: false,
        }
    }

    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self::plain(s.clone())),
            Value::Object(o) => Some(Self {
                content: o.get("content")?.as_str()?.to_string(),
                normalized: o
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            _ => None,
        }
    }
}

/// `tokenizer_config.json` and `special_tokens_map.json` of a tokenizer folder (either may be
/// missing).
struct Settings {
    config: Value,
    special_tokens_map: Value,
}

impl Settings {
    fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TextError::MissingFile {
                what: "tokenizer folder",
                path: dir.to_path_buf(),
                hint: "expected the tokenizer folder of a diffusers pipeline".into(),
            });
        }
        let optional = |name: &str| -> Result<Value> {
            let path = dir.join(name);
            if path.is_file() {
                read_json(&path)
            } else {
                Ok(Value::Null)
            }
        };
        Ok(Self {
            config: optional("tokenizer_config.json")?,
            special_tokens_map: optional("special_tokens_map.json")?,
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.config.get(key).filter(|v| !v.is_null())
    }

    /// The special token `key` (special_tokens_map.json first, as transformers reads it).
    fn token(&self, key: &str, default: &str) -> SpecialToken {
        self.special_tokens_map
            .get(key)
            .and_then(SpecialToken::from_value)
            .or_else(|| self.get(key).and_then(SpecialToken::from_value))
            .unwrap_or_else(|| SpecialToken::plain(default.to_string()))
    }

    fn additional_special_tokens(&self) -> Vec<SpecialToken> {
        let list = self
            .special_tokens_map
            .get("additional_special_tokens")
            .or_else(|| self.get("additional_special_tokens"))
            .and_then(Value::as_array);
        list.map(|l| l.iter().filter_map(SpecialToken::from_value).collect())
            .unwrap_or_default()
    }

    fn model_max_length(&self) -> Option<usize> {
        self.get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|n| (1.0..1e9).contains(n))
            .map(|n| n as usize)
    }

    /// `added_tokens_decoder` of tokenizer_config.json, in id order, with its flags.
    fn added_tokens_decoder(&self) -> Vec<AddedToken> {
        let Some(map) = self.get("added_tokens_decoder").and_then(Value::as_object) else {
            return Vec::new();
        };
        let mut entries: Vec<(u64, &Value)> = map
            .iter()
            .filter_map(|(id, v)| Some((id.parse().ok()?, v)))
            .collect();
        entries.sort_by_key(|(id, _)| *id);
        entries
            .into_iter()
            .filter_map(|(_, v)| {
                let flag =
                    |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
                let content = v.get("content")?.as_str()?;
                let special = flag("special", true);
                Some(
                    AddedToken::from(content, special)
                        .single_word(flag("single_word", false))
                        .lstrip(flag("lstrip", false))
                        .rstrip(flag("rstrip", false))
                        .normalized(flag("normalized", !special)),
                )
            })
            .collect()
    }

    /// `token` as a special added token: with its `added_tokens_decoder` flags when listed
    /// there, else with `normalized`.
    fn added_token(&self, token: &SpecialToken, normalized: bool) -> AddedToken {
        self.added_tokens_decoder()
            .into_iter()
            .find(|t| t.content == token.content)
            .unwrap_or_else(|| AddedToken::from(token.content.clone(), true).normalized(normalized))
    }
}

/// BPE vocabulary and merges from a tokenizer.json (merges as `"a b"` or `["a", "b"]`).
fn bpe_from_tokenizer_json(path: &Path) -> Result<(Vocab, Merges)> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Merge {
        Joined(String),
        Pair(String, String),
    }
    #[derive(Deserialize)]
    struct Model {
        vocab: Vocab,
        #[serde(default)]
        merges: Vec<Merge>,
    }
    #[derive(Deserialize)]
    struct File {
        model: Model,
    }
    let bad = |message: String| TextError::Tokenizer {
        which: "CLIP",
        path: path.to_path_buf(),
        message,
    };
    let file: File = serde_json::from_value(read_json::<Value>(path)?)
        .map_err(|e| bad(format!("expected a BPE model with vocab and merges: {e}")))?;
    let merges = file
        .model
        .merges
        .into_iter()
        .enumerate()
        .map(|(i, merge)| match merge {
            Merge::Pair(a, b) => Ok((a, b)),
            Merge::Joined(s) => match s.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(bad(format!("merge {} (`{s}`) is not two tokens", i + 1))),
            },
        })
        .collect::<Result<Merges>>()?;
    Ok((file.model.vocab, merges))
}

/// The `Precompiled` normalizer in a tokenizer.json normalizer (alone or in a sequence).
fn find_precompiled(normalizer: &Value) -> Option<&Value> {
    match normalizer["type"].as_str()? {
        "Precompiled" => Some(normalizer),
        "Sequence" => normalizer["normalizers"]
            .as_array()?
            .iter()
            .find(|n| n["type"] == "Precompiled"),
        _ => None,
    }
}

/// A tokenizers component from its JSON form (only the one taken from the file can fail).
fn component<T: serde::de::DeserializeOwned>(
    value: Value,
    kind: TokenizerKind,
    path: &Path,
) -> Result<T> {
    serde_json::from_value(value).map_err(|e| TextError::Tokenizer {
        which: kind.name(),
        path: path.to_path_buf(),
        message: format!("invalid tokenizer component: {e}"),
    })
}

fn token_id(tokenizer: &Tokenizer, token: &str, kind: TokenizerKind, path: &Path) -> Result<u32> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| TextError::Tokenizer {
            which: kind.name(),
            path: path.to_path_buf(),
            message: format!("the vocabulary has no `{token}` token"),
        })
}

fn tokenizer_error(kind: TokenizerKind, path: &Path, error: tokenizers::Error) -> TextError {
    TextError::Tokenizer {
        which: kind.name(),
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
