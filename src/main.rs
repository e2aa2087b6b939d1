use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mupdate_worker::client::send::{self, SendArgs};
use mupdate_worker::config::{LogFormat, Settings};
use mupdate_worker::logs::OneLine;
use mupdate_worker::security::rights::{ReplyRule, Rights, Rule};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: the worker makes many small, short-lived
/// allocations per request (envelopes, bulk bodies, replies), which mimalloc serves with
/// a sixth fewer instructions and a sixth less CPU time a request (docs/src/benchmarks.md,
/// "The allocator"). Without transparent huge pages (`no_thp`, `no_huge_pages`): with
/// them its arenas grew the resident memory 2 MiB at a time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The version `--version` prints: the package's, and the commit built (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MUPDATE_GIT_COMMIT"),
    ")"
);

/// Executes Kuzzle's document write actions (mUpdate, mUpsert, mCreate, ...) from
/// RabbitMQ against Elasticsearch.
#[derive(Parser)]
#[command(name = "mupdate-worker", version = VERSION, about)]
struct Cli {
    /// A TOML file overriding config/default.toml (environment variables
    /// MUPDATE__SECTION__KEY override both).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume requests and reply (the default).
    Run,
    /// Publish one request (any document write, mUpdate by default), wait for its reply
    /// and print it; or load a file of them (--file).
    Send(Box<SendArgs>),
    /// Print the effective configuration, secrets redacted.
    Config,
    /// Exit 0 when a running worker's /readyz answers 200 (for container health checks).
    Ready,
    /// Move the dead-lettered requests whose updates were never applied
    /// (`x-mupdate-applied: false`) back to the request queue; the others stay.
    RequeueDead {
        /// Also move those the broker dead-lettered (no `x-mupdate-applied`: a delivery
        /// limit, a panic), whose updates may have been applied.
        #[arg(long)]
        unknown: bool,
    },
    /// Print the man page (roff) on stdout, or write one page per command into a
    /// directory (--out).
    Man {
        /// Write mupdate-worker.1 and a page per subcommand here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the completion script of a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What the man page says beyond the command line (roff): the files, the environment,
/// the signals and the exit status.
const MAN_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/mupdate\-worker/config.toml\fR
The configuration the packaged service runs with (\fB\-\-config\fR): every key of the
built\-in defaults, which apply where a key is absent.
.TP
\fI/etc/mupdate\-worker/rules.toml\fR
The rights rules, when \fBsecurity.enabled\fR is true and \fBsecurity.rules_file\fR names it;
read again on SIGHUP.
.TP
\fI/etc/default/mupdate\-worker\fR
Environment overrides of the packaged service (MUPDATE__SECTION__KEY=value).
.TP
\fI/usr/share/mupdate\-worker/\fR
Prometheus alerts and a Grafana dashboard for the worker's metrics.
.SH ENVIRONMENT
.TP
\fBMUPDATE__\fISECTION\fB__\fIKEY\fR
Overrides the key \fIsection.key\fR of the configuration (e.g. MUPDATE__AMQP__URL).
.TP
\fBRUST_LOG\fR
Overrides \fBlog.level\fR (a tracing filter, e.g. info,mupdate_worker=debug).
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for a Type=notify service: \fBrun\fR sends READY=1 once it consumes,
STATUS= as it pauses or reconnects, and STOPPING=1 with EXTEND_TIMEOUT_USEC= (the
shutdown's bound) on SIGTERM or SIGINT.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop consuming, finish or hand back the requests held within \fBworker.shutdown_timeout_ms\fR,
then exit 0. A second signal exits at once, with 143 (SIGTERM) or 130 (SIGINT); what is
unsettled goes back to the queue.
.TP
\fBSIGHUP\fR
Read the rights rules file again; a file that doesn't load leaves the rules in force.
.SH EXIT STATUS
0 on a clean stop (\fBsend\fR: a 2xx reply; \fBsend \-\-file\fR: every document in); 1 on a
failure (\fBsend\fR: a reply that is not 2xx, or entries it can't make a request of;
\fBready\fR: not ready); 2 on a command line that doesn't parse, or a bad configuration,
rules file or TLS file; 143 or 130 when a second SIGTERM or SIGINT ends the worker at
once; 130 when Ctrl\-C stops \fBsend \-\-file\fR.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1); the changelog under /usr/share/doc/mupdate\-worker/;
the book: docs/ in the source repository.
"#;

/// Writes the man page: the main one on stdout, or with `out` every command's page into
/// that directory (mupdate-worker.1, mupdate-worker-send.1, ...).
fn manual(out: Option<&std::path::Path>) -> std::io::Result<()> {
    use clap::CommandFactory;
    use std::io::Write;
    let main_page = |w: &mut dyn Write| {
        let man = clap_mangen::Man::new(Cli::command().disable_help_subcommand(true));
        man.render_title(w)?;
        man.render_name_section(w)?;
        man.render_synopsis_section(w)?;
        man.render_description_section(w)?;
        man.render_options_section(w)?;
        man.render_subcommands_section(w)?;
        w.write_all(MAN_SECTIONS.as_bytes())?;
        man.render_version_section(w)
    };
    match out {
        None => main_page(&mut std::io::stdout().lock()),
        Some(dir) => {
            clap_mangen::generate_to(Cli::command(), dir)?;
            let mut file = std::fs::File::create(dir.join("mupdate-worker.1"))?;
            main_page(&mut file)?;
            file.flush()
        }
    }
}

/// Asks `/readyz` on the metrics endpoint, with a plain HTTP/1.0 request.
async fn ready(listen: &str) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    anyhow::ensure!(!listen.is_empty(), "metrics.listen is off: nothing to ask");
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(listen).await?;
        stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), ask).await??;
    let ok = answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200");
    println!("{}", if ok { "ready" } else { "not ready" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The first SIGTERM/SIGINT starts a graceful shutdown; a second one exits at once
/// (what is unsettled goes back to the queue when the broker sees the connection end).
/// Whatever the graceful path meets (a frozen engine or broker, a blocked connection), the
/// process ends with 0 within the grace and `EXIT_MARGIN`: see `exit_at_the_latest`.
async fn shutdown_signal(signals: Option<Signals>, token: CancellationToken, grace: Duration) {
    let Some(Signals {
        mut term, mut int, ..
    }) = signals
    else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    token.cancel();
    exit_at_the_latest(grace + EXIT_MARGIN);
    mupdate_worker::lifecycle::systemd::stopping(grace + EXIT_MARGIN);
    let code = tokio::select! {
        _ = term.recv() => 128 + 15,
        _ = int.recv() => 128 + 2,
    };
    eprintln!("mupdate-worker: second signal; exiting now");
    std::process::exit(code);
}

/// The worker's signal handlers, installed before the held signals are let in.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// Kept so that SIGHUP is handled (reloaded by `session`, never the default action)
    /// from the start.
    _hangup: tokio::signal::unix::Signal,
}

fn install_signals() -> Option<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Some(Signals {
        term: signal(SignalKind::terminate()).ok()?,
        int: signal(SignalKind::interrupt()).ok()?,
        _hangup: signal(SignalKind::hangup()).ok()?,
    })
}

/// After the grace: time for what is handed back to reach the broker, and to exit.
const EXIT_MARGIN: Duration = Duration::from_millis(1500);

/// The backstop of the shutdown bound, on a thread of its own (so that nothing the runtime
/// waits on can hold it up): the process exits 0 at `after` if it is still running. What is
/// still unsettled then goes back to the queue when the broker sees the connection end,
/// which is what a graceful shutdown past its grace does too.
fn exit_at_the_latest(after: Duration) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-bound".into())
        .spawn(move || {
            std::thread::sleep(after);
            eprintln!(
                "mupdate-worker: shutdown not finished {after:?} after the signal; exiting now"
            );
            std::process::exit(0);
        });
    if spawned.is_err() {
        eprintln!("mupdate-worker: cannot start the shutdown bound's thread");
    }
}

/// Logs to stderr, text or JSON, filtered by `RUST_LOG` or `log.level`, one event a line
/// (client strings are logged through `logs::Untrusted`). Whatever the
/// filter says, no message body is logged: lapin's returned-message log stays off (it
/// prints whole replies, `_source` included; the worker reports those itself), and so
/// does its trace level (every frame, bodies included).
fn init_logs(settings: &Settings) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let no_bodies = tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        let frames = target.starts_with("lapin") && *meta.level() == tracing::Level::TRACE;
        !(frames || target.starts_with("lapin::returned_messages"))
    });
    // Colours only on a terminal: a file or journald gets no escape codes. Each event is
    // written on one line whatever a field holds (`logs::OneLine`).
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = settings.log.format == LogFormat::Json;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(terminal)
        .with_writer(move || OneLine::new(std::io::stderr(), !terminal, json));
    let layer = match settings.log.format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().with_current_span(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(no_bodies))
        .init();
}

/// Holds SIGTERM, SIGINT and SIGHUP back from the start, in the main thread (and so in
/// every thread started after it), until their handlers are installed
/// (`install_signals`): one sent while the worker starts is handled once it can be,
/// never met by the default action that ends the process.
fn hold_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset write into a sigset_t we own; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Transparent huge pages off for this process, where the host has them `always` on:
/// under mimalloc's arenas they grew the resident memory 2 MiB at a time (mimalloc's
/// `no_thp` only stops it asking for them). Best effort: refused, nothing else changes.
fn no_huge_pages() {
    // SAFETY: prctl with integer arguments only; it changes a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Lets the held signals in again (those sent meanwhile are delivered now).
fn release_signals(set: &libc::sigset_t) {
    // SAFETY: as in `hold_signals`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut());
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    let held = hold_signals();
    let cli = Cli::parse();
    // Generated from the command line's definition, whatever the configuration holds.
    match &cli.command {
        Some(Command::Man { out }) => {
            return match manual(out.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("mupdate-worker: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "mupdate-worker", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("mupdate-worker: {err}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    // The TLS files are read before anything starts: a bad one is a bad setting.
    if matches!(command, Command::Run | Command::Send(_))
        && let Err(err) = mupdate_worker::security::tls::check(&settings)
    {
        eprintln!("mupdate-worker: {err}");
        return ExitCode::from(2);
    }
    // The rights rules must load for the worker to start (and for `config` to show them).
    let rules = match Rights::from_settings(&settings.security) {
        Ok(rights) => rights.map(|r| {
            let rules = r.current();
            (rules.written().to_vec(), rules.written_replies().to_vec())
        }),
        Err(err) => {
            eprintln!("mupdate-worker: configuration key security.rules_file: {err}");
            return ExitCode::from(2);
        }
    };
    init_logs(&settings);

    // The worker runs on `worker.threads` threads (one by default: it leaves the cores to
    // the engine and the broker); the loader reads its file on a thread of its own.
    let runtime = match (&command, settings.worker.threads) {
        (Command::Run, 0 | 1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        (Command::Run, threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("mupdate-worker: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(execute(command, settings, rules, held));
    // Blocking tasks still running (a name lookup of a silent DNS server) don't hold the
    // exit up.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

async fn execute(
    command: Command,
    settings: Settings,
    rules: Option<(Vec<Rule>, Vec<ReplyRule>)>,
    held: libc::sigset_t,
) -> ExitCode {
    if !matches!(command, Command::Run) {
        release_signals(&held);
    }
    let result = match command {
        Command::Run => {
            let token = CancellationToken::new();
            let grace = Duration::from_millis(settings.worker.shutdown_timeout_ms);
            // Every handler in place before the held signals come in.
            let signals = install_signals();
            release_signals(&held);
            tokio::spawn(shutdown_signal(signals, token.clone(), grace));
            tracing::info!(version = VERSION, "starting");
            mupdate_worker::lifecycle::session::run(settings, token)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Send(args) => send::run(&settings, *args).await,
        Command::Ready => ready(&settings.metrics.listen).await,
        Command::RequeueDead { unknown } => {
            mupdate_worker::requeue::run(&settings.amqp, unknown)
                .await
                .map(|done| {
                    println!(
                        "moved back {}; left: {} applied, {} of unknown fate, {} whose user_id could not be restored",
                        done.moved, done.applied, done.unknown, done.refused
                    );
                    ExitCode::SUCCESS
                })
        }
        // Answered in `main`, before the configuration is read: nothing left to do.
        Command::Man { .. } | Command::Completions { .. } => Ok(ExitCode::SUCCESS),
        Command::Config => {
            let mut shown = settings.redacted();
            if let Some((rules, replies)) = rules {
                shown["security"]["rules"] = serde_json::json!(rules);
                shown["security"]["reply_rules"] = serde_json::json!(replies);
            }
            let text = serde_json::to_string_pretty(&shown).unwrap_or_default();
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|err| {
        eprintln!("mupdate-worker: {err:#}");
        ExitCode::FAILURE
    })
}
