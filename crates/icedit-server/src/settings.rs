//! What every way of asking for an edit names besides its images, instruction and size: the job
//! API's JSON, OpenAI's form, a line of a batch file. Each reads it into [`RequestSettings`],
//! and [`RequestSettings::check`] decides for all of them what fits together.

use icedit_pipeline::edit::JobOptions;
use icedit_pipeline::search::MAX_CANDIDATES;
use image::{GrayImage, RgbImage};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::engine::{EditRequest, SearchRequest, MAX_SEEDS};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSettings {
    /// That many images (a search: candidates), from `seed` on: `seed`, `seed + 1`, ...
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// The seeds listed, instead of `seed` and `n`.
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Kontext's true CFG, with `true_cfg_scale`.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub true_cfg_scale: Option<f32>,
    /// A best-of-N search over the seeds (the judge picks one).
    #[serde(default)]
    pub search: Option<SearchRequest>,
    /// The adapters to use, by name, among those loaded (default: all).
    #[serde(default)]
    pub adapters: Option<Vec<String>>,
}

/// A request that cannot be read or whose settings do not fit together, and the field to name
/// in an answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SettingsError {
    pub message: String,
    pub param: Option<&'static str>,
}

/// [`RequestSettings`] checked: the seeds decided, true CFG whole.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedSettings {
    pub seeds: Vec<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub negative: Option<(String, f32)>,
    pub search: Option<SearchRequest>,
    pub adapters: Option<Vec<String>>,
}

/// Reads a JSON object made of an entry point's own fields (`Own`: a batch line's paths, the job
/// API's base64 images) and the shared settings. Each part is read on its own, so an error names
/// its field (`search.selection: unknown variant ...`), which serde's `flatten` would lose; a
/// field neither knows is refused, with the names both know.
pub fn read_with_settings<Own: DeserializeOwned>(
    object: Map<String, Value>,
) -> Result<(Own, RequestSettings), SettingsError> {
    let (own_names, settings_names) = (field_names::<Own>(), field_names::<RequestSettings>());
    if let Some(name) = object
        .keys()
        .find(|k| !own_names.contains(&k.as_str()) && !settings_names.contains(&k.as_str()))
    {
        let mut known: Vec<&str> = own_names.iter().chain(settings_names).copied().collect();
        known.sort_unstable();
        return Err(SettingsError {
            message: format!(
                "unknown field `{name}`; the fields are {}",
                known.join(", ")
            ),
            param: None,
        });
    }
    let (settings, own): (Map<_, _>, Map<_, _>) = object
        .into_iter()
        .partition(|(k, _)| settings_names.contains(&k.as_str()));
    Ok((read_part(own)?, read_part(settings)?))
}

fn read_part<T: DeserializeOwned>(part: Map<String, Value>) -> Result<T, SettingsError> {
    serde_path_to_error::deserialize(Value::Object(part)).map_err(|e| SettingsError {
        message: e.to_string(),
        param: None,
    })
}

/// The field names (aliases included) a struct's derived `Deserialize` asks for: serde hands
/// them to `deserialize_struct`, which is all this deserializer answers.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    use serde::forward_to_deserialize_any;

    struct Names<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Names<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("only the names were wanted"))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Names(&mut names));
    names
}

impl RequestSettings {
    /// Decides the seeds (`first_seed` gives the first when none is named) and checks the fields
    /// against each other. What the model thinks of them is [`EditRequest::prepare`]'s to say.
    pub fn check(self, first_seed: impl FnOnce() -> u64) -> Result<CheckedSettings, SettingsError> {
        let bad = |message: String, param| {
            Err(SettingsError {
                message,
                param: Some(param),
            })
        };
        let seeds = match (self.seeds, self.seed, self.n) {
            (Some(_), Some(_), _) => return bad("give seed or seeds, not both".into(), "seeds"),
            (Some(_), None, Some(_)) => {
                return bad(
                    "give n or seeds, not both (seeds makes one image each)".into(),
                    "n",
                )
            }
            (Some(seeds), None, None) => seeds,
            (None, seed, n) => {
                let n = n.unwrap_or(1);
                let most = if self.search.is_some() {
                    MAX_CANDIDATES
                } else {
                    MAX_SEEDS
                };
                if n == 0 || n > most {
                    return bad(format!("n must be 1 to {most}"), "n");
                }
                let first = seed.unwrap_or_else(first_seed);
                (0..n as u64).map(|i| first.wrapping_add(i)).collect()
            }
        };
        let negative = match (self.negative_prompt, self.true_cfg_scale) {
            (Some(text), Some(scale)) => Some((text, scale)),
            (None, None) => None,
            _ => {
                return bad(
                    "true CFG takes both negative_prompt and true_cfg_scale".into(),
                    "true_cfg_scale",
                )
            }
        };
        Ok(CheckedSettings {
            seeds,
            steps: self.steps,
            guidance: self.guidance,
            negative,
            search: self.search,
            adapters: self.adapters,
        })
    }
}

impl CheckedSettings {
    pub fn into_request(
        self,
        photo: RgbImage,
        mask: Option<GrayImage>,
        instruction: String,
        options: JobOptions,
    ) -> EditRequest {
        EditRequest {
            photo,
            mask,
            instruction,
            seeds: self.seeds,
            steps: self.steps,
            guidance: self.guidance,
            options,
            negative: self.negative,
            search: self.search,
            adapters: self.adapters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch line's shape: its own fields, an alias among them.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        #[serde(alias = "prompt")]
        instruction: String,
    }

    fn read(json: &str) -> Result<(Own, CheckedSettings), String> {
        let object = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let (own, settings) = read_with_settings::<Own>(object).map_err(|e| e.message)?;
        Ok((own, settings.check(|| 40).map_err(|e| e.message)?))
    }

    #[test]
    fn fields_are_read_into_their_part() {
        let (own, checked) = read(
            r#"{"instruction": "y", "seed": 7, "n": 3, "steps": 4, "guidance": 3,
                "negative_prompt": "blur", "true_cfg_scale": 2.5, "adapters": ["a"],
                "search": {"early_steps": 2}}"#,
        )
        .unwrap();
        assert_eq!(own.instruction, "y");
        assert_eq!(checked.seeds, [7, 8, 9]);
        assert_eq!(checked.steps, Some(4));
        assert_eq!(checked.guidance, Some(3.0));
        assert_eq!(checked.negative, Some(("blur".into(), 2.5)));
        assert_eq!(checked.adapters, Some(vec!["a".into()]));
        assert_eq!(checked.search.unwrap().early_steps, 2);
        assert_eq!(
            read(r#"{"prompt": "y", "n": 2}"#).unwrap().1.seeds,
            [40, 41]
        );
        assert_eq!(
            read(r#"{"instruction": "y", "seeds": [5, 1]}"#)
                .unwrap()
                .1
                .seeds,
            [5, 1]
        );
    }

    #[test]
    fn what_does_not_fit_is_refused_with_its_field() {
        for (json, expected) in [
            (r#""seed": 1, "seeds": [2]"#, "not both"),
            (r#""n": 2, "seeds": [2]"#, "not both"),
            (r#""n": 0"#, "n must be 1 to"),
            (r#""n": 11"#, "n must be 1 to 10"),
            (r#""negative_prompt": "blur""#, "both negative_prompt"),
            (
                r#""strength": 0.5"#,
                "unknown field `strength`; the fields are",
            ),
            (
                r#""search": {"early_step": 2}"#,
                "search.early_step: unknown field `early_step`, expected",
            ),
            (
                r#""search": {"early_steps": 2, "selection": "best"}"#,
                "search.selection: unknown variant `best`",
            ),
            (r#""steps": "four""#, "steps: invalid type"),
        ] {
            let error = read(&format!(r#"{{"instruction": "y", {json}}}"#)).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
        let error = read(r#"{"seed": 1}"#).unwrap_err();
        assert!(error.contains("missing field `instruction`"), "{error}");
        assert!(read(r#"{"prompt": "y", "n": 64, "search": {"early_steps": 2}}"#).is_ok());
    }

    #[test]
    fn field_names_come_from_serde() {
        assert!(field_names::<Own>().contains(&"prompt"));
        assert!(field_names::<RequestSettings>().contains(&"true_cfg_scale"));
    }
}
