//! `icedit serve --queue` and `icedit worker` on a real Redis: jobs survive a worker killed
//! (SIGKILL) in the middle of one, each job gets exactly one result equal to a local run of its
//! seed, a poisoned job lands in the dead-letter stream after its tries, and events and cancel
//! flow between the server and the workers.

use std::time::{Duration, Instant};

use base64::Engine as _;
use redis::Commands;

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
#[path = "../../../tests/support/http.rs"]
mod http_support;
use http_support::*;
use icedit_test_support::fixtures;

fn model() -> String {
    fixtures()
        .join("fill_pipeline/tiny")
        .to_str()
        .unwrap()
        .to_string()
}

fn photo_b64() -> String {
    base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixtures().join("edit/source.png")).unwrap())
}

fn worker(redis: &RedisServer, name: &str) -> Server {
    worker_with(
        redis,
        name,
        &["--visibility-timeout", "2", "--max-attempts", "3"],
    )
}

/// `icedit worker` on the tiny pipeline, named `name`, with `extra` flags.
fn worker_with(redis: &RedisServer, name: &str, extra: &[&str]) -> Server {
    let (model, url) = (model(), redis.url());
    let mut args = vec![
        "--model",
        &model,
        "--no-lora",
        "--queue",
        &url,
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    Server::start_command("worker", &args, "taking jobs from ")
}

fn submit(server: &Server, seed: u64, steps: usize) -> String {
    server.post_job(&format!(
        r#"{{"image": "{}", "instruction": "make it night", "seeds": [{seed}], "steps": {steps}, "size": "64x48"}}"#,
        photo_b64()
    ))
}

#[test]
fn jobs_survive_a_killed_worker() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let server = Server::start(&[
        "--model",
        &model(),
        "--no-lora",
        "--queue",
        &redis.url(),
        "--queue-size",
        "64",
    ]);
    let mut first = worker(&redis, "w1");
    let _second = worker(&redis, "w2");

    let seeds: Vec<u64> = (100..120).collect();
    let ids: Vec<String> = seeds.iter().map(|&s| submit(&server, s, 12)).collect();

    // Kill w1 the moment it holds a job, mid-edit.
    let start = Instant::now();
    let killed_job = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "w1 never took a job"
        );
        let pending: redis::streams::StreamPendingCountReply = con
            .xpending_consumer_count("icedit:jobs", "workers", "-", "+", 10, "w1")
            .unwrap();
        if let Some(entry) = pending.ids.first() {
            let entries: redis::streams::StreamRangeReply =
                con.xrange("icedit:jobs", &entry.id, &entry.id).unwrap();
            let state: Option<String> = entries
                .ids
                .first()
                .and_then(|e| e.get::<String>("id"))
                .and_then(|id| con.hget(format!("icedit:job:{id}"), "state").ok());
            if state.as_deref() == Some("running") {
                first.child.kill().unwrap(); // SIGKILL
                first.child.wait().unwrap();
                break entries.ids[0].get::<String>("id").unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };

    // Every job completes, the killed one on w2 after the visibility timeout.
    let finished: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| server.wait_final(id, Duration::from_secs(240)))
        .collect();
    for (job, seed) in finished.iter().zip(&seeds) {
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["results"].as_array().unwrap().len(), 1);
        assert_eq!(job["results"][0]["seed"], *seed);
    }
    let attempts: u32 = con
        .hget(format!("icedit:job:{killed_job}"), "attempts")
        .unwrap();
    let by: String = con
        .hget(format!("icedit:job:{killed_job}"), "worker")
        .unwrap();
    assert!(attempts >= 2, "{killed_job} was tried {attempts} times");
    assert_eq!(by, "w2", "{killed_job} taken over by the other worker");

    // Exactly one result per job, one `done` event each, nothing left in the queue.
    let results: Vec<String> = con.keys("icedit:result:*").unwrap();
    assert_eq!(results.len(), ids.len());
    for id in &ids {
        let events: redis::streams::StreamRangeReply =
            con.xrange_all(format!("icedit:events:{id}")).unwrap();
        let done = events
            .ids
            .iter()
            .filter(|e| e.get::<String>("event").unwrap().contains("\"done\""))
            .count();
        assert_eq!(done, 1, "{id}");
    }
    let left: usize = con.xlen("icedit:jobs").unwrap();
    assert_eq!(left, 0, "acknowledged jobs are removed");

    // Each image equals a local run of its seed (`icedit serve` without a queue, which equals
    // `icedit edit`: tests/serve.rs).
    let local = Server::start(&["--model", &model(), "--no-lora"]);
    for chunk in seeds.chunks(10) {
        let (content_type, body) = multipart(&[
            (
                "image",
                Part::File(
                    std::fs::read(fixtures().join("edit/source.png")).unwrap(),
                    "image/png",
                ),
            ),
            ("prompt", text("make it night")),
            ("n", text(&chunk.len().to_string())),
            ("seed", text(&chunk[0].to_string())),
            ("steps", text("12")),
            ("size", text("64x48")),
        ]);
        let (status, json) = send(
            ureq::post(&local.url("/v1/images/edits")),
            Some((&content_type, &body)),
        );
        assert_eq!(status, 200, "{json}");
        for (i, seed) in chunk.iter().enumerate() {
            let job = &finished[(seed - 100) as usize];
            let decode = |text: &serde_json::Value| {
                png_pixels(
                    &base64::engine::general_purpose::STANDARD
                        .decode(text.as_str().unwrap())
                        .unwrap(),
                )
            };
            assert_eq!(
                decode(&job["results"][0]["png_b64"]),
                decode(&json["data"][i]["b64_json"]),
                "seed {seed}: the queued result equals the local run"
            );
        }
    }
}

#[test]
fn poison_events_and_cancel_through_the_queue() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let server = Server::start(&["--model", &model(), "--no-lora", "--queue", &redis.url()]);
    let _worker = worker(&redis, "w1");

    // An entry no server wrote: tried three times, then dead-lettered with its error.
    let _: String = con
        .xadd(
            "icedit:jobs",
            "*",
            &[("id", "poison-1"), ("request", "{not json")],
        )
        .unwrap();
    let start = Instant::now();
    let dead = loop {
        let dead: redis::streams::StreamRangeReply = con.xrange_all("icedit:dead").unwrap();
        if let Some(entry) = dead.ids.into_iter().next() {
            break entry;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not dead-lettered"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dead.get::<String>("id").as_deref(), Some("poison-1"));
    assert_eq!(dead.get::<u32>("attempts"), Some(3));
    let error = dead.get::<String>("error").unwrap();
    assert!(error.contains("cannot be read"), "{error}");
    let state: String = con.hget("icedit:job:poison-1", "state").unwrap();
    assert_eq!(state, "dead");

    // Events flow back from the worker to the server's SSE, in order.
    let id = submit(&server, 3, 3);
    let events = ureq::get(&server.url(&format!("/v1/jobs/{id}/events")))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let names: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"queued"), "{events}");
    assert_eq!(names.get(1), Some(&"started"), "{events}");
    assert_eq!(names.last(), Some(&"done"), "{events}");
    assert!(events.contains("\"step\":3,\"total\":3"), "{events}");
    let metrics = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("icedit_redis_queue_length 0"), "{metrics}");

    // Another server on the same queue (or this one after a restart) finds the job in Redis.
    let other = Server::start(&["--model", &model(), "--no-lora", "--queue", &redis.url()]);
    let (status, job) = send(ureq::get(&other.url(&format!("/v1/jobs/{id}"))), None);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["results"][0]["seed"], 3);
    let (status, _) = send(ureq::get(&other.url("/v1/jobs/job-unknown")), None);
    assert_eq!(status, 404);

    // Cancel reaches the worker running the job, sent through the other server.
    let id = submit(&server, 4, 400);
    server.wait_progress(&id, "step", 1);
    let (status, json) = send(ureq::delete(&other.url(&format!("/v1/jobs/{id}"))), None);
    assert_eq!(status, 200, "{json}");
    let job = server.wait_final(&id, Duration::from_secs(60));
    assert_eq!(job["state"], "cancelled", "{job}");
    let seen_there = other.wait_final(&id, Duration::from_secs(60));
    assert_eq!(seen_there["state"], "cancelled", "{seen_there}");
    assert!(job["progress"]["step"].as_u64().unwrap() < 400);
}

#[test]
fn unreachable_queue_is_refused_before_loading() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for command in ["worker", "serve"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_icedit"))
            .args([
                command,
                "--model",
                &model(),
                "--no-lora",
                "--queue",
                &format!("redis://127.0.0.1:{port}"),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}");
        let err = cli_support::stderr(&out);
        assert!(err.contains("cannot reach Redis"), "{command}: {err}");
        assert!(!err.contains("loading transformer"), "{command}: {err}");
    }
}

#[test]
fn batch_through_the_queue_equals_a_local_batch() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _worker = worker(&redis, "w1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("edit/source.png"),
        dir.path().join("photo.png"),
    )
    .unwrap();
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(
        &jobs,
        r#"{"id": "night", "image": "photo.png", "instruction": "make it night", "seeds": [7, 8], "steps": 3, "width": 64}
{"id": "snow", "image": "photo.png", "instruction": "make it snow", "seed": 2, "steps": 3, "width": 64}
"#,
    )
    .unwrap();
    let batch = |out: &str, queue: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_icedit"));
        command
            .arg("batch")
            .arg(&jobs)
            .arg("--out")
            .arg(dir.path().join(out))
            .args(["--model", &model(), "--no-lora", "--dtype", "f32"])
            .args(["--max-seq-len", "16"])
            .env("HF_HUB_OFFLINE", "1");
        if queue {
            command.args(["--queue", &redis.url()]);
        }
        let run = command.output().unwrap();
        assert!(run.status.success(), "{}", cli_support::stderr(&run));
        run
    };
    batch("local", false);
    batch("queued", true);
    for file in ["night-7.png", "night-8.png", "snow-2.png"] {
        assert_eq!(
            cli_support::max_png_diff(
                &dir.path().join("local").join(file),
                &dir.path().join("queued").join(file)
            ),
            0,
            "{file}"
        );
    }
    // A rerun collects the stored result: nothing is sent to the workers again.
    std::fs::remove_file(dir.path().join("queued/snow.json")).unwrap();
    let run = batch("queued", true);
    assert!(cli_support::stderr(&run).contains("1 of 2 jobs already done"));
    assert!(dir.path().join("queued/snow.json").is_file());
    let keys: Vec<String> = con.keys("icedit:job:*").unwrap();
    assert_eq!(keys.len(), 2);
    for key in keys {
        let attempts: u32 = con.hget(&key, "attempts").unwrap();
        assert_eq!(attempts, 1, "{key} ran once");
    }
}

/// A job longer than the visibility timeout stays with its worker: the claim is renewed while
/// it runs, even through a search, which has no steps between which to say so.
#[test]
fn a_long_search_keeps_its_worker() {
    use icedit_judge::fake_server::{serve, Reply};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let (judge, received) = serve(vec![Reply::Answer("Image 2")]);
    let judge_spec = format!("openai:{judge}#judge-model");
    let judged = |name: &str| {
        worker_with(
            &redis,
            name,
            &["--visibility-timeout", "1", "--judge", &judge_spec],
        )
    };
    let _first = judged("w1");
    let _second = judged("w2");
    let server = Server::start(&[
        "--model",
        &model(),
        "--no-lora",
        "--queue",
        &redis.url(),
        "--judge",
        &format!("openai:{judge}#judge-model"),
    ]);
    let body = format!(
        r#"{{"image": "{}", "instruction": "make it night", "seeds": [1, 2], "steps": 1000, "size": "64x48", "search": {{"early_steps": 600}}}}"#,
        photo_b64()
    );
    let (status, json) = send(
        ureq::post(&server.url("/v1/edits")),
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(status, 202, "{json}");
    let id = json["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let job = server.wait_final(&id, Duration::from_secs(240));
    let took = started.elapsed();
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["results"][0]["seed"], 2);
    assert!(
        took > Duration::from_secs(3),
        "the job must outlast the 1 s visibility timeout to test anything ({took:?})"
    );
    let attempts: u32 = con.hget(format!("icedit:job:{id}"), "attempts").unwrap();
    assert_eq!(attempts, 1, "no other worker took the job over");
    assert_eq!(received.lock().unwrap().len(), 1, "one judge call");
}

/// SIGTERM stops a worker after the job in hand: the job finishes, the worker exits 0.
#[test]
fn sigterm_lets_the_worker_finish_its_job() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = Server::start(&["--model", &model(), "--no-lora", "--queue", &redis.url()]);
    let mut worker = worker(&redis, "w1");
    let id = submit(&server, 5, 300);
    server.wait_progress(&id, "step", 1);
    unsafe {
        libc::kill(worker.child.id() as i32, libc::SIGTERM);
    }
    let job = server.wait_final(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["progress"]["step"], 300);
    let status = worker.child.wait().unwrap();
    assert!(status.success(), "the worker exits cleanly: {status:?}");
}
