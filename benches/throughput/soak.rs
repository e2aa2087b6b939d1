//! `--soak SECONDS [--rate R]`: one-document requests through the worker at a fixed
//! rate (default: 80 % of the S2 rate measured first), sampling every 10 s the worker's
//! RSS, the p99 of the window's latencies and the worker's CPU per request. Reports
//! whether RSS and p99 grew between the first and the last minute.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    Args, Bench, Contender, ProcessWatch, SCENARIOS, TIMEOUT, chart, good_reply, ids, percentile,
    request,
};
use crate::procfs;

const WINDOW: Duration = Duration::from_secs(10);
/// Requests in flight at most: past it the driver waits (and the rate achieved falls,
/// which the report shows) rather than pile up without bound.
const MAX_IN_FLIGHT: usize = 4096;
/// Growth that counts, between the first and the last minute: RSS by more than 10 %
/// and 2 MiB; p99 by more than 50 % and 5 ms.
const RSS_GROWTH: (f64, f64) = (1.10, 2.0);
const P99_GROWTH: (f64, f64) = (1.5, 5.0);

#[derive(Default)]
struct Window {
    latencies_ms: Vec<f64>,
}

struct Sample {
    t: f64,
    rss_mib: f64,
    requests: usize,
    cpu_us: f64,
    /// Sorted.
    latencies_ms: Vec<f64>,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({"t": self.t, "worker_rss_mib": self.rss_mib, "requests": self.requests,
               "p50_ms": percentile(&self.latencies_ms, 0.5),
               "p99_ms": percentile(&self.latencies_ms, 0.99),
               "worker_cpu_us_per_request": self.cpu_us})
    }
}

pub async fn run(b: &Bench, args: &Args, seconds: u64, context: &mut Value) -> bool {
    let s2 = SCENARIOS.iter().find(|s| s.name == "S2").expect("S2");
    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            let run = b.run(Contender::Worker, s2, 1).await;
            eprintln!(
                "S2 through the worker: {:.0} requests/s, errors {}",
                run.requests_per_second(),
                run.errors
            );
            if run.errors > 0 {
                return false;
            }
            0.8 * run.requests_per_second()
        }
    };
    eprintln!("soak: {rate:.0} requests/s for {seconds} s");
    let window = Arc::new(Mutex::new(Window::default()));
    let errors = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let watch = ProcessWatch::new(b.worker, "worker");
    let start = Instant::now();
    let value = 1_000_000u64;

    let send = async {
        let total = (seconds as f64 * rate) as usize;
        for n in 0..total {
            let due = start + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let id = format!("soak{value}-{n}");
            let body = serde_json::to_vec(&b.envelope(s2, n, value, &id)).unwrap();
            let expected = ids(s2, n, value);
            let (client, queue) = (b.client.clone(), b.worker_queue.clone());
            let (window, errors) = (window.clone(), errors.clone());
            let gone = watch.gone.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let reply = request(&client, gone, &queue, &body, &id).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                if !reply.is_some_and(|r| good_reply(&r, &id, &expected)) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                window.lock().unwrap().latencies_ms.push(ms);
                drop(permit);
            });
        }
        total
    };
    let sample = async {
        let mut samples = Vec::new();
        let mut cpu0 = procfs::cpu_seconds(&b.worker.to_string());
        let mut tick = tokio::time::interval_at((start + WINDOW).into(), WINDOW);
        for _ in 0..seconds.div_ceil(WINDOW.as_secs()) {
            tick.tick().await;
            let mut latencies_ms = std::mem::take(&mut window.lock().unwrap().latencies_ms);
            latencies_ms.sort_by(f64::total_cmp);
            let cpu = procfs::cpu_seconds(&b.worker.to_string());
            let s = Sample {
                t: start.elapsed().as_secs_f64(),
                rss_mib: procfs::rss_mib(b.worker),
                requests: latencies_ms.len(),
                cpu_us: (cpu - cpu0) * 1e6 / latencies_ms.len().max(1) as f64,
                latencies_ms,
            };
            cpu0 = cpu;
            eprintln!(
                "soak {:5.0} s: {:5} requests, p99 {:6.1} ms, worker RSS {:.1} MiB, worker CPU {:.0} µs/request, errors so far {}",
                s.t,
                s.requests,
                percentile(&s.latencies_ms, 0.99),
                s.rss_mib,
                s.cpu_us,
                errors.load(Ordering::Relaxed)
            );
            samples.push(s);
        }
        samples
    };
    let (total, samples) = tokio::join!(send, sample);
    // The last replies: every permit back, or missing ones counted.
    let drained = tokio::time::timeout(TIMEOUT, in_flight.acquire_many(MAX_IN_FLIGHT as u32)).await;
    let errors = errors.load(Ordering::Relaxed) + if drained.is_err() { 1 } else { 0 };

    let verdict = verdict(&samples, rate);
    context["load_average_after"] = json!(procfs::load_average());
    let achieved = samples.iter().map(|s| s.requests).sum::<usize>() as f64
        / samples.last().map_or(1.0, |s| s.t);
    let out = json!({"context": context, "seconds": seconds, "rate": rate,
        "achieved_rate": achieved, "requests": total, "errors": errors,
        "verdict": verdict, "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>()});
    let mut md = format!(
        "Soak measured {} on {}, worker at {}. {seconds} s at {rate:.0} requests/s (achieved {achieved:.0}), one document each; {total} requests, {errors} wrong or missing replies. Load average before: {}, after: {}.\n\n\
         | t s | requests | p50 ms | p99 ms | worker RSS MiB | worker CPU µs/request |\n| ---: | ---: | ---: | ---: | ---: | ---: |\n",
        context["date"].as_str().unwrap_or(""),
        context["machine"].as_str().unwrap_or(""),
        context["commit"].as_str().unwrap_or(""),
        context["load_average_before"].as_str().unwrap_or(""),
        context["load_average_after"].as_str().unwrap_or(""),
    );
    for s in &samples {
        md.push_str(&format!(
            "| {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            s.t,
            s.requests,
            percentile(&s.latencies_ms, 0.5),
            percentile(&s.latencies_ms, 0.99),
            s.rss_mib,
            s.cpu_us
        ));
    }
    md.push_str(&format!(
        "\n{}\n",
        verdict["summary"].as_str().unwrap_or("")
    ));
    std::fs::create_dir_all(&args.out).unwrap();
    std::fs::write(
        args.out.join("soak.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    std::fs::write(args.out.join("soak.md"), &md).unwrap();
    let points: Vec<chart::Sample> = samples
        .iter()
        .map(|s| chart::Sample {
            t: s.t,
            rate: s.requests as f64 / WINDOW.as_secs_f64(),
            rss_mib: s.rss_mib,
            p99_ms: percentile(&s.latencies_ms, 0.99),
            cpu_us: s.cpu_us,
        })
        .collect();
    let title = format!(
        "mupdate-worker soak: {seconds} s at {rate:.0} requests/s, {}",
        context["date"].as_str().unwrap_or("")
    );
    super::write_chart(args, "soak.png", |p| chart::soak(p, &title, &points));
    println!("{md}");
    if errors > 0 {
        eprintln!("{errors} wrong or missing replies");
    }
    errors == 0
}

/// The first and the last minute (or, in a shorter soak, the first and last half)
/// compared: mean RSS, p99 of all their latencies.
fn verdict(samples: &[Sample], rate: f64) -> Value {
    let k = (samples.len() / 2).min(6);
    if k == 0 {
        return json!({"summary": "too short to compare (under 20 s)"});
    }
    let part = |part: &[Sample]| {
        let rss = part.iter().map(|s| s.rss_mib).sum::<f64>() / part.len() as f64;
        let mut l: Vec<f64> = part.iter().flat_map(|s| s.latencies_ms.clone()).collect();
        l.sort_by(f64::total_cmp);
        (rss, percentile(&l, 0.99))
    };
    let (rss0, p990) = part(&samples[..k]);
    let (rss1, p991) = part(&samples[samples.len() - k..]);
    let rss_grew = rss1 > rss0 * RSS_GROWTH.0 && rss1 - rss0 > RSS_GROWTH.1;
    let p99_grew = p991 > p990 * P99_GROWTH.0 && p991 - p990 > P99_GROWTH.1;
    let span = format!("{} s", k * WINDOW.as_secs() as usize);
    let last_rate = samples[samples.len() - k..]
        .iter()
        .map(|s| s.requests)
        .sum::<usize>() as f64
        / (k as f64 * WINDOW.as_secs_f64());
    // Replies slower than requests for the last stretch: a backlog built up.
    let behind = last_rate < 0.95 * rate;
    let summary = format!(
        "First {span} against last {span}: worker RSS {rss0:.1} → {rss1:.1} MiB ({}), p99 {p990:.1} → {p991:.1} ms ({}); replies in the last {span}: {last_rate:.0}/s for {rate:.0}/s sent{}.",
        if rss_grew { "**grew**" } else { "no growth" },
        if p99_grew { "**grew**" } else { "no growth" },
        if behind {
            " (**fell behind**: a backlog built up)"
        } else {
            ""
        },
    );
    json!({"compared_seconds": k * WINDOW.as_secs() as usize,
           "rss_mib": {"first": rss0, "last": rss1, "grew": rss_grew},
           "p99_ms": {"first": p990, "last": p991, "grew": p99_grew},
           "last_replies_per_second": last_rate, "fell_behind": behind,
           "summary": summary})
}
