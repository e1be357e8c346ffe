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

/// A judge with `timeout`, `attempts` tries and short waits.
fn quick_judge(url: &str, timeout: Duration, attempts: usize) -> OpenAiJudge {
    OpenAiJudge::new(OpenAiOptions {
        url: url.into(),
        model: Some("m".into()),
        api_key: None,
        timeout,
        attempts,
        backoff: Duration::from_millis(10),
    })
}

/// Runs `f`, asserting it took under `limit`.
fn within<T>(limit: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    assert!(
        start.elapsed() < limit,
        "{what} took {:?}, over {limit:?}",
        start.elapsed()
    );
    out
}

/// A port nothing listens on.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

#[test]
fn redirects_are_not_followed_and_name_only_scheme_and_host() {
    let cases = [
        (302, "file:///etc/passwd", "file://"),
        (
            307,
            "http://evil.example:8080/steal?token=abc",
            "http://evil.example:8080",
        ),
        (
            308,
            "https://user:hunter2@other.example/v1",
            "https://other.example",
        ),
        (301, "ftp://files.example/x", "ftp://files.example"),
        (302, "/v2/chat/completions", "relative"),
    ];
    for (code, location, named) in cases {
        let (url, received) = server(vec![Reply::Redirect(code, location)]);
        let err = within(Duration::from_secs(5), location, || {
            compare(&mut quick_judge(&url, Duration::from_secs(2), 3))
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("HTTP {code}")) && err.contains("redirect"),
            "{err}"
        );
        assert!(err.contains(named), "{location}: {err}");
        for hidden in ["hunter2", "token", "passwd", "/steal"] {
            assert!(!err.contains(hidden), "{err}");
        }
        // A redirect is not retried: the server is asked once.
        assert_eq!(received.lock().unwrap().len(), 1, "{location}");
    }

    // In a chain, the next judge answers.
    let (redirecting, _) = server(vec![Reply::Redirect(302, "file:///etc/passwd")]);
    let (working, _) = server(vec![Reply::Answer("2")]);
    let mut chain = JudgeChain::new(vec![
        Box::new(quick_judge(&redirecting, Duration::from_secs(2), 3)),
        Box::new(quick_judge(&working, Duration::from_secs(2), 3)),
    ]);
    let verdict = compare(&mut chain).unwrap();
    assert_eq!(verdict.preference, Preference::Second);
    assert!(
        verdict.warnings[0].contains("file://"),
        "{:?}",
        verdict.warnings
    );
}

#[test]
fn silent_and_dripping_servers_time_out() {
    for reply in [
        Reply::Silent(Duration::from_secs(30)),
        Reply::Drip(Duration::from_millis(50)),
    ] {
        let (url, received) = server(vec![reply.clone()]);
        let err = within(Duration::from_secs(4), &format!("{reply:?}"), || {
            compare(&mut quick_judge(&url, Duration::from_millis(400), 2))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("no usable answer after 2 tries"), "{err}");
        assert!(err.to_lowercase().contains("timed out"), "{err}");
        assert_eq!(received.lock().unwrap().len(), 2);
    }
}

#[test]
fn garbage_and_huge_answers_fail_cleanly() {
    let cases = [
        (
            Reply::Raw("<html><body>\x1b[31mBad Gateway</body></html>"),
            "not a chat-completions response",
        ),
        (
            Reply::Raw("{\"choices\": [{"),
            "not a chat-completions response",
        ),
        (Reply::Raw(""), "not a chat-completions response"),
        (Reply::Huge(40 * 1024 * 1024), "over 16 MiB"),
        (Reply::Endless, "over 16 MiB"),
    ];
    for (reply, expected) in cases {
        let (url, received) = server(vec![reply.clone()]);
        let err = within(Duration::from_secs(10), &format!("{reply:?}"), || {
            compare(&mut quick_judge(&url, Duration::from_secs(5), 2))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(expected), "{reply:?}: {err}");
        assert!(
            !err.contains('\x1b'),
            "control characters are not echoed: {err:?}"
        );
        assert!(err.len() < 2000, "{reply:?}: a long message: {}", err.len());
        assert_eq!(received.lock().unwrap().len(), 2);
    }
}

#[test]
fn refused_connections_fail_fast_and_backoff_is_bounded() {
    let url = refused_url();
    let err = within(Duration::from_secs(2), "refused", || {
        compare(&mut OpenAiJudge::new(OpenAiOptions {
            url: url.clone(),
            attempts: 8,
            ..Default::default()
        }))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("connection refused"), "{err}");

    // Ten tries of a failing server with the default waits (0.5 s doubling): the waits stop
    // at 4 s each and 10 s in all.
    let (url, received) = server(vec![Reply::Status(503)]);
    let start = std::time::Instant::now();
    let err = compare(&mut OpenAiJudge::new(OpenAiOptions {
        url,
        timeout: Duration::from_secs(2),
        attempts: 10,
        ..Default::default()
    }))
    .unwrap_err()
    .to_string();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(13), "{elapsed:?}");
    assert!(elapsed >= Duration::from_secs(7), "{elapsed:?}");
    assert!(err.contains("HTTP 503"), "{err}");
    let requests = received.lock().unwrap().len();
    assert!((5..=10).contains(&requests), "{requests}");

    // Out-of-range settings are clamped, never a panic.
    let (url, _) = server(vec![Reply::Answer("1")]);
    let verdict = compare(&mut OpenAiJudge::new(OpenAiOptions {
        url,
        timeout: Duration::from_secs(u64::MAX),
        attempts: usize::MAX,
        backoff: Duration::from_secs(u64::MAX),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(verdict.preference, Preference::First);
    let url = refused_url();
    let err = within(Duration::from_secs(2), "zero timeout", || {
        compare(&mut OpenAiJudge::new(OpenAiOptions {
            url,
            timeout: Duration::ZERO,
            attempts: 0,
            ..Default::default()
        }))
    });
    assert!(err.is_err());
}

#[test]
fn credentials_never_show_in_names_warnings_or_errors() {
    let key = "sk-very-secret-key";
    let password = "pa55w0rd-s3cret";
    let with_credentials =
        |url: &str| url.replacen("http://", &format!("http://alice:{password}@"), 1);
    let hidden = |text: &str| {
        assert!(!text.contains(key), "{text}");
        assert!(!text.contains(password), "{text}");
        assert!(!text.contains("alice"), "{text}");
    };
    let judge_with = |url: &str, api_key: Option<&str>| {
        OpenAiJudge::new(OpenAiOptions {
            url: with_credentials(url),
            model: Some("m".into()),
            api_key: api_key.map(str::to_string),
            timeout: Duration::from_secs(2),
            attempts: 2,
            backoff: Duration::from_millis(10),
        })
    };

    // The URL's user and password go to the server as basic auth, and show nowhere.
    let (url, received) = server(vec![Reply::Answer("2")]);
    let mut judge = judge_with(&url, None);
    let name = judge.name();
    assert!(name.starts_with("openai:http://***@127.0.0.1:"), "{name}");
    hidden(&name);
    let verdict = compare(&mut judge).unwrap();
    hidden(&verdict.judge);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"));
    assert_eq!(
        received.lock().unwrap()[0].authorization.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );

    // A server echoing the key in its errors; a refused connection; a silent server; a
    // redirect to the same URL with the credentials.
    let (echo, _) = server(vec![Reply::EchoAuthorization]);
    let (silent, _) = server(vec![Reply::Silent(Duration::from_secs(30))]);
    let redirect_to = Box::leak(with_credentials("http://127.0.0.1:1/v1").into_boxed_str());
    let (redirect, _) = server(vec![Reply::Redirect(302, redirect_to)]);
    let refused = refused_url();
    let mut chain = JudgeChain::new(vec![
        Box::new(judge_with(&echo, Some(key))),
        Box::new(judge_with(&refused, Some(key))),
        Box::new(OpenAiJudge::new(OpenAiOptions {
            url: with_credentials(&silent),
            model: Some("m".into()),
            api_key: Some(key.into()),
            timeout: Duration::from_millis(300),
            attempts: 1,
            backoff: Duration::ZERO,
        })),
        Box::new(judge_with(&redirect, Some(key))),
    ]);
    hidden(&chain.name());
    let verdict = compare(&mut chain).unwrap();
    assert_eq!(verdict.judge, "none");
    assert_eq!(verdict.warnings.len(), 5, "{:?}", verdict.warnings);
    for warning in &verdict.warnings {
        hidden(warning);
    }
    assert!(
        verdict.warnings[0].contains("bad credentials: Bearer ***"),
        "{:?}",
        verdict.warnings
    );
    let [a, b, original] = images();
    let err = chain
        .compare_strict(&Comparison {
            instruction: "make it night",
            first: &a,
            second: &b,
            original: &original,
        })
        .unwrap_err()
        .to_string();
    hidden(&err);
    assert!(err.starts_with("no judge gave a usable answer"), "{err}");
    assert_eq!(
        err.matches("\n  - openai:http://***@127.0.0.1:").count(),
        4,
        "{err}"
    );

    // Specs: names and parse errors.
    let spec = format!("openai:{}#m", with_credentials("http://127.0.0.1:9/v1"));
    let specs = parse_judges(&spec).unwrap();
    assert_eq!(specs[0].name(), "openai:http://***@127.0.0.1:9/v1#m");
    for bad in [
        format!("openai:alice:{password}@127.0.0.1:9/v1"),
        format!("opnai:http://alice:{password}@127.0.0.1:9/v1"),
        format!("openai:http://alice:pa#{password}@127.0.0.1:9/v1"),
    ] {
        let err = parse_judges(&bad).unwrap_err().to_string();
        hidden(&err);
    }
    assert_eq!(
        icedit_judge::redact_url("https://u:p@h.example:1/v1?q=a@b"),
        "https://***@h.example:1/v1?q=a@b"
    );
    assert_eq!(icedit_judge::redact_url("http://h/v1"), "http://h/v1");
}
