//! The retention job: deletes messages older than the configured age, in
//! small batches so that senders' commits interleave with it.

use std::sync::Arc;
use std::time::Duration;

use natter_node::Shutdown;

use crate::MessageStore;

/// Messages deleted per transaction.
const BATCH: u32 = 500;
/// Pause between batches, so the committer is never held off for long.
const PAUSE: Duration = Duration::from_millis(20);

/// Deletes messages older than `retention` now and then every `every`, until shutdown.
pub async fn run(
    store: Arc<dyn MessageStore>,
    retention: Duration,
    every: Duration,
    shutdown: Shutdown,
) {
    loop {
        let cutoff = natter_node::ids::now_ms() - retention.as_millis() as i64;
        let mut deleted = 0u64;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match store.expire(cutoff, BATCH).await {
                Ok(n) => {
                    deleted += n;
                    if n < u64::from(BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; will retry");
                    break;
                }
            }
            tokio::time::sleep(PAUSE).await;
        }
        if deleted > 0 {
            tracing::info!(deleted, "expired old messages");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use crate::store::Write;
    use crate::suite::u;

    #[tokio::test]
    async fn old_messages_go_and_new_ones_stay() {
        let store: Arc<dyn MessageStore> = Arc::new(SqliteStore::memory().await.expect("store"));
        let ids = natter_node::ids::MidGenerator::new(0).expect("worker");
        let now = natter_node::ids::now_ms();
        let mut writes = Vec::new();
        for (i, age_days) in [40i64, 35, 1].iter().enumerate() {
            let time = now - age_days * 86_400_000;
            let mut m = crate::suite::text(1, 2, i as u64 + 1);
            m.mid = ids.next_at(time);
            m.time_ms = time;
            writes.push(Write::Message(m));
        }
        store.write_batch(&writes).await.expect("write");
        let shutdown = Shutdown::new();
        let job = tokio::spawn(run(
            store.clone(),
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(3600),
            shutdown.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store
            .sync(&u(2), 0, 10.into())
            .await
            .expect("sync")
            .items
            .len()
            != 1
        {
            assert!(
                std::time::Instant::now() < deadline,
                "retention did not run"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = store.sync(&u(2), 0, 10.into()).await.expect("sync").items;
        assert_eq!(left[0].message.client_seq, 3, "the day-old message stays");
        shutdown.cancel();
        job.await.expect("the job stops on shutdown");
    }
}
