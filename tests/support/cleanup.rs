//! What a test made on the broker, deleted when dropped, even when the test failed.

use mupdate_worker::config::Settings;

use super::Amqp;

/// The queues and exchanges a test made, deleted when dropped, also when it failed.
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    pub fn of(settings: &Settings) -> Self {
        let a = &settings.amqp;
        Cleanup {
            queues: vec![
                a.request_queue.clone(),
                a.reply_queue.clone(),
                a.dead_letter_queue.clone(),
            ],
            exchanges: vec![a.dead_letter_exchange.clone()],
        }
    }

    /// Adds a queue; returns its name.
    pub fn queue(&mut self, name: String) -> String {
        self.queues.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Outside the test's runtime, which may be unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let amqp = Amqp::open().await;
                for q in queues.iter().filter(|q| !q.is_empty()) {
                    let _ = amqp
                        .channel
                        .queue_delete(q.as_str().into(), Default::default())
                        .await;
                }
                for e in exchanges.iter().filter(|e| !e.is_empty()) {
                    let _ = amqp
                        .channel
                        .exchange_delete(e.as_str().into(), Default::default())
                        .await;
                }
                amqp.close().await;
            });
        })
        .join();
    }
}
