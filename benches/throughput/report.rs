//! The report of a scenarios run: the median round of each scenario and contender,
//! the ratios, as Markdown, JSON and a chart.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Args, Contender, Run, chart, write_chart};

/// The median round by documents per second.
fn median(runs: &[Run]) -> Run {
    let mut runs = runs.to_vec();
    runs.sort_by(|a, b| a.docs_per_second().total_cmp(&b.docs_per_second()));
    runs.swap_remove(runs.len() / 2)
}

pub fn write(
    args: &Args,
    context: &Value,
    results: &BTreeMap<(&str, Contender), Vec<Run>>,
) -> bool {
    let mut json_out = json!({"context": context, "scenarios": {}});
    let mut md = format!(
        "Measured {} on {}, worker at {}{}. Rounds: {} (each figure is the median round by docs/s). Load average before: {}, after: {}.\n\n\
         | scenario | contender | docs/s | requests/s | p50 / p95 / p99 ms | consumer CPU µs/req | RabbitMQ µs/req | engine µs/req | driver µs/req | peak RSS MiB | docs per bulk |\n\
         | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        context["date"].as_str().unwrap_or(""),
        context["machine"].as_str().unwrap_or(""),
        context["commit"].as_str().unwrap_or(""),
        if context["dirty"] == true {
            " (src/ modified)"
        } else {
            ""
        },
        args.rounds,
        context["load_average_before"].as_str().unwrap_or(""),
        context["load_average_after"].as_str().unwrap_or(""),
    );
    let mut ratios = String::from(
        "| scenario | worker / echo docs/s | worker p99 / echo p99 | worker / direct docs/s | worker / echo by round | worker / direct by round |\n\
         | --- | ---: | ---: | ---: | --- | --- |\n",
    );
    let mut groups = Vec::new();
    let mut errors = 0;
    for s in &args.scenarios {
        let mut group = chart::Group {
            scenario: s.name.to_owned(),
            values: Vec::new(),
        };
        let mut medians = BTreeMap::new();
        for &contender in s.contenders() {
            let runs = &results[&(s.name, contender)];
            errors += runs.iter().map(|r| r.errors).sum::<usize>();
            let r = median(runs);
            let dash = |v: f64, show: bool| {
                if show {
                    format!("{v:.0}")
                } else {
                    "–".to_owned()
                }
            };
            md.push_str(&format!(
                "| {} ({}) | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
                s.name,
                s.describe(),
                contender.name(),
                r.docs_per_second(),
                r.requests_per_second(),
                r.percentile(0.5),
                r.percentile(0.95),
                r.percentile(0.99),
                dash(r.per_request(r.cpu.consumer), contender != Contender::Direct),
                r.per_request(r.cpu.broker),
                r.per_request(r.cpu.engine),
                r.per_request(r.cpu.driver),
                if contender == Contender::Direct { "–".to_owned() } else { format!("{:.1}", r.consumer_peak_rss_mib) },
                if contender == Contender::Worker { format!("{:.1}", r.docs_per_bulk) } else { "–".to_owned() },
            ));
            group
                .values
                .push((contender.name(), r.docs_per_second(), r.percentile(0.99)));
            json_out["scenarios"][s.name][contender.name()] = json!({
                "median": r.to_json(),
                "rounds": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
            });
            medians.insert(contender, r);
        }
        let w = &medians[&Contender::Worker];
        let d = &medians[&Contender::Direct];
        let by_round = |other: Contender| -> Vec<f64> {
            results[&(s.name, Contender::Worker)]
                .iter()
                .zip(&results[&(s.name, other)])
                .map(|(w, o)| w.docs_per_second() / o.docs_per_second())
                .collect()
        };
        let (over_echo, p99_over_echo, rounds_echo) = match medians.get(&Contender::Echo) {
            Some(e) => (
                Some(w.docs_per_second() / e.docs_per_second()),
                Some(w.percentile(0.99) / e.percentile(0.99)),
                by_round(Contender::Echo),
            ),
            None => (None, None, Vec::new()),
        };
        let over_direct = w.docs_per_second() / d.docs_per_second();
        let fmt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}"));
        let list = |r: &[f64]| {
            r.iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rounds_direct = by_round(Contender::Direct);
        ratios.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {} |\n",
            s.name,
            fmt(over_echo),
            fmt(p99_over_echo),
            over_direct,
            list(&rounds_echo),
            list(&rounds_direct),
        ));
        json_out["scenarios"][s.name]["ratios"] = json!({
            "worker_over_echo_docs_per_second": over_echo,
            "worker_p99_over_echo_p99": p99_over_echo,
            "worker_over_direct_docs_per_second": over_direct,
            "worker_over_echo_by_round": rounds_echo,
            "worker_over_direct_by_round": rounds_direct,
        });
        groups.push(group);
    }
    md.push('\n');
    md.push_str(&ratios);
    std::fs::create_dir_all(&args.out).unwrap();
    std::fs::write(
        args.out.join("throughput.json"),
        serde_json::to_string_pretty(&json_out).unwrap(),
    )
    .unwrap();
    std::fs::write(args.out.join("throughput.md"), &md).unwrap();
    let title = format!(
        "mupdate-worker throughput: {} (median of {} rounds)",
        context["date"].as_str().unwrap_or(""),
        args.rounds
    );
    write_chart(args, "throughput.png", |p| {
        chart::throughput(p, &title, &groups)
    });
    println!("{md}");
    if errors > 0 {
        eprintln!("{errors} wrong or missing replies");
    }
    errors == 0
}
