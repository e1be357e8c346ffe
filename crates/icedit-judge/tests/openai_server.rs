//! The OpenAI-compatible judge against a chat-completions server started by the test on
//! 127.0.0.1: what it sends (three PNG images in order, the instruction, the model, the key),
//! scripted answers, malformed answers, HTTP errors, timeouts, and the fallback chain.

use std::time::Duration;

use base64::Engine;
use icedit_judge::fake_server::{serve as server, Reply};
use icedit_judge::{
    build_judges, parse_judges, ClipScoring, Comparison, Judge, JudgeChain, JudgeSettings,
    OpenAiJudge, OpenAiOptions, Preference,
};
use image::RgbImage;

fn images() -> [RgbImage; 3] {
    [1u8, 2, 3].map(|k| RgbImage::from_fn(8, 6, |x, y| image::Rgb([k * 40, x as u8, y as u8])))
}

fn judge(url: &str, attempts: usize) -> OpenAiJudge {
    OpenAiJudge::new(OpenAiOptions {
        url: url.into(),
        model: Some("qwen2.5-vl-7b".into()),
        api_key: Some("sk-local".into()),
        timeout: Duration::from_millis(500),
        attempts,
        backoff: Duration::from_millis(10),
    })
}

fn compare(judge: &mut dyn Judge) -> icedit_judge::Result<icedit_judge::Verdict> {
    let [a, b, original] = images();
    judge.compare(&Comparison {
        instruction: "make it night",
        first: &a,
        second: &b,
        original: &original,
    })
}

#[test]
fn sends_three_images_in_order_with_the_instruction_model_and_key() {
    let (url, received) = server(vec![Reply::Answer("Image 2")]);
    let verdict = compare(&mut judge(&url, 3)).unwrap();
    assert_eq!(verdict.preference, Preference::Second);
    assert_eq!(verdict.answer, "Image 2");
    assert!(verdict.warnings.is_empty());

    let received = received.lock().unwrap();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.authorization.as_deref(), Some("Bearer sk-local"));
    assert_eq!(r.body["model"], "qwen2.5-vl-7b");
    let content = r.body["messages"][0]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    let prompt = content[0]["text"].as_str().unwrap();
    assert!(prompt.contains("\"make it night\""), "{prompt}");
    for (part, expected) in content[1..].iter().zip(images()) {
        let url = part["image_url"]["url"].as_str().unwrap();
        let data = url
            .strip_prefix("data:image/png;base64,")
            .expect("PNG data URL");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let sent = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(sent, expected, "images go edited 1, edited 2, original");
    }
}

#[test]
fn malformed_answers_server_errors_and_timeouts_are_retried() {
    let cases: Vec<(Vec<Reply>, Preference, usize)> = vec![
        (
            vec![Reply::Answer("banana"), Reply::Answer("1")],
            Preference::First,
            2,
        ),
        (
            vec![
                Reply::Answer("image 1 or image 2?"),
                Reply::Answer("{\"choice\": 2}"),
            ],
            Preference::Second,
            2,
        ),
        (
            vec![Reply::Status(500), Reply::Status(503), Reply::Answer("2")],
            Preference::Second,
            3,
        ),
        (
            vec![Reply::Slow(Duration::from_secs(2), "1"), Reply::Answer("1")],
            Preference::First,
            2,
        ),
    ];
    for (script, expected, requests) in cases {
        let (url, received) = server(script);
        let verdict = compare(&mut judge(&url, 3)).unwrap();
        assert_eq!(verdict.preference, expected);
        assert_eq!(
            verdict.warnings.len(),
            requests - 1,
            "{:?}",
            verdict.warnings
        );
        assert_eq!(received.lock().unwrap().len(), requests);
    }
}

#[test]
fn client_errors_are_not_retried_and_exhausted_retries_fail() {
    let (url, received) = server(vec![Reply::Status(401)]);
    let err = compare(&mut judge(&url, 3)).unwrap_err().to_string();
    assert!(err.contains("HTTP 401"), "{err}");
    assert_eq!(received.lock().unwrap().len(), 1);

    let (url, received) = server(vec![Reply::Answer("no idea")]);
    let err = compare(&mut judge(&url, 2)).unwrap_err().to_string();
    assert!(err.contains("no usable answer after 2 tries"), "{err}");
    assert_eq!(received.lock().unwrap().len(), 2);
}

#[test]
fn a_failing_judge_hands_over_to_the_next_and_all_failing_keeps_the_first() {
    let (broken, _) = server(vec![Reply::Status(500)]);
    let (working, _) = server(vec![Reply::Answer("2")]);
    let mut chain = JudgeChain::new(vec![
        Box::new(judge(&broken, 2)),
        Box::new(judge(&working, 2)),
    ]);
    let verdict = compare(&mut chain).unwrap();
    assert_eq!(verdict.preference, Preference::Second);
    assert_eq!(verdict.judge, judge(&working, 2).name());
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.contains("trying the next judge")),
        "{:?}",
        verdict.warnings
    );

    let (also_broken, _) = server(vec![Reply::Status(404)]);
    let mut chain = JudgeChain::new(vec![
        Box::new(judge(&broken, 1)),
        Box::new(judge(&also_broken, 1)),
    ]);
    let verdict = compare(&mut chain).unwrap();
    assert_eq!(verdict.preference, Preference::First);
    assert_eq!(verdict.judge, "none");
    assert!(verdict
        .warnings
        .last()
        .unwrap()
        .contains("keeping the first edit"));

    // The same chain from a --judge spec, with the key from the environment.
    let env = |k: &str| (k == "ICEDIT_JUDGE_API_KEY").then(|| "sk-env".to_string());
    let (url, received) = server(vec![Reply::Answer("1")]);
    let spec = format!("openai:{url}#m");
    let settings = JudgeSettings {
        lookup: &env,
        openai: OpenAiOptions::default(),
        hub: icedit_hub::HubOptions::new(std::env::temp_dir()).with_offline(true),
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        clip: ClipScoring::default(),
    };
    let mut chain = build_judges(&parse_judges(&spec).unwrap(), &settings).unwrap();
    assert_eq!(compare(&mut chain).unwrap().preference, Preference::First);
    assert_eq!(
        received.lock().unwrap()[0].authorization.as_deref(),
        Some("Bearer sk-env")
    );
}
