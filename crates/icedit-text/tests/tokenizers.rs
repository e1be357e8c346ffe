//! Token ids against transformers 5.23 (tests/reference/gen_fill_pipeline.py's tokens.json),
//! truncation reports, and a few extra prompts checked against transformers by hand.

use std::path::PathBuf;

use icedit_text::{PromptTokenizer, TokenizerKind};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    icedit_test_support::fixture("fill_pipeline")
}

#[derive(Deserialize)]
struct T5Ids {
    ids: Vec<u32>,
    untruncated_len: usize,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    clip_ids: Vec<u32>,
    clip_untruncated_len: usize,
    t5: std::collections::HashMap<String, T5Ids>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn clip() -> PromptTokenizer {
    PromptTokenizer::clip(&fixtures().join("tiny/tokenizer")).unwrap()
}

fn t5() -> PromptTokenizer {
    PromptTokenizer::t5(&fixtures().join("tiny/tokenizer_2")).unwrap()
}

#[test]
fn clip_ids_match_transformers() {
    let tokenizer = clip();
    assert_eq!(tokenizer.model_max_length(), 77);
    for case in cases() {
        let encoded = tokenizer.encode(&case.prompt, 77).unwrap();
        assert_eq!(encoded.ids, case.clip_ids, "prompt {:?}", case.prompt);
        assert_eq!(
            encoded.untruncated_len, case.clip_untruncated_len,
            "prompt {:?}",
            case.prompt
        );
        assert_eq!(encoded.truncated, case.clip_untruncated_len > 77);
        assert_eq!(encoded.tokenizer, TokenizerKind::Clip);
    }
}

#[test]
fn t5_ids_match_transformers() {
    let tokenizer = t5();
    assert_eq!(tokenizer.model_max_length(), 512);
    for case in cases() {
        for (max_length, expected) in &case.t5 {
            let max_length: usize = max_length.parse().unwrap();
            let encoded = tokenizer.encode(&case.prompt, max_length).unwrap();
            assert_eq!(
                encoded.ids, expected.ids,
                "prompt {:?}, max {max_length}",
                case.prompt
            );
            assert_eq!(encoded.untruncated_len, expected.untruncated_len);
            assert_eq!(encoded.truncated, expected.untruncated_len > max_length);
        }
    }
}

#[test]
fn truncation_is_reported_with_the_dropped_text() {
    let cases = cases();
    // The long prompt: 130 CLIP tokens, 337 T5 tokens.
    let long = cases.iter().find(|c| c.clip_untruncated_len > 77).unwrap();
    let encoded = clip().encode(&long.prompt, 77).unwrap();
    assert!(encoded.truncated);
    let dropped = encoded.dropped_text.as_deref().unwrap();
    assert!(
        !dropped.is_empty() && long.prompt.trim_end().ends_with(dropped),
        "{dropped:?}"
    );
    let warning = encoded.truncation_warning().unwrap();
    assert!(
        warning.starts_with("CLIP prompt truncated to 77 tokens (it takes 130)"),
        "{warning}"
    );

    let encoded = t5().encode(&long.prompt, 16).unwrap();
    assert!(encoded.truncated && encoded.untruncated_len == 337);
    assert!(encoded
        .truncation_warning()
        .unwrap()
        .starts_with("T5 prompt truncated to 16 tokens"));

    // Short prompts: nothing dropped, no warning.
    let short = clip().encode("make it night", 77).unwrap();
    assert!(
        !short.truncated && short.dropped_text.is_none() && short.truncation_warning().is_none()
    );
}

/// Prompts with tabs, newlines, special-token text, compatibility characters and combining
/// accents; ids from transformers 5.23 (`tokenizer(prompt).input_ids`) on the tiny tokenizers.
const EXTRA: &[(&str, &[u32], &[u32])] = &[
    (
        "a\tb  c\n\nd",
        &[769, 320, 321, 322, 323, 770],
        &[15, 67, 3, 33, 3, 26, 1],
    ),
    (
        "<|startoftext|>hi<|endoftext|> <|ENDOFTEXT|> <|StartOfText|>",
        &[
            769, 769, 71, 328, 770, 27, 347, 68, 77, 519, 69, 83, 599, 339, 91, 285, 769, 770,
        ],
        &[
            3, 89, 137, 5, 8, 9, 11, 8, 65, 8, 4, 38, 8, 137, 139, 19, 16, 89, 137, 4, 31, 65, 8,
            4, 38, 8, 137, 139, 3, 89, 137, 2, 96, 2, 109, 2, 154, 2, 154, 137, 139, 3, 89, 137,
            110, 8, 9, 11, 8, 109, 17, 154, 4, 38, 8, 137, 139, 1,
        ],
    ),
    (
        "</s> <pad> x</s>y",
        &[
            769, 27, 270, 338, 285, 283, 79, 64, 323, 285, 343, 27, 270, 338, 285, 344, 770,
        ],
        &[1, 0, 3, 38, 1, 3, 12, 1],
    ),
    (
        "\u{fb01} \u{2460} \u{ff28}ello",
        &[
            769, 171, 105, 479, 158, 239, 510, 171, 121, 230, 68, 75, 75, 334, 770,
        ],
        &[3, 2, 3, 2, 3, 2, 4, 66, 55, 1],
    ),
    (" lead", &[769, 75, 68, 64, 323, 770], &[76, 4, 62, 1]),
    (
        "trail ",
        &[769, 83, 81, 64, 72, 331, 770],
        &[3, 8, 11, 9, 16, 66, 1],
    ),
    (
        "e\u{301}t\u{e9} \u{c9}T\u{c9}",
        &[769, 127, 102, 83, 556, 127, 102, 83, 556, 770],
        &[3, 4, 2, 8, 28, 3, 2, 154, 2, 1],
    ),
    (
        "tab\t\tend",
        &[769, 83, 64, 321, 68, 77, 323, 770],
        &[3, 8, 9, 48, 3, 4, 31, 1],
    ),
    (
        "\u{c0}\u{c9}\u{ce} \u{1c5} \u{130} \u{df}",
        &[
            769, 127, 254, 127, 102, 127, 362, 131, 484, 328, 136, 485, 127, 509, 770,
        ],
        &[3, 2, 3, 2, 3, 2, 3, 135, 1],
    ),
];

#[test]
fn extra_prompts_match_transformers() {
    let (clip, t5) = (clip(), t5());
    for (prompt, clip_ids, t5_ids) in EXTRA {
        let encoded = clip.encode(prompt, 77).unwrap();
        assert_eq!(
            &encoded.ids[..clip_ids.len()],
            *clip_ids,
            "CLIP, prompt {prompt:?}"
        );
        assert_eq!(encoded.untruncated_len, clip_ids.len());
        let encoded = t5.encode(prompt, 512).unwrap();
        assert_eq!(
            &encoded.ids[..t5_ids.len()],
            *t5_ids,
            "T5, prompt {prompt:?}"
        );
        assert!(
            encoded.ids[t5_ids.len()..].iter().all(|&id| id == 0),
            "T5 pads with <pad>"
        );
    }
}

#[test]
fn clip_from_tokenizer_json_gives_the_same_ids() {
    // A tokenizer.json holding the same vocabulary and merges, with a deliberately different
    // pipeline: transformers only takes vocab and merges from it, and so must we.
    let source = fixtures().join("tiny/tokenizer");
    let dir = tempfile::tempdir().unwrap();
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> = std::fs::read_to_string(source.join("merges.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("#version"))
        .map(str::to_string)
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "unk_token": "<|endoftext|>"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let from_json = PromptTokenizer::clip(dir.path()).unwrap();
    let from_files = clip();
    for case in cases() {
        assert_eq!(
            from_json.encode(&case.prompt, 77).unwrap(),
            from_files.encode(&case.prompt, 77).unwrap()
        );
    }
}

#[test]
fn max_length_must_leave_room_for_text() {
    assert!(clip().encode("x", 2).is_err());
    assert!(t5().encode("x", 1).is_err());
    assert_eq!(t5().encode("make it night", 2).unwrap().ids, vec![3, 1]);
}
