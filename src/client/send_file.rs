//! `send --file`: the batch loader's terminal side (progress, Ctrl-C, summary).

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::Client;
use super::loader::{self, Job, Report, Summary};
use super::send::SendArgs;
use crate::config::Settings;
use crate::pipeline::envelope::Action;

/// A bar on a terminal; a plain line every few seconds otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines(Mutex<Instant>),
}

impl Report for Progress {
    fn progress(&self, summary: &Summary) {
        match self {
            Progress::Bar(bar) => bar.set_position(summary.done()),
            Progress::Lines(last) => {
                let mut last = last.lock().expect("poisoned");
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    eprintln!(
                        "progress: {} documents done ({} failed)",
                        summary.done(),
                        summary.failed
                    );
                }
            }
        }
    }
}

/// The file's line ends, counted a buffer at a time (a line without an end costs no
/// more memory than any other): the progress bar's length.
fn count_lines(path: &std::path::Path) -> Option<u64> {
    let mut file = BufReader::new(File::open(path).ok()?);
    let (mut count, mut last) = (0, b'\n');
    loop {
        let buffer = file.fill_buf().ok()?;
        let Some(&end) = buffer.last() else {
            // A last line without an end is a line too.
            return Some(count + u64::from(last != b'\n'));
        };
        last = end;
        count += buffer.iter().filter(|&&b| b == b'\n').count() as u64;
        let read = buffer.len();
        file.consume(read);
    }
}

pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<ExitCode> {
    let (Some(index), Some(collection), Some(path)) = (&args.index, &args.collection, &args.file)
    else {
        anyhow::bail!("--file needs --index and --collection");
    };
    let participle = match Action::from_name(&args.action) {
        Some((action, false)) => action.participle(),
        _ => anyhow::bail!(
            "--file sends m-forms (mUpdate, mUpsert, mCreate, mCreateOrReplace, mReplace, mDelete), not {}",
            args.action
        ),
    };
    let stdin = path.as_os_str() == "-";
    let input: Box<dyn BufRead + Send> = if stdin {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(File::open(path)?))
    };
    let failures: Box<dyn Write + Send> = match &args.failures {
        Some(path) => Box::new(std::io::BufWriter::new(File::create(path)?)),
        None => Box::new(std::io::sink()),
    };
    let progress = if std::io::stderr().is_terminal() {
        let total = if stdin { None } else { count_lines(path) };
        let bar = match total {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new_spinner(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} documents, {per_sec}, {eta} left",
            )?,
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar(bar)
    } else {
        Progress::Lines(Mutex::new(Instant::now()))
    };
    let job = Job {
        action: args.action.clone(),
        queue: settings.amqp.request_queue.clone(),
        index: index.clone(),
        collection: collection.clone(),
        batch: settings.limits.documents_write_count,
        max_bytes: settings.limits.max_message_bytes,
        in_flight: args.in_flight,
        refresh: args.refresh.clone(),
        retry_on_conflict: args.retry_on_conflict,
        timeout: Duration::from_secs(args.timeout),
    };
    let client = Arc::new(Client::connect_any(&settings.amqp).await?);
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: no more requests; waiting for those sent");
            on_signal.cancel();
        }
    });
    // Reading the file blocks: keep it off the runtime's reactor threads.
    let summary = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(loader::run(client, &job, input, failures, &progress, stop))
    });
    if let Progress::Bar(bar) = &progress {
        bar.finish_and_clear();
    }
    eprintln!(
        "{}: {} {participle}, {} failed of {} lines ({} sent) in {:.1} s, {:.0} documents/s",
        if summary.interrupted {
            "interrupted"
        } else {
            "done"
        },
        summary.updated,
        summary.failed,
        summary.lines,
        summary.sent,
        summary.elapsed.as_secs_f64(),
        summary.rate()
    );
    for (status, (reason, count)) in &summary.failed_by_status {
        eprintln!("  {count} failed with {status}, e.g. {reason}");
    }
    println!("{}", summary.to_json());
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
