//! `mupdate-worker send`: one request built from its arguments (or a whole envelope),
//! published, its reply awaited and printed; `--file` hands over to `send_file`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::client::{self, Client, Target};
use crate::config::Settings;
use crate::pipeline::envelope::Action;

#[derive(Args)]
pub struct SendArgs {
    /// A whole envelope (JSON), or `-` for stdin. Not with --index/--collection.
    #[arg(conflicts_with_all = ["index", "collection", "documents", "id", "file"])]
    pub(super) envelope: Option<PathBuf>,
    /// Build the envelope: Kuzzle index.
    #[arg(long, requires = "collection")]
    pub(super) index: Option<String>,
    /// Build the envelope: Kuzzle collection.
    #[arg(long)]
    pub(super) collection: Option<String>,
    /// One request: its documents (mDelete: its ids) as NDJSON or a JSON array, or `-`
    /// for stdin.
    #[arg(long, conflicts_with = "file")]
    pub(super) documents: Option<PathBuf>,
    /// Batch load: one document a line in the --action's shape (an m-form; one id a line
    /// for mDelete), or `-` for stdin, sent in requests of at most
    /// `limits.documents_write_count` documents, with progress and a summary.
    #[arg(long)]
    pub(super) file: Option<PathBuf>,
    /// Batch load: write every failed document, with its status and reason, here (NDJSON).
    #[arg(long, requires = "file")]
    pub(super) failures: Option<PathBuf>,
    /// Batch load: requests awaiting their reply at once.
    #[arg(long, default_value_t = 4)]
    pub(super) in_flight: usize,
    /// Any write of Kuzzle's document controller. Documents in the m-form's shape:
    /// `{"_id", "body"}` (`{"_id"?, "body"}` for mCreate and mCreateOrReplace),
    /// `{"_id", "changes", "default"}` for mUpsert, an id (`"a"` or `{"_id": "a"}`) for
    /// mDelete. A single form (`update`, `delete`, …) takes exactly one such document.
    #[arg(long, default_value = "mUpdate", value_parser = action_names())]
    pub(super) action: String,
    /// A single form's `_id` (it stands for the document's own; `delete` needs no
    /// --documents with it).
    #[arg(long, conflicts_with = "file")]
    pub(super) id: Option<String>,
    /// `wait_for` to reply only once the documents are searchable.
    #[arg(long)]
    pub(super) refresh: Option<String>,
    #[arg(long)]
    pub(super) retry_on_conflict: Option<u32>,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 30)]
    pub(super) timeout: u64,
}

fn action_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(Action::names())
}

fn read_input(path: &PathBuf) -> std::io::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path)
    }
}

pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<ExitCode> {
    if args.file.is_some() {
        return super::send_file::run(settings, args).await;
    }
    let body = match (&args.envelope, &args.index, &args.collection) {
        (Some(path), ..) => read_input(path)?.into_bytes(),
        (None, Some(index), Some(collection)) if args.documents.is_some() || args.id.is_some() => {
            let documents = match &args.documents {
                Some(docs) => client::read_documents(&read_input(docs)?)?,
                None => Vec::new(),
            };
            let target = Target {
                action: &args.action,
                index,
                collection,
                refresh: args.refresh.as_deref(),
                retry_on_conflict: args.retry_on_conflict,
            };
            let envelope = client::request(&target, documents, args.id.as_deref())?;
            serde_json::to_vec(&envelope)?
        }
        _ => anyhow::bail!(
            "give an envelope file, or --index, --collection and --documents (or --id) or --file"
        ),
    };
    let client = Client::connect_any(&settings.amqp).await?;
    let id = client::correlation_id(&body);
    let reply = client
        .request(
            &settings.amqp.request_queue,
            &body,
            &id,
            Duration::from_secs(args.timeout),
        )
        .await?;
    println!("{}", String::from_utf8_lossy(&reply));
    let status = serde_json::from_slice::<serde_json::Value>(&reply)
        .ok()
        .and_then(|v| v["status"].as_u64())
        .unwrap_or(0);
    Ok(if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
